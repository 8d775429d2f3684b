"""Cross entropy from logits, per token in fp32, forward and backward, for vocabularies of any size.

Forward: one program per row streams the vocabulary in blocks keeping a running max and a running sum of
exp(logit - max) (the online softmax normaliser of Milakov & Gimelshein 2018), so the row never has to fit
in registers; loss = logsumexp - logit[label], and the logsumexp (one fp32 per row) is saved. Backward:
recomputes softmax blockwise from that logsumexp, d logits = (softmax - onehot(label)) * d loss, written
straight in the logits' dtype: no fp32 softmax of the whole vocabulary is ever stored. Labels equal to
ignore_index give 0 loss and 0 gradient; other labels outside [0, V) are the caller's bug and are not
checked (a check would cost a device sync per step): their row gets loss = logsumexp.

The same two kernels serve the local part of a vocab-parallel cross entropy (Megatron, Shoeybi et al.
2019): with ``vocab_start`` the shard's first id and ``n_real`` its count of non-padding columns, they
return per-row max, sum of exp, the target logit (0 when the label lies in another shard) and the sum of
logits (for label smoothing), and take back the global logsumexp for the gradient. There the gradient
(with PaLM's z-loss term 2 z_loss lse softmax when asked) is written in the forward, over the logits
themselves (Liger-Kernel's scheme: ``out=logits``), and ``_ce_scale_kernel`` applies each row's upstream
gradient in place in the backward; tensor_parallel/cross_entropy.py explains why.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_nonempty, new_empty, next_pow2, rows_2d
from .dispatch import Unsupported, interpreter_on


@triton.jit
def _ce_fwd_kernel(X, LABELS, LOSS, LSE, MAX, SUMEXP, TARGET, SUMX, stride_x, N_REAL, vocab_start, ignore_index,
                   LOCAL_STATS: tl.constexpr, BLOCK: tl.constexpr):
    # Columns from N_REAL on (vocab padding of a shard) are skipped: they take no probability mass.
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK)
    # running max and sum of exp per lane (no reductions inside the loop), combined once at the end
    m_lane = tl.full([BLOCK], float("-inf"), tl.float32)
    l_lane = tl.zeros([BLOCK], tl.float32)
    x_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N_REAL, BLOCK):
        ok = start + offs < N_REAL
        x = tl.load(x_row + start + offs, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_lane, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes past the end stay at l = 0
        l_lane = l_lane * tl.exp(m_lane - m_safe) + tl.exp(x - m_safe)
        m_lane = m_new
        if LOCAL_STATS:
            x_sum += tl.where(ok, x, 0.0)
    m = tl.max(m_lane, 0)
    l = tl.sum(l_lane * tl.exp(m_lane - tl.where(m == float("-inf"), 0.0, m)), 0)
    label = tl.load(LABELS + row).to(tl.int64)
    local = label - vocab_start
    in_shard = (label != ignore_index) & (local >= 0) & (local < N_REAL)
    target = tl.load(x_row + local, mask=in_shard, other=0.0).to(tl.float32)
    if LOCAL_STATS:
        tl.store(MAX + row, m)
        tl.store(SUMEXP + row, l)
        tl.store(TARGET + row, target)
        tl.store(SUMX + row, tl.sum(x_sum, 0))
    else:
        lse = m + tl.log(l)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(label == ignore_index, 0.0, lse - target))


@triton.jit
def _ce_bwd_kernel(X, LABELS, LSE, DLOSS, DX, stride_x, stride_dx, stride_dl, V, N_REAL, vocab_start,
                   ignore_index, target_weight, uniform_weight, z_coef, BLOCK: tl.constexpr):
    # d logits = (softmax (1 + 2 z_coef lse) - target_weight * onehot - uniform_weight * [real column]) * d loss;
    # with label smoothing eps, target_weight = 1 - eps and uniform_weight = eps / vocab size, else 1 and 0;
    # the z-loss z_coef * lse^2 adds 2 z_coef lse softmax. DX may be X itself (the in-place scheme): each
    # block is loaded before it is overwritten, and no other program touches the row.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    dl = tl.where(label == ignore_index, 0.0, tl.load(DLOSS + row * stride_dl).to(tl.float32))
    lse = tl.load(LSE + row)
    local = label - vocab_start
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        real = cols < N_REAL
        x = tl.load(X + row * stride_x + cols, mask=real, other=float("-inf")).to(tl.float32)
        grad = tl.exp(x - lse) * (1.0 + 2.0 * z_coef * lse) - tl.where(cols == local, target_weight, 0.0) \
            - tl.where(real, uniform_weight, 0.0)
        tl.store(DX + row * stride_dx + cols, (grad * dl).to(DX.dtype.element_ty), mask=cols < V)


@triton.jit
def _ce_scale_kernel(DX, DLOSS, stride_dx, stride_dl, V, BLOCK: tl.constexpr):
    # The backward of the in-place scheme: the forward wrote the gradient for a unit upstream gradient; each
    # row is scaled by its own upstream gradient in fp32, in place.
    row = tl.program_id(0).to(tl.int64)
    dl = tl.load(DLOSS + row * stride_dl).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        g = tl.load(DX + row * stride_dx + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, (g * dl).to(DX.dtype.element_ty), mask=ok)


def _block(v):
    # 4096 logits per step on a GPU; 128 under the interpreter so a test vocabulary of a few hundred
    # ids crosses several blocks.
    return min(next_pow2(v), 128 if interpreter_on() else 4096)


def _warps(block):
    return 8 if block >= 2048 else 4


def _backward(x2, labels, lse, dloss, vocab_start, ignore_index, n_real=None, target_weight=1.0,
              uniform_weight=0.0, z_coef=0.0, dx=None):
    m, v = x2.shape
    dx = new_empty((m, v), x2.dtype, x2.device) if dx is None else dx
    block = _block(v)
    _ce_bwd_kernel[(m,)](x2, labels, lse, dloss, dx, x2.stride(0), dx.stride(0), dloss.stride(0), v,
                         v if n_real is None else n_real, vocab_start, ignore_index, target_weight,
                         uniform_weight, z_coef, BLOCK=block, num_warps=_warps(block))
    return dx


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        x2 = rows_2d(logits)
        m, v = x2.shape
        flat_labels = labels.reshape(-1).contiguous()
        loss = new_empty((m,), torch.float32, x2.device)
        lse = new_empty((m,), torch.float32, x2.device)
        block = _block(v)
        _ce_fwd_kernel[(m,)](x2, flat_labels, loss, lse, lse, lse, lse, lse, x2.stride(0), v, 0, ignore_index,
                             LOCAL_STATS=False, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, flat_labels, lse)
        ctx.ignore_index, ctx.shape = ignore_index, logits.shape
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, dloss):
        x2, labels, lse = ctx.saved_tensors
        dx = _backward(x2, labels, lse, dloss.reshape(-1), 0, ctx.ignore_index)
        return dx.view(ctx.shape), None, None


def _check(op, logits, labels):
    check_float(op, logits)
    check_device(op, logits, labels)
    if labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise Unsupported(f"{op}: labels must be int64/int32 of shape {tuple(logits.shape[:-1])}, got "
                          f"{labels.dtype} {tuple(labels.shape)}")
    check_nonempty(op, logits)


def cross_entropy(logits, labels, ignore_index=-100):
    """Per-token loss of logits (..., V) against labels (...), fp32, shaped like labels."""
    _check("cross_entropy", logits, labels)
    return CrossEntropyFunction.apply(logits, labels, int(ignore_index))


# ---- the local part of a vocab-parallel cross entropy (tensor_parallel/cross_entropy.py) --------------

class LocalStats(NamedTuple):
    max: torch.Tensor         # per row: max of this shard's real logits (-inf if it has none)
    sum_exp: torch.Tensor     # sum of exp(logit - max) over them
    target: torch.Tensor      # the label's logit when the label lies in this shard, else 0
    sum_logits: torch.Tensor  # sum of this shard's real logits (for label smoothing)


def _shard_check(op, logits, labels, vocab_start, n_real):
    _check(op, logits, labels)
    if not 0 <= n_real <= logits.shape[-1] or vocab_start < 0:
        raise Unsupported(f"{op}: n_real={n_real} must lie in [0, {logits.shape[-1]}] and vocab_start={vocab_start} >= 0")


def vocab_parallel_local_stats(logits, labels, vocab_start, n_real=None, ignore_index=-100):
    """One pass over this rank's shard of the vocabulary: logits (..., V_local) hold the ids
    vocab_start .. vocab_start + V_local - 1, of which the first ``n_real`` (default all) are real and the
    rest padding. Returns LocalStats of fp32 tensors shaped like ``labels``; not differentiable. Combine
    over TP ranks: M = all_reduce_max(max); S = all_reduce_sum(sum_exp * exp(max - M));
    lse = M + log(S); loss = lse - all_reduce_sum(target)."""
    n_real = logits.shape[-1] if n_real is None else int(n_real)
    _shard_check("vocab_parallel_local_stats", logits, labels, vocab_start, n_real)
    x2 = rows_2d(logits.detach())
    m = x2.shape[0]
    out = [new_empty((m,), torch.float32, x2.device) for _ in range(4)]
    block = _block(n_real)
    _ce_fwd_kernel[(m,)](x2, labels.reshape(-1).contiguous(), out[0], out[0], *out, x2.stride(0), n_real,
                         int(vocab_start), int(ignore_index), LOCAL_STATS=True, BLOCK=block, num_warps=_warps(block))
    return LocalStats(*(t.view(labels.shape) for t in out))


def rows_view(op, t):
    """t (..., V) as a (rows, V) view of its own storage with a unit last stride, for writing in place;
    Unsupported when its layout has none (a transposed tensor)."""
    try:
        t2 = t.view(-1, t.shape[-1])
    except RuntimeError:
        t2 = None
    if t2 is None or (t2.stride(-1) != 1 and t2.shape[-1] > 1):
        raise Unsupported(f"{op}: a tensor of shape {tuple(t.shape)} and strides {t.stride()} is not one "
                          "(rows, V) view with a unit last stride, so it cannot be written in place")
    return t2


def vocab_parallel_local_grad(logits, labels, vocab_start, lse, grad_loss=None, n_real=None, ignore_index=-100,
                              label_smoothing=0.0, vocab_size=None, z_loss=0.0, out=None):
    """d loss / d logits for this shard, from the global logsumexp ``lse`` (fp32, shaped like labels):
    (softmax (1 + 2 z_loss lse) - (1 - eps) onehot - eps / vocab_size on real columns) * grad_loss (1 when
    None), 0 on padding columns and on rows whose label is ignore_index; ``z_loss`` is PaLM's z-loss
    coefficient. Computed blockwise in fp32 and written into ``out`` (which may be ``logits`` itself: the
    in-place scheme) or a new tensor like ``logits``, which is returned."""
    n_real = logits.shape[-1] if n_real is None else int(n_real)
    _shard_check("vocab_parallel_local_grad", logits, labels, vocab_start, n_real)
    eps = float(label_smoothing)
    if eps and not vocab_size:
        raise Unsupported("vocab_parallel_local_grad: label smoothing needs the real vocab_size")
    x2 = rows_view("vocab_parallel_local_grad", logits.detach()) if out is logits else rows_2d(logits.detach())
    out2 = None if out is None else x2 if out is logits else rows_view("vocab_parallel_local_grad", out.detach())
    if grad_loss is None:  # a unit upstream gradient, one float broadcast to every row (stride 0)
        grad_loss = torch.ones((), dtype=torch.float32, device=x2.device).expand(x2.shape[0])
    dx = _backward(x2, labels.reshape(-1).contiguous(), lse.reshape(-1).float().contiguous(),
                   grad_loss.reshape(-1), int(vocab_start), int(ignore_index), n_real, 1.0 - eps,
                   eps / vocab_size if eps else 0.0, float(z_loss), out2)
    return dx.view(logits.shape)


def scale_rows_(grad, grad_loss):
    """grad (..., V) *= grad_loss (...) row by row, in place and in fp32 (the backward of the in-place
    scheme); returns grad."""
    check_float("scale_rows_", grad)
    check_device("scale_rows_", grad, grad_loss)
    g2 = rows_view("scale_rows_", grad)
    dl = grad_loss.reshape(-1)
    if dl.numel() != g2.shape[0]:
        raise Unsupported(f"scale_rows_: {dl.numel()} upstream gradients for {g2.shape[0]} rows")
    block = _block(g2.shape[1])
    _ce_scale_kernel[(g2.shape[0],)](g2, dl, g2.stride(0), dl.stride(0), g2.shape[1], BLOCK=block,
                                     num_warps=_warps(block))
    return grad
