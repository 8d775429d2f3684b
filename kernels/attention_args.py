"""Checks of flash_attention's packed-sequence and window arguments, shared by the Triton kernel, the PyTorch
reference and the SDPA fallback so that every backend accepts and refuses the same calls (no triton import).

cu_seqlens follows flash-attn's varlen API: int32 offsets (n + 1,) of n documents packed back to back in a
batch of one, cu_seqlens[0] = 0 and cu_seqlens[-1] = total. window_size = (left, right) is flash-attn's
sliding window: query i sees keys i - left .. i + right; only right = 0 (causal) is supported, and None or
(-1, -1) means no window. Only the cheap properties are checked (dtype, shape, batch, lengths): reading the
offsets' values would force a device synchronisation on every call.
"""
import torch


def window_left(window_size, causal):
    """The left window as an int, or None for no window; ValueError for a window we do not support."""
    if window_size is None:
        return None
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"flash_attention: window_size must be None or (left, right); got {window_size!r}") from None
    if (left, right) == (-1, -1):
        return None
    if right != 0:
        raise ValueError(f"flash_attention: window_size={window_size!r}: only a right window of 0 (sliding-window "
                         f"causal) is supported, or (-1, -1) for none")
    if not causal:
        raise ValueError(f"flash_attention: window_size={window_size!r} needs causal=True (a (left, 0) window is "
                         f"causal by definition)")
    if left < -1:
        raise ValueError(f"flash_attention: window_size={window_size!r}: left must be >= 0, or -1 for unbounded")
    return None if left == -1 else left


def check_cu_seqlens(q, k, cu_seqlens):
    """ValueError unless cu_seqlens can describe documents packed in q (1, total, h, d) and k (1, total, h_kv, d)."""
    if cu_seqlens is None:
        return
    if not torch.is_tensor(cu_seqlens) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        what = f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if torch.is_tensor(cu_seqlens) \
            else type(cu_seqlens).__name__
        raise ValueError(f"flash_attention: cu_seqlens must be a 1-D int32 tensor of document offsets; got {what}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"flash_attention: cu_seqlens needs n + 1 >= 2 offsets; got {cu_seqlens.numel()}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"flash_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"flash_attention: with cu_seqlens, q and k must be (1, total, heads, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"flash_attention: with cu_seqlens, q and k must have the same length; got "
                         f"{q.shape[1]} and {k.shape[1]}")


def documents(cu_seqlens, total):
    """[(start, end)] of the documents (a host copy: for the PyTorch paths only); the whole sequence if None."""
    if cu_seqlens is None:
        return [(0, total)]
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"flash_attention: cu_seqlens must rise from 0 to the packed length {total}; got {offsets}")
    return list(zip(offsets[:-1], offsets[1:]))


def allowed(sq, sk, causal, left, device):
    """Bool (sq, sk), True where query i may see key j, or None when every pair is allowed (no mask needed).
    Causal is top-left aligned (j <= i); a window adds i - left <= j."""
    if not causal:
        return None
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    ok = j <= i
    if left is not None:
        ok = ok & (j >= i - left)
    return ok


def check_key_bounds(q, k, causal, cu_seqlens, window_size, key_bounds, query_bounds=None):
    """ValueError unless ``key_bounds`` and ``query_bounds`` are usable. They are the general mask of the
    forward/backward halves (ring attention's blocks under document masking, where queries and keys are
    different stretches of one packed sequence): key_bounds = (lo, hi), int32 (b, s_q) each, query i of row
    n sees keys [lo[n, i], hi[n, i]); query_bounds = (lo, hi), int32 (b, s_k), the same mask seen from the
    keys (key j is seen by queries [lo[n, j], hi[n, j])), which the Triton dK/dV kernel reads. They replace
    causal, cu_seqlens and window_size, which must then be off."""
    if key_bounds is None:
        if query_bounds is not None:
            raise ValueError("flash_attention: query_bounds without key_bounds")
        return
    if causal or cu_seqlens is not None or window_size is not None:
        raise ValueError("flash_attention: key_bounds give the whole mask: pass causal=False and no cu_seqlens "
                         "or window_size")
    for name, bounds, n in (("key_bounds", key_bounds, q.shape[1]), ("query_bounds", query_bounds, k.shape[1])):
        if bounds is None:
            continue
        if len(bounds) != 2 or any(not torch.is_tensor(t) or t.dtype != torch.int32 or
                                   tuple(t.shape) != (q.shape[0], n) or t.device != q.device for t in bounds):
            raise ValueError(f"flash_attention: {name} must be two int32 tensors of shape {(q.shape[0], n)} on "
                             f"{q.device}")
