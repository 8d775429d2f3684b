"""megagopher.kernels: the hot paths of the model behind one API (docs/ARCHITECTURE.md 4.4).

Every function is differentiable and takes an optional ``backend=`` ("auto" | "triton" | "torch") that
overrides ``use_backend``. Under "auto", CUDA tensors run the Triton kernels and CPU tensors the PyTorch
references; an input the Triton kernel does not support falls back to PyTorch under "auto" (attention to
torch's scaled_dot_product_attention, never the O(s^2) fp32 reference; a one-time warning names the op,
shape and reason) and raises a clear error under "triton". "apex" (optional, see dispatch.py) runs NVIDIA
apex's fused norms and softmax where it can and behaves as "auto" elsewhere.

The Triton kernels live one op per module (attention, softmax, norms, rope, fused_swiglu,
fused_cross_entropy), each with its autograd Function; triton_ops gathers them under the reference names.
"""
import torch.nn.functional as F

from . import reference
from .dispatch import Unsupported, current_backend, resolve, use_backend, warn_fallback

__all__ = ["flash_attention", "scaled_masked_softmax", "rms_norm", "layer_norm", "apply_rope", "swiglu",
           "cross_entropy", "use_backend", "current_backend"]


def _run(name, tensor, backend, args, kwargs):
    which, strict = resolve(tensor, backend, name)
    if which == "apex":
        from . import apex_ops  # only reached when NVIDIA apex is importable and the tensor is on CUDA
        try:
            return getattr(apex_ops, name)(*args, **kwargs)
        except Unsupported:  # an input apex's kernels do not take: carry on as "auto"
            which, strict = resolve(tensor, "auto", name)
    if which == "triton":
        from . import triton_ops  # imported lazily: importing triton must not be needed for the torch path
        try:
            return getattr(triton_ops, name)(*args, **kwargs)
        except Unsupported as e:
            if strict:
                raise
            fallback = _FALLBACKS.get(name)
            warn_fallback(name, tensor.shape, str(e), "torch's SDPA" if fallback else "the PyTorch reference")
            if fallback:
                return fallback(*args, **kwargs)
    return getattr(reference, name)(*args, **kwargs)


def _sdpa_attention(q, k, v, causal=True, softmax_scale=None):
    """The CUDA fallback of flash_attention: torch's fused kernels (flash / memory-efficient) in the input's
    dtype rather than the reference's fp32 s x s scores, which at training lengths is a cliff in time and
    memory. Same layout and top-left causal alignment as the reference."""
    if not q.dim() == k.dim() == v.dim() == 4:  # not attention's layout: the reference says so clearly
        return reference.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=softmax_scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2)


# Where "auto" goes on a CUDA input the Triton kernel does not take; ops not named here use the reference.
_FALLBACKS = {"flash_attention": _sdpa_attention}


def flash_attention(q, k, v, causal=True, softmax_scale=None, backend=None):
    return _run("flash_attention", q, backend, (q, k, v), dict(causal=causal, softmax_scale=softmax_scale))


def scaled_masked_softmax(x, mask=None, scale=1.0, causal=False, backend=None):
    return _run("scaled_masked_softmax", x, backend, (x,), dict(mask=mask, scale=scale, causal=causal))


def rms_norm(x, weight, eps=1e-5, backend=None):
    return _run("rms_norm", x, backend, (x, weight), dict(eps=eps))


def layer_norm(x, weight, bias, eps=1e-5, backend=None):
    return _run("layer_norm", x, backend, (x, weight, bias), dict(eps=eps))


def apply_rope(x, cos, sin, backend=None):
    return _run("apply_rope", x, backend, (x, cos, sin), {})


def swiglu(gate, up, backend=None):
    return _run("swiglu", gate, backend, (gate, up), {})


def cross_entropy(logits, labels, backend=None):
    return _run("cross_entropy", logits, backend, (logits, labels), {})
