"""Facts the whole library shares, defined once: the names of the pipeline schedules, the recompute
modes and the precisions (with their dtypes), how to find the model inside the data-parallel wrapper,
which device a process uses, and the torch collective names that changed in torch 2.12.

This module imports only torch, so every layer may import it (docs/ARCHITECTURE.md, section 1).
"""
import os
import sys

import torch
import torch.distributed as dist

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
RECOMPUTE_MODES = ("none", "selective", "full")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(PRECISION_DTYPES)
DEVICES = ("auto", "cpu", "cuda")

# torch >= 2.12 names the single-tensor collectives *_single; older releases call them *_into_tensor/_tensor.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# The error types and exit statuses live in megagopher/errors.py, which imports nothing (the data and
# config packages use them without torch); they are re-exported here.
from megagopher.errors import (EXIT_INPUT_ERROR, EXIT_NON_FINITE, EXIT_PEER_LOST, EXIT_SAVE_FAILED,  # noqa: E402,F401
                               InputError, SaveFailed)


def element_bytes(precision):
    """Bytes of one element in the training dtype of ``precision``."""
    return torch.empty((), dtype=PRECISION_DTYPES[precision]).element_size()


def unwrap_model(chunk):
    """The model chunk inside a data-parallel wrapper (``.module``), or the chunk itself."""
    return getattr(chunk, "module", chunk)


def run_command(prog, work):
    """Runs ``work()`` (-> exit status) for a command-line tool: a user error (bad value, missing file or
    key) becomes one line on stderr naming the tool, and exit status 2, instead of a traceback."""
    try:
        return work()
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2


def pick_device(device="auto"):
    """torch.device for ``device`` ("auto" | "cpu" | "cuda"): CUDA device LOCAL_RANK when asked for, or when
    "auto" and CUDA is available. No torch.cuda call is made for "cpu" (invariant 7)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} but no CUDA device is available; valid here: 'cpu', 'auto'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
