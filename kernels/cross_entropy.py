"""Cross entropy from logits, per token in fp32, forward and backward, for vocabularies of any size.

Forward: one program per row streams the vocabulary in blocks keeping a running max and a running sum of
exp(logit - max) (the online softmax normaliser of Milakov & Gimelshein 2018), so the row never has to fit
in registers; loss = logsumexp - logit[label], and the logsumexp (one fp32 per row) is saved. Backward:
recomputes softmax blockwise from that logsumexp, d logits = (softmax - onehot(label)) * d loss, written
straight in the logits' dtype: no fp32 softmax of the whole vocabulary is ever stored. Labels equal to
ignore_index give 0 loss and 0 gradient; other labels outside [0, V) are the caller's bug and are not
checked (a check would cost a device sync per step): their row gets loss = logsumexp.

The same two kernels serve the local part of a vocab-parallel cross entropy (Megatron, Shoeybi et al.
2019): with ``vocab_start`` the shard's first id, they return per-row max, sum of exp and the target
logit (0 when the label lies in another shard), and take back the global logsumexp for the gradient.
"""
import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_nonempty, new_empty, next_pow2, rows_2d
from .dispatch import Unsupported, interpreter_on


@triton.jit
def _ce_fwd_kernel(X, LABELS, LOSS, LSE, MAX, SUMEXP, TARGET, stride_x, V, vocab_start, ignore_index,
                   LOCAL_STATS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK)
    m = float("-inf")
    l = 0.0
    for start in range(0, V, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))  # finite from the first block on: it holds logit 0
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    label = tl.load(LABELS + row).to(tl.int64)
    local = label - vocab_start
    in_shard = (label != ignore_index) & (local >= 0) & (local < V)
    target = tl.load(x_row + local, mask=in_shard, other=0.0).to(tl.float32)
    if LOCAL_STATS:
        tl.store(MAX + row, m)
        tl.store(SUMEXP + row, l)
        tl.store(TARGET + row, target)
    else:
        lse = m + tl.log(l)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(label == ignore_index, 0.0, lse - target))


@triton.jit
def _ce_bwd_kernel(X, LABELS, LSE, DLOSS, DX, stride_x, stride_dx, stride_dl, V, vocab_start, ignore_index,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    dl = tl.where(label == ignore_index, 0.0, tl.load(DLOSS + row * stride_dl).to(tl.float32))
    lse = tl.load(LSE + row)
    local = label - vocab_start
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(X + row * stride_x + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)) * dl
        tl.store(DX + row * stride_dx + cols, grad.to(DX.dtype.element_ty), mask=cols < V)


def _block(v):
    # 4096 logits per step on a GPU; 128 under the interpreter so a test vocabulary of a few hundred
    # ids crosses several blocks.
    return min(next_pow2(v), 128 if interpreter_on() else 4096)


def _backward(x2, labels, lse, dloss, vocab_start, ignore_index):
    m, v = x2.shape
    dx = new_empty((m, v), x2.dtype, x2.device)
    block = _block(v)
    _ce_bwd_kernel[(m,)](x2, labels, lse, dloss, dx, x2.stride(0), dx.stride(0), dloss.stride(0), v,
                         vocab_start, ignore_index, BLOCK=block, num_warps=8 if block >= 2048 else 4)
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
        _ce_fwd_kernel[(m,)](x2, flat_labels, loss, lse, lse, lse, lse, x2.stride(0), v, 0, ignore_index,
                             LOCAL_STATS=False, BLOCK=block, num_warps=8 if block >= 2048 else 4)
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
