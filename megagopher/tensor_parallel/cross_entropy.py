"""Cross entropy over vocab-parallel logits, without gathering the full vocabulary (Megatron-LM).

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
vocabulary size are padding: they are excluded (set to -inf), so they receive neither probability mass nor
gradient; a slice that is all padding has m_r = -inf and s_r = 0 and adds nothing.

Label smoothing (Szegedy et al. 2016) mixes in the uniform distribution over the real vocabulary:
    loss = (1 - eps) * (lse - z[label]) + eps * (lse - mean_j z_j)
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import all_gather_single


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


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_size, label_smoothing, group, ignore_index):
        tp_rank = dist.get_rank(group) if group is not None else 0
        local_v = logits.shape[-1]
        start = tp_rank * local_v
        z = logits.float()
        real_cols = (torch.arange(start, start + local_v, device=z.device) < vocab_size)
        if start + local_v > vocab_size:  # this shard holds padding columns
            z = z.masked_fill(~real_cols, float("-inf"))
        zmax = z.max(dim=-1).values
        shift = zmax.masked_fill(zmax == float("-inf"), 0.0)  # an all-padding shard: exp(-inf - 0) = 0, no NaN
        exp_z = (z - shift.unsqueeze(-1)).exp()

        ignored = labels == ignore_index
        in_shard = (labels >= start) & (labels < start + local_v) & ~ignored
        local_labels = (labels - start).masked_fill(~in_shard, 0)
        target = torch.gather(z, -1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)
        sum_z = z.masked_fill(~real_cols, 0.0).sum(dim=-1) if label_smoothing > 0 else None
        loss, lse = _global_loss(zmax, exp_z.sum(dim=-1), target, sum_z, vocab_size, label_smoothing, group)
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp_z.mul_(torch.exp(shift - lse).unsqueeze(-1))  # exp(z - lse); padding columns stay 0
        ctx.save_for_backward(softmax, local_labels, in_shard, ignored, real_cols)
        ctx.label_smoothing, ctx.vocab_size, ctx.in_dtype = label_smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, in_shard, ignored, real_cols = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax
        onehot = torch.zeros_like(grad).scatter_(-1, local_labels.unsqueeze(-1), 1.0) * in_shard.unsqueeze(-1)
        grad = grad - (1 - eps) * onehot
        if eps > 0:
            grad = grad - (eps / ctx.vocab_size) * real_cols
        grad = grad * (grad_loss * ~ignored).unsqueeze(-1)
        return grad.to(ctx.in_dtype), None, None, None, None, None


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    """The same loss with this rank's part done by the fused Triton kernels (megagopher.kernels): one pass
    over the shard for (max, sum of exp, target logit, sum of logits), and a backward that recomputes the
    softmax blockwise from the global logsumexp instead of saving an fp32 softmax of the shard."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_size, label_smoothing, group, ignore_index):
        from megagopher.kernels.fused_cross_entropy import vocab_parallel_local_stats
        tp_rank = dist.get_rank(group) if group is not None else 0
        local_v = logits.shape[-1]
        start = tp_rank * local_v
        n_real = max(0, min(local_v, vocab_size - start))
        st = vocab_parallel_local_stats(logits, labels, start, n_real, ignore_index=ignore_index)
        sum_z = st.sum_logits if label_smoothing > 0 else None
        loss, lse = _global_loss(st.max, st.sum_exp, st.target, sum_z, vocab_size, label_smoothing, group)
        loss = loss.masked_fill(labels == ignore_index, 0.0)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (start, n_real, ignore_index, label_smoothing, vocab_size)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from megagopher.kernels.fused_cross_entropy import vocab_parallel_local_grad
        logits, labels, lse = ctx.saved_tensors
        start, n_real, ignore_index, eps, vocab_size = ctx.args
        grad = vocab_parallel_local_grad(logits, labels, start, lse, grad_loss.contiguous(), n_real,
                                         ignore_index=ignore_index, label_smoothing=eps, vocab_size=vocab_size)
        return grad, None, None, None, None, None


def _use_fused(logits):
    """The fused local part runs where the kernels' dispatch picks Triton for cross entropy (CUDA tensors
    under "auto"; CPU tensors under an explicit "triton", through the interpreter)."""
    from megagopher.kernels import dispatch
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return dispatch.resolve(logits, None, "cross_entropy")[0] == "triton"


def vocab_parallel_cross_entropy(logits, labels, vocab_size=None, label_smoothing=0.0, group=None,
                                 ignore_index=-100):
    """Per-token fp32 loss (shape of ``labels``) from logits sharded over the last dim across TP.

    ``vocab_size`` is the real vocabulary (columns at or beyond it are padding); by default every column
    is real. Labels equal to ``ignore_index`` give zero loss and zero gradient."""
    if group is None and ps.is_initialized():
        group = ps.get_tp_group()
    tp_size = dist.get_world_size(group) if group is not None else 1
    total = logits.shape[-1] * tp_size
    vocab_size = total if vocab_size is None else vocab_size
    if not 0 < vocab_size <= total:
        raise ValueError(f"vocab_parallel_cross_entropy: vocab_size {vocab_size} outside (0, {total}]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing = {label_smoothing} must be in [0, 1)")
    args = (logits, labels, vocab_size, float(label_smoothing), group, ignore_index)
    if _use_fused(logits):
        return _FusedVocabParallelCrossEntropy.apply(*args)
    return _VocabParallelCrossEntropy.apply(*args)
