"""Cross entropy over vocab-parallel logits, without gathering the full vocabulary (Megatron-LM), with the
gradient computed in the forward (Liger-Kernel's scheme) and PaLM's z-loss.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary. The loss
    loss = logsumexp(z) - z[label]
needs, per token, the logsumexp over every rank's slice and the target logit (which lives on exactly one
rank). Megatron reduces the max, the sum of exp(z - max) and the target logit in three all-reduces, one
after the other (the sum needs the global max). Here each rank computes its slice's own statistics, the
max m_r, s_r = sum of exp(z - m_r) and its share of the target logit (and, with label smoothing, of the
sum of the logits), and one all-gather of these few floats per token replaces the all-reduces: every rank
then combines them in the same order,
    M = max_r m_r,   logsumexp = M + log sum_r s_r exp(m_r - M),   target = sum_r target_r,
which is the serial value to rounding (tp = 1 runs the same formula). Columns at or past the real
vocabulary size are padding: they are excluded, so they receive neither probability mass nor gradient; a
slice that is all padding has m_r = -inf and s_r = 0, adds nothing, and gets a zero gradient (256 ids at the
default multiple of 128 pad to 512 at tp 4, so ranks 2 and 3 hold such slices; tests/test_vocab_padding.py).

Label smoothing (Szegedy et al. 2016) mixes in the uniform distribution over the real vocabulary:
    loss = (1 - eps) * (lse - z[label]) + eps * (lse - mean_j z_j)
z-loss (PaLM, Chowdhery et al. 2022, section 5) adds z_loss * lse^2 per token to the objective, pushing the
softmax normaliser towards 1; its gradient is 2 z_loss lse softmax(z).

Once the global logsumexp is known, the forward writes d objective_t / d z (for a unit upstream gradient)
over this rank's shard, in the logits' dtype, computed in fp32 (blockwise in the Triton kernel, in row
chunks in PyTorch); the backward only scales each row by its upstream gradient, in place, and hands that
buffer on as the logits' gradient. So the loss never holds a second logits-sized buffer, nor an fp32 copy
of one. That destroys the logits, which is safe only where nothing reads them afterwards (the model's loss):
``inplace_backward=True`` asks for it, and the Function marks the logits dirty, so autograd's version
counter reports any later use. Without it the gradient goes to a new buffer, and the logits are untouched.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import all_gather_single

# Rows of a torch-path chunk: its fp32 temporaries hold about this many elements (16 MiB each), a bounded
# workspace instead of an fp32 copy of the whole shard.
CHUNK_ELEMENTS = 1 << 22
# The forward stores the gradient before the upstream gradient (and with it the fp16 loss scale) is known:
# in fp16, a probability below 6e-5 would be subnormal and one below 6e-8 would vanish. So fp16 stores
# 2^12 times the gradient (|values| <= 4096 (1 + 2 z_loss lse), far from 65504) and the backward divides
# it out; exact, being a power of two. bf16 and fp32 have fp32's exponent range and store it as is.
GRAD_PREFACTOR = {torch.float16: 4096.0}


class ZLoss:
    """The z-loss coefficient, and the sum over the tokens seen since the last ``pop()`` of the z-loss
    term coeff * lse^2 (ignored tokens excluded), kept on the device for logging."""

    def __init__(self, coeff):
        self.coeff, self.total = float(coeff), None

    def record(self, per_token):
        total = per_token.detach().float().sum()
        self.total = total if self.total is None else self.total + total

    def pop(self):
        total, self.total = self.total, None
        return 0.0 if total is None else float(total)


class _Spec(NamedTuple):
    vocab_size: int
    label_smoothing: float
    group: object
    ignore_index: int
    z_loss: float
    inplace: bool
    fused: bool
    prefactor: float  # the stored gradient is this multiple of the true one (GRAD_PREFACTOR)


def _combine(local, group):
    """The global logsumexp [N] and the summed remaining rows [k - 2, N] from this rank's statistics
    ``local`` [k, N] (max, sum of exp(z - max), then rows that add up over ranks): one all-gather."""
    n = dist.get_world_size(group) if group is not None else 1
    local = local.contiguous()
    if n > 1:
        gathered = torch.empty((n * local.shape[0], local.shape[1]), dtype=local.dtype, device=local.device)
        all_gather_single(gathered, local, group=group)  # gloo wants the [n * k, N] shape
        gathered = gathered.view(n, *local.shape)
    else:
        gathered = local.unsqueeze(0)
    m, s = gathered[:, 0], gathered[:, 1]
    gmax = m.max(dim=0).values
    lse = gmax + (s * torch.exp(m - gmax)).sum(dim=0).log()
    return lse, gathered[:, 2:].sum(dim=0)


def _global_loss(zmax, sum_exp, target, sum_z, vocab_size, label_smoothing, group):
    """(loss, lse) of every token from this rank's per-token statistics (``sum_z`` None without smoothing)."""
    rows = [zmax, sum_exp, target] + ([sum_z] if sum_z is not None else [])
    lse, sums = _combine(torch.stack([r.reshape(-1) for r in rows]), group)
    lse = lse.view(zmax.shape)
    loss = lse - sums[0].view(zmax.shape)
    if sum_z is not None:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - sums[1].view(zmax.shape) / vocab_size)
    return loss, lse


def _chunks(x2):
    step = max(1, CHUNK_ELEMENTS // max(1, x2.shape[1]))
    return [slice(r, r + step) for r in range(0, x2.shape[0], step)]


def _torch_local_stats(x2, labels, start, n_real, smoothing):
    """(max, sum of exp, target logit, sum of logits or None) of each row of this shard's real columns."""
    m = x2.shape[0]
    stats = torch.zeros((4, m), dtype=torch.float32, device=x2.device)
    stats[0] = float("-inf")  # a shard of padding only: no mass (s = 0), no target
    if n_real == 0:
        return stats[0], stats[1], stats[2], stats[3] if smoothing else None
    local = labels - start
    in_shard = (local >= 0) & (local < n_real)
    local = local.clamp(0, n_real - 1)
    for rows in _chunks(x2):
        z = x2[rows, :n_real].float()  # the chunk's fp32 copy (z itself for fp32 logits: never written)
        zmax = z.max(dim=-1).values
        shift = zmax.masked_fill(zmax == float("-inf"), 0.0)  # a row of -inf logits: exp(-inf - 0) = 0, no NaN
        stats[0, rows], stats[1, rows] = zmax, (z - shift.unsqueeze(-1)).exp_().sum(dim=-1)
        stats[2, rows] = z.gather(-1, local[rows].unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard[rows], 0.0)
        if smoothing:
            stats[3, rows] = z.sum(dim=-1)
    return stats[0], stats[1], stats[2], stats[3] if smoothing else None


def _torch_write_grad(x2, out2, labels, start, n_real, lse, spec):
    """out2 = d objective / d z for a unit upstream gradient, chunk by chunk (out2 may be x2)."""
    if n_real == 0:  # a shard of padding only (vocab 256 at tp 4 pads to 512): no mass, so no gradient
        out2.zero_()
        return
    eps, keep = spec.label_smoothing, (labels != spec.ignore_index).unsqueeze(-1)
    local = labels - start
    in_shard = (local >= 0) & (local < n_real) & keep.squeeze(-1)
    for rows in _chunks(x2):
        lse_r = lse[rows].unsqueeze(-1)
        z = x2[rows, :n_real].float()
        # softmax as exp(z - max) * exp(max - lse), in the order of operations this path has always had: CPU
        # runs keep their trajectories to the bit (a key bias, whose gradient is exactly 0 in exact arithmetic,
        # trains on rounding noise under Adam, and tests compare such runs).
        shift = z.max(dim=-1, keepdim=True).values
        shift = shift.masked_fill(shift == float("-inf"), 0.0)
        grad = (z - shift).exp_().mul_((shift - lse_r).exp())  # with z, the chunk's only fp32 temporaries
        if spec.z_loss:
            grad.mul_(1.0 + 2.0 * spec.z_loss * lse_r)
        hit = in_shard[rows].nonzero().squeeze(-1)
        grad[hit, local[rows][hit]] -= 1.0 - eps
        if eps:
            grad.sub_(eps / spec.vocab_size)
        grad.mul_(keep[rows] * spec.prefactor)
        out2[rows, :n_real].copy_(grad)
        out2[rows, n_real:].zero_()


def _torch_scale_rows_(g2, grad_loss):
    for rows in _chunks(g2):
        g2[rows].copy_(g2[rows].float().mul_(grad_loss[rows].unsqueeze(-1)))


def _local_part(x2, labels, start, n_real, spec):
    if spec.fused:
        from megagopher.kernels.fused_cross_entropy import vocab_parallel_local_stats
        st = vocab_parallel_local_stats(x2, labels, start, n_real, ignore_index=spec.ignore_index)
        return st.max, st.sum_exp, st.target, st.sum_logits if spec.label_smoothing > 0 else None
    return _torch_local_stats(x2, labels, start, n_real, spec.label_smoothing > 0)


def _write_grad(x2, out2, labels, start, n_real, lse, spec):
    if not spec.fused:
        return _torch_write_grad(x2, out2, labels, start, n_real, lse, spec)
    from megagopher.kernels.fused_cross_entropy import vocab_parallel_local_grad
    prefactor = torch.full((), spec.prefactor, dtype=torch.float32, device=x2.device).expand(x2.shape[0])
    vocab_parallel_local_grad(x2, labels, start, lse, prefactor, n_real, ignore_index=spec.ignore_index,
                              label_smoothing=spec.label_smoothing, vocab_size=spec.vocab_size,
                              z_loss=spec.z_loss, out=out2)


def _loss_and_lse(x2, labels, spec):
    """Per-row loss (0 on ignored rows) and global logsumexp of this rank's (rows, V_local) shard."""
    tp_rank = dist.get_rank(spec.group) if spec.group is not None else 0
    start = tp_rank * x2.shape[1]
    n_real = max(0, min(x2.shape[1], spec.vocab_size - start))
    zmax, sum_exp, target, sum_z = _local_part(x2, labels, start, n_real, spec)
    loss, lse = _global_loss(zmax, sum_exp, target, sum_z, spec.vocab_size, spec.label_smoothing, spec.group)
    return loss.masked_fill(labels == spec.ignore_index, 0.0), lse, start, n_real


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Returns (loss, lse[, logits]): the per-token cross entropy, the global logsumexp (not differentiable),
    and, in place, the logits, which then hold the gradient (returned because autograd requires a dirty
    tensor among the outputs; any use of it afterwards is refused). The gradient handed back is that of
    cross entropy + z_loss * lse^2 (the objective) while the loss value is the cross entropy alone: the
    logged loss stays the LM loss, and the z-loss term is reported beside it (ZLoss)."""

    @staticmethod
    def forward(ctx, logits, labels, spec):
        from megagopher.kernels.fused_cross_entropy import rows_2d, rows_view
        x2 = rows_view("vocab_parallel_cross_entropy", logits) if spec.inplace else rows_2d(logits)
        flat_labels = labels.reshape(-1)
        loss, lse, start, n_real = _loss_and_lse(x2, flat_labels, spec)
        grad = x2 if spec.inplace else torch.empty_like(x2)
        _write_grad(x2, grad, flat_labels, start, n_real, lse, spec)
        ctx.set_materialize_grads(False)  # an unused output must not cost a logits-sized tensor of zeros
        ctx.spec, ctx.shape, ctx.consumed = spec, logits.shape, False
        lse = lse.view(labels.shape)
        ctx.mark_non_differentiable(lse)
        if not spec.inplace:
            ctx.grad_buffer = grad
            return loss.view(labels.shape), lse
        ctx.mark_dirty(logits)
        ctx.save_for_backward(logits)  # saved as an output: a later in-place change of it fails the backward
        return loss.view(labels.shape), lse, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, *grad_overwritten):
        if grad_overwritten and grad_overwritten[0] is not None:
            raise RuntimeError("vocab_parallel_cross_entropy(inplace_backward=True) overwrote the logits with "
                               "the loss's gradient; nothing may use them afterwards")
        if ctx.consumed:
            raise RuntimeError("vocab_parallel_cross_entropy: the gradient buffer is scaled in place by the "
                               "first backward; a second backward through the same loss (retain_graph) is "
                               "not supported")
        ctx.consumed = True
        if grad_loss is None:
            return None, None, None
        grad = ctx.saved_tensors[0].detach() if ctx.spec.inplace else ctx.grad_buffer
        dl = grad_loss.reshape(-1).float() / ctx.spec.prefactor
        if ctx.spec.fused:
            from megagopher.kernels.fused_cross_entropy import scale_rows_
            scale_rows_(grad.view(-1, grad.shape[-1]), dl)
        else:
            _torch_scale_rows_(grad.view(-1, grad.shape[-1]), dl)
        return grad.view(ctx.shape), None, None


def _no_grad_loss(logits, labels, spec):
    """Evaluation (no gradient wanted): the loss and lse only; nothing is written."""
    from megagopher.kernels.fused_cross_entropy import rows_2d
    loss, lse, _, _ = _loss_and_lse(rows_2d(logits.detach()), labels.reshape(-1), spec)
    return loss.view(labels.shape), lse.view(labels.shape)


def _use_fused(logits):
    """The fused local part runs where the kernels' one backend decision picks Triton for cross entropy
    (dispatch.runs_triton: CUDA tensors under "auto"; CPU tensors under an explicit "triton", through the
    interpreter; a dtype the kernels do not take stays on PyTorch)."""
    from megagopher.kernels import dispatch
    return dispatch.runs_triton(logits, "cross_entropy")


def _writable(logits):
    """Whether the gradient may overwrite ``logits``: an intermediate (a leaf's values belong to its owner,
    and autograd refuses to modify one in place), not a view (autograd routes an in-place change of a view
    through its base, a base-sized gradient, and refuses it for a Function of several outputs), that is one
    (rows, V) view of its storage. The model's logits, a linear's output, are."""
    from megagopher.kernels.dispatch import Unsupported
    from megagopher.kernels.fused_cross_entropy import rows_view
    if logits.is_leaf or logits._base is not None:
        return False
    try:
        rows_view("vocab_parallel_cross_entropy", logits)
        return True
    except Unsupported:
        return False


def vocab_parallel_cross_entropy(logits, labels, vocab_size=None, label_smoothing=0.0, group=None,
                                 ignore_index=-100, z_loss=0.0, inplace_backward=False):
    """Per-token fp32 loss (shape of ``labels``) from logits sharded over the last dim across TP.

    ``vocab_size`` is the real vocabulary (columns at or beyond it are padding); by default every column
    is real. Labels equal to ``ignore_index`` give zero loss and zero gradient. ``z_loss``: PaLM's
    coefficient, a number or a ZLoss (which also records every token's term, for logging); the term's
    gradient is added to the logits' gradient, its value is not added to the loss returned.
    ``inplace_backward``: the gradient overwrites the logits (module docstring); a leaf, a view, or a layout
    that is not one (rows, V) view gets a new buffer instead. Without a gradient to compute nothing is written."""
    if group is None and ps.is_initialized():
        group = ps.get_tp_group()
    tp_size = dist.get_world_size(group) if group is not None else 1
    total = logits.shape[-1] * tp_size
    vocab_size = total if vocab_size is None else vocab_size
    if not 0 < vocab_size <= total:
        raise ValueError(f"vocab_parallel_cross_entropy: vocab_size {vocab_size} outside (0, {total}]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing = {label_smoothing} must be in [0, 1)")
    recorder = z_loss if isinstance(z_loss, ZLoss) else None
    coeff = recorder.coeff if recorder is not None else float(z_loss or 0.0)
    if not 0.0 <= coeff < float("inf"):
        raise ValueError(f"z_loss = {coeff} must be a finite number >= 0")
    wants_grad = torch.is_grad_enabled() and logits.requires_grad
    spec = _Spec(vocab_size, float(label_smoothing), group, int(ignore_index), coeff,
                 bool(inplace_backward) and wants_grad and _writable(logits),
                 logits.numel() > 0 and _use_fused(logits),  # no tokens: the kernels refuse empty input
                 GRAD_PREFACTOR.get(logits.dtype, 1.0))
    if not wants_grad:
        return _no_grad_loss(logits, labels, spec)[0]
    loss, lse = _VocabParallelCrossEntropy.apply(logits, labels, spec)[:2]
    if recorder is not None and coeff:
        recorder.record((coeff * lse.square()).masked_fill(labels == ignore_index, 0.0))
    return loss
