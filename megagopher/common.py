"""Facts the whole library shares, defined once: the names of the pipeline schedules, the recompute
modes, the one dtype table (precision name, torch dtype, the name checkpoints and Hugging Face's
config.json write, the safetensors header name, bytes per element), how to find the model inside the
data-parallel wrapper, the one device resolution (which device a process uses), and the torch
collective names that changed in torch 2.12.

This module imports only torch, so every layer may import it (docs/ARCHITECTURE.md, section 1).
"""
import os
import sys
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megagopher.errors import EXIT_INPUT_ERROR

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
RECOMPUTE_MODES = ("none", "selective", "full")
DEVICES = ("auto", "cpu", "cuda")


class DType(NamedTuple):
    """One row of the dtype table."""
    dtype: torch.dtype
    name: str                 # torch's name: checkpoint metadata and Hugging Face's config.json write it
    safetensors: str          # the name in a safetensors header
    precision: Optional[str]  # the training precision (training.precision) it is, if any
    bytes: int                # bytes per element


# Every dtype the library names anywhere, once. The training precisions come first, in the order their
# choices are listed; the others occur only in checkpoint files (RNG states, step counters, masks).
DTYPES = tuple(DType(dtype, name, safetensors, precision, dtype.itemsize) for dtype, name, safetensors, precision in (
    (torch.float32, "float32", "F32", "fp32"),
    (torch.bfloat16, "bfloat16", "BF16", "bf16"),
    (torch.float16, "float16", "F16", "fp16"),
    (torch.float64, "float64", "F64", None),
    (torch.int64, "int64", "I64", None),
    (torch.int32, "int32", "I32", None),
    (torch.int16, "int16", "I16", None),
    (torch.int8, "int8", "I8", None),
    (torch.uint8, "uint8", "U8", None),
    (torch.bool, "bool", "BOOL", None)))
PRECISION_DTYPES = {row.precision: row.dtype for row in DTYPES if row.precision}  # "bf16" -> torch.bfloat16
PRECISIONS = tuple(PRECISION_DTYPES)
TRAINING_DTYPES = tuple(PRECISION_DTYPES.values())  # also the dtypes the Triton kernels take
DTYPES_BY_NAME = {row.name: row.dtype for row in DTYPES}                # "bfloat16" -> torch.bfloat16
DTYPES_BY_SAFETENSORS = {row.safetensors: row.dtype for row in DTYPES}  # "BF16" -> torch.bfloat16
_ROW_OF_DTYPE = {row.dtype: row for row in DTYPES}


def dtype_row(dtype):
    """The table's row of torch dtype ``dtype``."""
    if dtype not in _ROW_OF_DTYPE:
        raise ValueError(f"dtype {dtype} is not in megagopher's dtype table; valid: "
                         f"{', '.join(row.name for row in DTYPES)}")
    return _ROW_OF_DTYPE[dtype]


def dtype_name(dtype):
    """torch's name of ``dtype`` ("bfloat16"), as checkpoint metadata and config.json write it."""
    return dtype_row(dtype).name


# torch >= 2.12 names the single-tensor collectives *_single; older releases call them *_into_tensor/_tensor.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor



def element_bytes(precision):
    """Bytes of one element in the training dtype of ``precision``."""
    return dtype_row(PRECISION_DTYPES[precision]).bytes


def unwrap_model(chunk):
    """The model chunk inside a data-parallel wrapper (``.module``), or the chunk itself."""
    return getattr(chunk, "module", chunk)


def run_command(prog, work):
    """Runs ``work()`` (-> exit status) for a command-line tool: a user error (bad value, missing file or
    key) becomes one line on stderr naming the tool, and EXIT_INPUT_ERROR, instead of a traceback."""
    try:
        return work()
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR


def device_type(device="auto", key="device"):
    """"cuda" or "cpu": what ``device`` ("auto" | "cpu" | "cuda", the value of config key ``key``) resolves to
    on this machine, "auto" meaning CUDA when available. No torch.cuda call is made for "cpu" (invariant 7)."""
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "auto":
        return "cpu"
    raise ValueError(f"{key} = {device!r} but no CUDA device is available; valid here: 'cpu', 'auto'")


def pick_device(device="auto", key="device"):
    """The one device resolution: torch.device for ``device`` (``device_type``). A CUDA process uses device
    LOCAL_RANK (torchrun's); without it, the current device once CUDA is initialised, else 0. The process
    group's start-up (training/distributed.py, generate.py) makes it the current device, and
    parallel_state.get_device asks here too, so every tensor a collective touches is on it."""
    if device_type(device, key) == "cpu":
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
