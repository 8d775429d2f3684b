"""Plumbing shared by the Triton kernels: output allocation (with a test hook that poisons it), dtype and
shape checks that raise ``Unsupported``, and launch configurations that autotune on a GPU but stay fixed
under the interpreter.
"""
import contextlib

import torch
import triton

from megagopher.common import PRECISION_DTYPES, dtype_name

from .dispatch import KERNEL_DTYPES, Unsupported, interpreter_on

DTYPE_NAMES = {dtype: name for name, dtype in PRECISION_DTYPES.items()}

# Value every output buffer is filled with before a kernel writes it; None (the default) means
# torch.empty. Tests set it to NaN so that an element a kernel forgets to write fails the comparison.
_poison = [None]


@contextlib.contextmanager
def poison_outputs(value=float("nan")):
    """Test hook: buffers allocated by the Triton wrappers start out filled with ``value``."""
    previous = _poison[0]
    _poison[0] = value
    try:
        yield
    finally:
        _poison[0] = previous


def new_empty(shape, dtype, device):
    """torch.empty, unless a test asked for poisoned outputs. Every kernel output goes through here."""
    if _poison[0] is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, _poison[0], dtype=dtype, device=device)


def check_float(op, *tensors):
    """The Triton kernels take fp32, fp16 and bf16; anything else (float64 included) goes to PyTorch."""
    for t in tensors:
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise Unsupported(f"{op}: dtype {t.dtype} is not supported by the Triton kernel "
                              f"(supported: {', '.join(dtype_name(d) for d in KERNEL_DTYPES)})")


def check_device(op, *tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise Unsupported(f"{op}: tensors on different devices {sorted(map(str, devices))}")


def check_nonempty(op, t):
    if t.numel() == 0:
        raise Unsupported(f"{op}: empty input of shape {tuple(t.shape)}")


def dot_in_fp32(dtype):
    """The interpreter's tl.dot returns garbage for bf16 operands, so there they are upcast first; on a
    GPU the tensor cores take bf16/fp16 directly (accumulating in fp32 either way)."""
    return interpreter_on() and dtype == torch.bfloat16


def dot_precision(dtype):
    """fp32 inputs get exact fp32 products ("ieee"), not TF32, so the result matches PyTorch's fp32 math;
    for fp16/bf16 the argument is ignored."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autotuned(gpu_configs, interpreter_config, key, early_config_prune=None):
    """``triton.autotune`` with ``gpu_configs`` when compiling for a GPU, and the single small
    ``interpreter_config`` under TRITON_INTERPRET (one config: the autotuner then never benchmarks).
    Decided at import, which under the interpreter happens after conftest/bench set the variable.
    ``early_config_prune`` (e.g. ``prune_by_head_dim``) narrows the list per launch before benchmarking;
    tools/check_kernels.py calls it too, to compile each config where it can be picked."""
    configs = [interpreter_config] if interpreter_on() else gpu_configs
    prune = {"early_config_prune": early_config_prune} if early_config_prune else None
    return lambda fn: triton.autotune(configs=configs, key=key, prune_configs_by=prune)(fn)


def tile_configs(rows, pre_hook=None):
    """triton.Config per (BLOCK_M, BLOCK_N, num_warps, num_stages, smallest head dim, largest head dim), the
    head dims (the padded HEAD_DIM constexpr) recorded as ``min_head_dim`` / ``max_head_dim`` for
    ``prune_by_head_dim``; ``pre_hook(nargs)`` runs before each launch under the config (descriptor block
    shapes)."""
    configs = []
    for block_m, block_n, warps, stages, min_head_dim, max_head_dim in rows:
        config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                               pre_hook=pre_hook)
        config.min_head_dim, config.max_head_dim = min_head_dim, max_head_dim
        configs.append(config)
    return configs


def prune_by_head_dim(configs, named_args, **kwargs):
    """early_config_prune: the configs whose head-dim range admits this launch's HEAD_DIM constexpr. Large
    tiles that spill at head dim 256 stay available below it, where they compile clean."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    return [c for c in configs
            if getattr(c, "min_head_dim", head_dim) <= head_dim <= getattr(c, "max_head_dim", head_dim)]


def rows_2d(x):
    """View x (..., n) as (rows, n) with a unit last stride, copying only when it must."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def next_pow2(n):
    return triton.next_power_of_2(max(int(n), 1))
