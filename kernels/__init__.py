"""megagopher.kernels: the hot paths of the model behind one API (docs/ARCHITECTURE.md 4.4).

Every function is differentiable and takes an optional ``backend=`` ("auto" | "triton" | "torch") that
overrides ``use_backend``. Under "auto", CUDA tensors run the Triton kernels and CPU tensors the PyTorch
references; an input the Triton kernel does not support falls back to PyTorch under "auto" (attention to
torch's scaled_dot_product_attention, never the O(s^2) fp32 reference; a one-time warning names the op,
shape and reason) and raises a clear error under "triton". "apex" (optional, see dispatch.py) runs NVIDIA
apex's fused norms and softmax where it can and behaves as "auto" elsewhere.

The Triton kernels live one op per module (attention, softmax, norms, add_norm, rope, fused_swiglu,
fused_cross_entropy), each with its autograd Function; triton_ops gathers them under the reference names.
"""

# The repository root is on sys.path whenever Python runs from it (`python -m pytest tests`, `python -c`, a
# script in the root), and there this folder is found as the top-level package "kernels": the name of Hugging
# Face's `kernels` distribution, which transformers imports. We are `megagopher.kernels` only (setup.py's
# package_dir), so when imported under the top-level name this file hands the name to the installed
# distribution, or to nobody, and defines nothing (docs/ARCHITECTURE.md 1, "The top-level name kernels").
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is megagopher.kernels)",
                                  name="kernels")
    _distribution = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _distribution  # the import statement returns what sys.modules holds after this file
    _spec.loader.exec_module(_distribution)
else:
    import torch
    import torch.nn.functional as F

    from . import attention_args, reference
    from .dispatch import Unsupported, current_backend, resolve, use_backend, warn_fallback

    __all__ = ["flash_attention", "flash_attention_forward", "flash_attention_backward",
               "scaled_masked_softmax", "rms_norm", "layer_norm", "apply_rope", "swiglu",
               "cross_entropy", "add_rms_norm", "add_layer_norm", "grouped_mm", "use_backend", "current_backend"]


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


    def _sdpa_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window_size=None):
        """The CUDA fallback of flash_attention: torch's fused kernels (flash / memory-efficient) in the input's
        dtype rather than the reference's fp32 s x s scores, which at training lengths is a cliff in time and
        memory. Same layout and top-left causal alignment as the reference; packed documents run one SDPA call
        each, a window passes a boolean band mask (one byte per score, no fp32 score matrix)."""
        if not q.dim() == k.dim() == v.dim() == 4:  # not attention's layout: the reference says so clearly
            return reference.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                             cu_seqlens=cu_seqlens, window_size=window_size)
        left = attention_args.window_left(window_size, causal)
        attention_args.check_cu_seqlens(q, k, cu_seqlens)
        if cu_seqlens is None:
            return _sdpa(q, k, v, causal, softmax_scale, left)
        return torch.cat([_sdpa(q[:, a:e], k[:, a:e], v[:, a:e], causal, softmax_scale, left)
                          for a, e in attention_args.documents(cu_seqlens, q.shape[1])], dim=1)


    def _sdpa(q, k, v, causal, softmax_scale, left):
        mask = attention_args.allowed(q.shape[1], k.shape[1], causal, left, q.device) if left is not None else None
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=bool(causal) and mask is None,
                                           scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(1, 2)


    # Where "auto" goes on a CUDA input the Triton kernel does not take; ops not named here use the reference.
    _FALLBACKS = {"flash_attention": _sdpa_attention}


    def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window_size=None, backend=None):
        return _run("flash_attention", q, backend, (q, k, v), dict(causal=causal, softmax_scale=softmax_scale,
                                                                   cu_seqlens=cu_seqlens, window_size=window_size))


    def flash_attention_forward(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window_size=None,
                                key_bounds=None, backend=None):
        """(o, lse fp32 (b, h, s_q)): the forward half, for ring attention (not differentiable). ``key_bounds``
        (per query, the keys it sees) replace the other masks: kernels/attention_args.py check_key_bounds."""
        return _run("flash_attention_forward", q, backend, (q, k, v), dict(causal=causal, softmax_scale=softmax_scale,
                                                                           cu_seqlens=cu_seqlens, window_size=window_size,
                                                                           key_bounds=key_bounds))


    def flash_attention_backward(q, k, v, o, lse, do, causal=True, softmax_scale=None, cu_seqlens=None,
                                 window_size=None, key_bounds=None, query_bounds=None, backend=None):
        """(dq, dk, dv), with o and lse those of the whole (e.g. ring-merged) attention these keys are part of;
        ``key_bounds`` and ``query_bounds`` as in flash_attention_forward."""
        return _run("flash_attention_backward", q, backend, (q, k, v, o, lse, do),
                    dict(causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, window_size=window_size,
                         key_bounds=key_bounds, query_bounds=query_bounds))


    def scaled_masked_softmax(x, mask=None, scale=1.0, causal=False, backend=None):
        return _run("scaled_masked_softmax", x, backend, (x,), dict(mask=mask, scale=scale, causal=causal))


    def rms_norm(x, weight, eps=1e-5, backend=None):
        return _run("rms_norm", x, backend, (x, weight), dict(eps=eps))


    def layer_norm(x, weight, bias, eps=1e-5, backend=None):
        return _run("layer_norm", x, backend, (x, weight, bias), dict(eps=eps))


    def add_rms_norm(x, residual, weight, eps=1e-5, backend=None):
        """(y, s): s = x + residual in x's dtype (the new residual stream), y = rms_norm(s), in one kernel."""
        return _run("add_rms_norm", x, backend, (x, residual, weight), dict(eps=eps))


    def add_layer_norm(x, residual, weight, bias, eps=1e-5, backend=None):
        """(y, s): s = x + residual in x's dtype, y = layer_norm(s), in one kernel."""
        return _run("add_layer_norm", x, backend, (x, residual, weight, bias), dict(eps=eps))


    def apply_rope(x, cos, sin, backend=None):
        return _run("apply_rope", x, backend, (x, cos, sin), {})


    def swiglu(gate, up, backend=None):
        return _run("swiglu", gate, backend, (gate, up), {})


    def cross_entropy(logits, labels, backend=None):
        return _run("cross_entropy", logits, backend, (logits, labels), {})


    def grouped_mm(x, weight, tokens_per_expert, backend=None):
        """Rows of ``x`` [N, in] grouped by expert (``tokens_per_expert`` [E], a CPU integer tensor) times their
        expert's ``weight`` [E, out, in] transposed: [N, out] (kernels/grouped_gemm_ref.py). "torch" runs
        ``torch._grouped_mm`` where it applies (CUDA, bf16, sm_90+), else the loop over experts."""
        from . import grouped_gemm_ref
        grouped_gemm_ref.check_grouped_args(x, weight, tokens_per_expert)
        return _run("grouped_mm", x, backend, (x, weight, tokens_per_expert), {})
