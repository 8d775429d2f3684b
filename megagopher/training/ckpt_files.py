"""The files of a checkpoint, made durable and read back without staging copies.

Shard files are safetensors (Hugging Face's format: an 8-byte header length, a JSON header of
{key: dtype, shape, data_offsets}, then raw little-endian bytes). ``safetensors.torch.save_file`` writes
straight from the tensors' memory (no copy, views of one buffer are fine while they do not overlap),
and any tool can open the files. Reading goes through ``read_into``: the header gives each tensor's
offset, and the bytes are read with ``readinto`` directly into the destination (a parameter, an
optimizer shard). safetensors' own reader maps the file, and every mapped page a slice touches counts
in the process's resident memory until the file is closed, which for a rank's whole shard file is
+50-100% of its model state; ``readinto`` lands the bytes where they belong and adds nothing.

Durability (POSIX): a file is fsynced before the rename that publishes it, and its directory after, so a
power loss cannot leave a published name pointing at missing data.
"""
import hashlib
import json
import os
import struct

import torch
from safetensors.torch import save_file as _safetensors_save

from megagopher.common import DTYPES_BY_SAFETENSORS

_DTYPES = DTYPES_BY_SAFETENSORS  # the header's dtype names, from the one dtype table (megagopher/common.py)


# The process's umask, read once at import (os.umask can only be read by setting it, which is not
# thread-safe); safetensors creates files owner-only, and checkpoints are shared like any other output.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file is missing, truncated or does not match its checksum; loaders fall back."""


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text_durably(path, text):
    """``path`` holds ``text`` or its previous content, never a part (temp name, fsync, rename, fsync dir)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(tensors, path):
    """Writes {key: contiguous CPU tensor} as one safetensors file, fsynced; returns its record
    {"bytes", "sha256"} for the checkpoint's metadata."""
    _safetensors_save(tensors, path)
    os.chmod(path, 0o666 & ~_UMASK)
    fsync_file(path)
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def verify_file(path, record):
    """Raises CheckpointCorrupt unless ``path`` has the recorded size (checked first: cheap, and it catches
    a truncated file without hashing it) and checksum."""
    if not os.path.isfile(path):
        raise CheckpointCorrupt(f"{path}: missing")
    size = os.path.getsize(path)
    if size != record["bytes"]:
        raise CheckpointCorrupt(f"{path}: {size} bytes, the checkpoint recorded {record['bytes']} (truncated?)")
    if sha256_file(path) != record["sha256"]:
        raise CheckpointCorrupt(f"{path}: checksum mismatch (file corrupt or truncated)")


def read_header(path):
    """{key: (dtype, shape, absolute byte offset)} of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > os.path.getsize(path) - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, ValueError, struct.error) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointCorrupt(f"{path}: unreadable safetensors header ({e})") from None
    start = 8 + length
    return {key: (_DTYPES[v["dtype"]], tuple(v["shape"]), start + v["data_offsets"][0])
            for key, v in header.items() if key != "__metadata__"}


def read_into(path, entry, lo, out):
    """Copies elements [lo, lo + out.numel()) of the flat tensor ``entry`` (from read_header) of ``path``
    into ``out`` (contiguous), reading the bytes straight into it when it is a CPU tensor of the same
    dtype, else through one temporary of the piece's size."""
    dtype, _, offset = entry
    target = out if out.device.type == "cpu" and out.dtype == dtype else torch.empty(out.numel(), dtype=dtype)
    raw = target.reshape(-1).view(torch.uint8)
    with open(path, "rb") as f:
        f.seek(offset + lo * target.element_size())
        view = memoryview(raw.numpy())
        got = 0
        while got < len(view):  # readinto may return short counts (pipes, network file systems)
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointCorrupt(f"{path}: ends inside tensor data")
            got += n
    if target is not out:
        out.copy_(target.view(out.shape))
