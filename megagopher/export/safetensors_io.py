"""Writing ``.safetensors`` files (Hugging Face's format: an 8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets}} padded with spaces to a multiple of 8 bytes, then the raw
little-endian tensor bytes in header order).

The ``safetensors`` package does it when it is installed; it is not a dependency of megagopher, so
``write_safetensors`` is a small writer of the documented format that exporting falls back to.
"""
import json
import struct

import torch

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


def _raw_bytes(t):
    """The tensor's bytes in C order, little-endian (as every platform torch runs on stores them)."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_safetensors(tensors, path, metadata=None):
    """Writes ``tensors`` ({name: tensor}) to ``path`` without the safetensors package."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"safetensors: tensor {name!r} has unsupported dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            f.write(_raw_bytes(t))


def save_file(tensors, path, metadata=None):
    """safetensors.torch.save_file when the package is there, else write_safetensors. Tensors are made
    contiguous and unshared first (safetensors refuses tensors that share memory)."""
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    try:
        from safetensors.torch import save_file as st_save
    except ImportError:
        return write_safetensors(tensors, path, metadata)
    return st_save(tensors, path, metadata=metadata)
