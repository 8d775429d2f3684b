"""PyTorch reference implementations of megagopher's kernels: the "torch" backend, the CPU path of "auto",
and the ground truth the Triton kernels are tested against (run in float64 there).

Each computes in at least fp32 (float64 stays float64) and returns the input's dtype, except
cross_entropy, which returns per-token fp32 (or float64) losses.
"""
import torch
import torch.nn.functional as F

from . import attention_args
from .grouped_gemm_ref import grouped_mm  # noqa: F401 (torch._grouped_mm where it applies)


def _compute_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def _allowed(q, k, causal, left, key_bounds):
    """The (query, key) pairs that attend: attention_args.allowed's, or per row n and query i the keys
    [lo[n, i], hi[n, i]) of ``key_bounds`` as (b, 1, s_q, s_k)."""
    if key_bounds is None:
        return attention_args.allowed(q.shape[1], k.shape[1], causal, left, q.device)
    lo, hi = key_bounds
    col = torch.arange(k.shape[1], device=q.device)
    return ((col >= lo[..., None]) & (col < hi[..., None])).unsqueeze(1)


def _attention_one(q, k, v, causal, scale, left, key_bounds=None):
    """One document: o (b, s_q, h, d) in the compute dtype and the logsumexp (b, h, s_q) of its scores."""
    h, h_kv = q.shape[2], k.shape[2]
    qf, kf, vf = (t.transpose(1, 2).to(_compute_dtype(q)) for t in (q, k, v))  # (b, heads, s, d)
    if h_kv != h:
        kf = kf.repeat_interleave(h // h_kv, dim=1)
        vf = vf.repeat_interleave(h // h_kv, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    ok = _allowed(q, k, causal, left, key_bounds)
    if ok is not None:
        scores = scores.masked_fill(~ok, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    # The lse is data for ring attention's merge, never differentiated: outside autograd, so the s x s
    # scores are not kept alive for it (the plain forward discards it).
    with torch.no_grad():
        lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(1, 2), lse


def _attention(q, k, v, causal, softmax_scale, cu_seqlens, window_size, key_bounds=None):
    h, h_kv = q.shape[2], k.shape[2]
    if h % h_kv:
        raise ValueError(f"flash_attention: {h} query heads are not a multiple of {h_kv} key/value heads")
    left = attention_args.window_left(window_size, causal)
    attention_args.check_cu_seqlens(q, k, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    attention_args.check_key_bounds(q, k, causal, cu_seqlens, window_size, key_bounds)
    if cu_seqlens is None:
        return _attention_one(q, k, v, causal, scale, left, key_bounds)
    parts = [_attention_one(q[:, a:e], k[:, a:e], v[:, a:e], causal, scale, left)
             for a, e in attention_args.documents(cu_seqlens, q.shape[1])]
    return torch.cat([o for o, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=2)


def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window_size=None):
    """q (b, s_q, h, d); k (b, s_k, h_kv, d), v (b, s_k, h_kv, d_v) with h_kv dividing h. Returns (b, s_q, h, d_v).
    Causal masking is aligned top-left (query i sees keys 0..i), as in scaled_dot_product_attention;
    window_size=(left, 0) also hides keys before i - left. With cu_seqlens (int32 document offsets, b = 1),
    each packed document attends only within itself (kernels/attention_args.py)."""
    return _attention(q, k, v, causal, softmax_scale, cu_seqlens, window_size)[0].to(q.dtype)


def flash_attention_forward(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window_size=None,
                            key_bounds=None):
    """(o, lse): flash_attention's output and the (b, h, s_q) natural-log logsumexp of the scaled, masked
    scores (fp32, float64 for float64 inputs; -inf for a row that sees no key). ``key_bounds``: see
    attention_args.check_key_bounds."""
    o, lse = _attention(q, k, v, causal, softmax_scale, cu_seqlens, window_size, key_bounds)
    return o.to(q.dtype), lse


def _attention_grads_one(q, k, v, o, lse, do, causal, scale, left, key_bounds=None):
    h, h_kv = q.shape[2], k.shape[2]
    ct = _compute_dtype(q)
    qf, kf, vf, of, dof = (t.transpose(1, 2).to(ct) for t in (q, k, v, o, do))  # (b, heads, s, d)
    kf, vf = (t.repeat_interleave(h // h_kv, dim=1) for t in (kf, vf))
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    ok = _allowed(q, k, causal, left, key_bounds)
    if ok is not None:
        scores = scores.masked_fill(~ok, float("-inf"))
    p = torch.exp(scores - lse.to(ct)[..., None]).nan_to_num(0.0)  # with the given (maybe global) normaliser
    dv = torch.matmul(p.transpose(-1, -2), dof)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - (dof * of).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    dk, dv = (t.view(t.shape[0], h_kv, h // h_kv, *t.shape[2:]).sum(2) for t in (dk, dv))  # dv: v's head dim
    return [t.transpose(1, 2) for t in (dq, dk, dv)]


def flash_attention_backward(q, k, v, o, lse, do, causal=True, softmax_scale=None, cu_seqlens=None,
                             window_size=None, key_bounds=None, query_bounds=None):
    """(dq, dk, dv) of flash_attention given the upstream do and the o and lse of the softmax these keys
    belong to, which may cover more keys than k (ring attention's merged o and lse): P = exp(S - lse)."""
    left = attention_args.window_left(window_size, causal)
    attention_args.check_cu_seqlens(q, k, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    attention_args.check_key_bounds(q, k, causal, cu_seqlens, window_size, key_bounds, query_bounds)
    if cu_seqlens is None:  # query_bounds (the Triton dK/dV kernel's view of key_bounds) add nothing here
        grads = _attention_grads_one(q, k, v, o, lse, do, causal, scale, left, key_bounds)
    else:
        parts = [_attention_grads_one(q[:, a:e], k[:, a:e], v[:, a:e], o[:, a:e], lse[:, :, a:e], do[:, a:e],
                                      causal, scale, left)
                 for a, e in attention_args.documents(cu_seqlens, q.shape[1])]
        grads = [torch.cat(ts, dim=1) for ts in zip(*parts)]
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def scaled_masked_softmax(x, mask=None, scale=1.0, causal=False):
    """Megatron's semantics: scale, mask (True = masked), softmax over the last dim in fp32. A fully masked
    row is all zeros. x (b, h, sq, sk); mask broadcastable to x."""
    y = x.to(_compute_dtype(x)) * scale
    masked = None
    if mask is not None:
        masked = mask.to(torch.bool)
    if causal:
        sq, sk = x.shape[-2], x.shape[-1]
        tri = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(1)
        masked = tri if masked is None else (masked | tri)
    if masked is not None:
        y = y.masked_fill(masked, float("-inf"))
    return torch.softmax(y, dim=-1).nan_to_num(0.0).to(x.dtype)


def rms_norm(x, weight, eps=1e-5):
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


def layer_norm(x, weight, bias, eps=1e-5):
    xf = x.to(_compute_dtype(x))
    w = weight.to(xf.dtype) if weight is not None else None
    bb = bias.to(xf.dtype) if bias is not None else None
    return F.layer_norm(xf, (x.shape[-1],), w, bb, eps).to(x.dtype)


def add_rms_norm(x, residual, weight, eps=1e-5):
    """(rms_norm(s), s) with s = x + residual in x's dtype: the residual stream after the add."""
    s = (x + residual).to(x.dtype)
    return rms_norm(s, weight, eps), s


def add_layer_norm(x, residual, weight, bias, eps=1e-5):
    """(layer_norm(s), s) with s = x + residual in x's dtype."""
    s = (x + residual).to(x.dtype)
    return layer_norm(s, weight, bias, eps), s


def apply_rope(x, cos, sin):
    """Rotary embedding, GPT-NeoX/Llama "rotate half" convention, on the first 2 * cos.shape[-1] channels
    of each head (partial rotary when that is less than d). x (b, s, h, d); cos, sin (s, rot_dim // 2)."""
    half = cos.shape[-1]
    ct = _compute_dtype(x)
    xf = x.to(ct)
    c = cos.to(ct)[None, :, None, :]
    s = sin.to(ct)[None, :, None, :]
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)
    return out.to(x.dtype)


def swiglu(gate, up):
    g = gate.to(_compute_dtype(gate))
    return (F.silu(g) * up.to(g.dtype)).to(gate.dtype)


def cross_entropy(logits, labels, ignore_index=-100):
    """Per-token loss (same shape as labels), fp32 (float64 for float64 logits); ignored labels give 0."""
    flat = logits.reshape(-1, logits.shape[-1]).to(_compute_dtype(logits))
    loss = F.cross_entropy(flat, labels.reshape(-1), reduction="none", ignore_index=ignore_index)
    return loss.reshape(labels.shape)
