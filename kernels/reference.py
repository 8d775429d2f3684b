"""PyTorch reference implementations of megagopher's kernels: the "torch" backend, the CPU path of "auto",
and the ground truth the Triton kernels are tested against (run in float64 there).

Each computes in at least fp32 (float64 stays float64) and returns the input's dtype, except
cross_entropy, which returns per-token fp32 (or float64) losses.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    """q (b, s_q, h, d); k, v (b, s_k, h_kv, d) with h_kv dividing h. Returns (b, s_q, h, d).
    Causal masking is aligned top-left (query i sees keys 0..i), as in scaled_dot_product_attention."""
    b, sq, h, d = q.shape
    h_kv = k.shape[2]
    if h % h_kv:
        raise ValueError(f"flash_attention: {h} query heads are not a multiple of {h_kv} key/value heads")
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    ct = _compute_dtype(q)
    qf, kf, vf = (t.transpose(1, 2).to(ct) for t in (q, k, v))  # (b, heads, s, d)
    if h_kv != h:
        kf = kf.repeat_interleave(h // h_kv, dim=1)
        vf = vf.repeat_interleave(h // h_kv, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        sk = k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)


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
