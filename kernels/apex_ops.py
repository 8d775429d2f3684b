"""The optional "apex" backend: NVIDIA apex's fused LayerNorm / RMSNorm (apex.normalization) and Megatron's
fused softmax extensions (scaled_masked_softmax_cuda, scaled_upper_triang_masked_softmax_cuda).

Only reached when apex is importable and the tensor is on CUDA (dispatch.resolve). Anything apex's kernels
do not take raises Unsupported, and the call carries on as "auto" (Triton on CUDA). apex is looked up
lazily and never listed as a dependency.

Megatron's masked kernel fills masked scores with -10000, so a fully masked row comes out uniform; our
contract says zeros, so those rows are zeroed after the forward and the zeroed probabilities are what the
backward sees (its gradient there is then zero too).
"""
import importlib

import torch

from .dispatch import Unsupported

# Limits of the Megatron softmax extensions (FusedScaleMaskSoftmax.is_kernel_available), conservative
# across apex versions.
_SOFTMAX_MAX_KEYS = 4096
_CAUSAL_MAX_KEYS = 2048  # the upper-triangular kernel's limit in older apex; longer rows use an explicit mask


def _module(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Unsupported(f"apex: module {name} is not importable ({e})")


def _same_dtype(op, x, *params):
    if any(p is not None and p.dtype != x.dtype for p in params):
        raise Unsupported(f"{op}: apex backend takes parameters of the input's dtype {x.dtype} only")


def layer_norm(x, weight, bias, eps=1e-5):
    _same_dtype("layer_norm", x, weight, bias)
    fln = _module("apex.normalization.fused_layer_norm")
    shape = (x.shape[-1],)
    if weight is None and bias is None:
        return fln.fused_layer_norm(x, shape, eps)
    if weight is None or bias is None:
        raise Unsupported("layer_norm: apex backend needs both weight and bias, or neither")
    return fln.fused_layer_norm_affine(x, weight, bias, shape, eps)


def rms_norm(x, weight, eps=1e-5):
    _same_dtype("rms_norm", x, weight)
    fln = _module("apex.normalization.fused_layer_norm")
    if not hasattr(fln, "fused_rms_norm_affine"):
        raise Unsupported("rms_norm: this apex has no fused RMSNorm")
    shape = (x.shape[-1],)
    if weight is None:
        return fln.fused_rms_norm(x, shape, eps)
    return fln.fused_rms_norm_affine(x, weight, shape, eps)


class _MegatronSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale):
        b, h, sq, sk = x.shape
        if mask is None:  # causal, square: the upper-triangular kernel works on (b * h, sq, sk)
            ext = _module("scaled_upper_triang_masked_softmax_cuda")
            y = ext.forward(x.reshape(b * h, sq, sk), scale).view(b, h, sq, sk)
        else:
            ext = _module("scaled_masked_softmax_cuda")
            y = ext.forward(x, mask, scale)
            y = y.masked_fill(mask.all(-1, keepdim=True), 0.0)  # fully masked rows: zeros, not uniform
        ctx.save_for_backward(y)
        ctx.ext, ctx.scale, ctx.triangular = ext, scale, mask is None
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        b, h, sq, sk = y.shape
        if ctx.triangular:
            dx = ctx.ext.backward(dy.reshape(b * h, sq, sk).contiguous(), y.reshape(b * h, sq, sk), ctx.scale)
            return dx.view(b, h, sq, sk), None, None
        return ctx.ext.backward(dy.contiguous(), y, ctx.scale), None, None


def scaled_masked_softmax(x, mask=None, scale=1.0, causal=False):
    op = "scaled_masked_softmax"
    if x.dim() != 4 or x.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported(f"{op}: apex takes 4-d fp16/bf16 input, got {x.dtype} {tuple(x.shape)}")
    b, h, sq, sk = x.shape
    if not (16 < sk <= _SOFTMAX_MAX_KEYS and sq % 4 == 0 and sk % 4 == 0 and (b * h) % 4 == 0):
        raise Unsupported(f"{op}: shape {tuple(x.shape)} is outside the Megatron kernel's limits "
                          f"(16 < sk <= {_SOFTMAX_MAX_KEYS}, sq, sk and b*h multiples of 4)")
    masked_ext = _module("scaled_masked_softmax_cuda")
    per_block = masked_ext.get_batch_per_block(sq, sk, b, h) if hasattr(masked_ext, "get_batch_per_block") else 1
    if causal and mask is None and sq == sk and sk <= _CAUSAL_MAX_KEYS and (b * h) % per_block == 0:
        return _MegatronSoftmax.apply(x.contiguous(), None, float(scale))
    if sq % per_block:
        raise Unsupported(f"{op}: sq={sq} is not a multiple of the Megatron kernel's batch per block {per_block}")
    full = torch.zeros(1, 1, sq, sk, dtype=torch.bool, device=x.device) if mask is None else mask.to(torch.bool)
    while full.dim() < 4:
        full = full.unsqueeze(0)
    if full.dim() != 4 or full.shape[1] != 1 or full.shape[0] not in (1, b) or tuple(full.shape[2:]) != (sq, sk):
        raise Unsupported(f"{op}: apex needs a mask of shape (b or 1, 1, sq, sk), got {tuple(mask.shape)}")
    if causal:
        full = full | torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(1)
    return _MegatronSoftmax.apply(x.contiguous(), full.contiguous(), float(scale))
