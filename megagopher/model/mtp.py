"""Multi-token prediction (DeepSeek-V3 technical report, Liu et al. 2024, section 2.2; Gloeckle et al. 2024).

Module k (k = 1 .. D = model.mtp_num_layers) predicts token t_{i+k+1} at position i. It reads the previous
depth's representation h^{k-1} (h^0: the main model's final-normed output, the one the output head reads) and
the embedding of token t_{i+k}, and keeps the causal chain whole:
    h'^k = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1})]      (enorm, hnorm, eh_proj: 2h -> h, no bias)
    h^k  = final_norm_k(TRM_k(h'^k))                            (one transformer layer, global index L + k - 1)
    P^k  = OutHead(h^k)                                         (the model's own output head)
The concatenation puts the embedding first, as DeepSeek's published MTP weights (and Megatron-Core's
multi_token_prediction.py) use eh_proj. Each module has its final norm (the checkpoints' shared_head.norm);
the embedding and the output head are the model's. Module k's layer has the global index L + k - 1 (L =
model.num_layers): dense MLP or MoE by ``GPTConfig.is_moe_layer``, and the parameter names, hence the initial
values (invariant 1), are the same in every layout.

Loss_k is the cross entropy of P^k against t_{i+k+1}, averaged over the positions that have one: the last k
of a sequence do not, nor (under data.reset_attention_mask) a position whose t_{i+k} lies in another document.
The objective is LM loss + mtp_loss_weight / D * sum_k Loss_k. The MTP terms join the gradient through
``_AddMTPGrad`` (Megatron's MTPLossAutoScaler): an identity on the LM per-token loss whose backward gives
depth k's per-token losses the gradient ``MTPLosses.scales[k]``; the training loop sets it to weight / D / (the
global batch's depth-k targets) times the fp16 loss scale, so the terms are layout independent means, and the
LM per-token loss the schedules see is unchanged. Without the loop each micro-batch's own mean is used.

All D + 1 heads run as one GEMM and one cross entropy (the rows of every depth side by side in the batch
dimension), so the head weight has one use, one gradient and one ready mark for the data-parallel wrapper.

The shifted tokens and targets (``mtp_tokens``, ``mtp_labels``: [D, b, s]) are built on the whole sequence by
training/data.py before the context-parallel split (``shift_targets``); a forward given only labels derives
them from the labels (t_{i+k} = labels[i+k-1]), which needs the whole sequence on the rank (no CP).
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megagopher import parallel_state as ps
from megagopher.context_parallel import split_for_cp_rank
from megagopher.tensor_parallel import reduce_from_tp_region, set_init
from megagopher.tensor_parallel.cross_entropy import ZLoss
from megagopher.tensor_parallel.mappings import reduce_scatter_to_sp_region
from megagopher.tensor_parallel.weight_grad import store as weight_grad_store

IGNORE_INDEX = -100  # vocab_parallel_cross_entropy's default ignore_index (training/data.py uses the same)


# ---- targets ----------------------------------------------------------------------------------------------
def shift_targets(nexts, labels, depth, cu_seqlens=None, known=None, ignore_index=IGNORE_INDEX):
    """(mtp_tokens, mtp_labels), each [depth, b, s], for one micro-batch of whole sequences.

    ``nexts`` [b, s]: t_{i+1} at position i (the labels before loss masking); ``labels``: the LM labels
    (ignore_index where data.eod_mask_loss hides one); ``cu_seqlens``: the rows' document boundaries end to end
    (document masking), which no shift may cross; ``known`` [b, s] bool: which entries of ``nexts`` are real
    (None: all). mtp_tokens[k-1, :, i] = t_{i+k} (0 where there is none); mtp_labels[k-1, :, i] = labels[:, i+k],
    or ignore_index where position i has no depth-k target."""
    b, s = labels.shape
    tokens = nexts.new_zeros((depth, b, s))
    targets = labels.new_full((depth, b, s), ignore_index)
    doc = None
    if cu_seqlens is not None:
        flat = torch.arange(b * s, device=labels.device, dtype=cu_seqlens.dtype)
        doc = (torch.searchsorted(cu_seqlens, flat, right=True) - 1).view(b, s)
    for k in range(1, min(depth, s) + 1):
        tokens[k - 1, :, :s - k + 1] = nexts[:, k - 1:]
        if k == s:
            break
        target = labels[:, k:]
        keep = torch.ones_like(target, dtype=torch.bool)
        if doc is not None:  # position i and token t_{i+k} in the same document
            keep &= doc[:, :s - k] == doc[:, k:]
        if known is not None:  # the input token t_{i+k} itself must be known
            keep &= known[:, k - 1:s - 1]
        targets[k - 1, :, :s - k] = target.masked_fill(~keep, ignore_index)
    return tokens, targets


def mtp_batch(rows, labels, depth, cu_seqlens, cp_size, cp_rank, ignore_index):
    """training/data.py's extra micro-batch fields, from the host rows [b, s + 1] and the LM labels [b, s]
    (loss-masked, whole sequences): ``mtp_tokens``/``mtp_labels`` split for this CP rank (dim 2, as the tokens
    are) and ``mtp_loss_tokens`` (the targets of each depth, counted on the whole sequences)."""
    tokens, targets = shift_targets(rows[:, 1:], labels, depth, cu_seqlens, ignore_index=ignore_index)
    counts = [int(n) for n in (targets != ignore_index).sum((1, 2))]
    return {"mtp_tokens": split_for_cp_rank(tokens, cp_size, cp_rank, dim=2).contiguous(),
            "mtp_labels": split_for_cp_rank(targets, cp_size, cp_rank, dim=2).contiguous(),
            "mtp_loss_tokens": counts}


def mtp_inputs(microbatch):
    """The model inputs of multi-token prediction in a micro-batch (absent without it)."""
    return {k: microbatch[k] for k in ("mtp_tokens", "mtp_labels") if k in microbatch}


# ---- loss accounting ----------------------------------------------------------------------------------
class MTPLosses:
    """Each depth's gradient scale (``scales``: a list of D floats; None: weight / D over the micro-batch's own
    targets) and the sums of each depth's per-token losses since the last ``pop()`` (on the device)."""

    def __init__(self, scales=None):
        self.scales = None if scales is None else [float(v) for v in scales]
        self.total = None

    @classmethod
    def for_step(cls, cfg, counts, loss_scale=1.0):
        """The training step's scales: weight / D / (depth k's targets in the global batch) * loss scale."""
        d = cfg.mtp_num_layers
        return cls([loss_scale * cfg.mtp_loss_weight / d / max(float(n), 1.0) for n in counts])

    def record(self, sums):
        self.total = sums if self.total is None else self.total + sums

    def pop(self):
        total, self.total = self.total, None
        return total


def mtp_token_counts(mbatches, global_batch_size, seq_length, depth, device):
    """Depth k's targets in the global batch, for k = 1 .. depth: gbs * (s - k) when nothing is masked, else
    the data-parallel replicas' counts summed (one all-reduce; CP, TP and pipeline ranks counted the same
    whole sequences)."""
    if not any(key in mb for mb in mbatches for key in ("loss_tokens", "cu_seqlens")):
        return [global_batch_size * max(seq_length - k, 0) for k in range(1, depth + 1)]
    count = torch.tensor([sum(mb["mtp_loss_tokens"][k] for mb in mbatches) for k in range(depth)],
                         dtype=torch.float64, device=device)
    if ps.get_dp_size() > 1:
        dist.all_reduce(count, group=ps.get_dp_group())
    return count.tolist()


def attach_mtp_losses(chunks, losses):
    """Makes the MTP modules of ``chunks`` (wrapped or not) scale by and record into ``losses``."""
    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, MultiTokenPrediction):
                m.losses = losses


def mtp_step_summary(losses, counts, device):
    """{"mtp_loss": [Loss_1, .., Loss_D]}: each depth's mean over the global batch's targets. Collective over
    the world: the last stage's TP rank 0 of every CP rank and data-parallel replica holds a share."""
    total = losses.pop()
    owner = ps.is_pipeline_last_stage() and ps.get_tp_rank() == 0 if ps.is_initialized() else True
    sums = torch.zeros(len(counts), dtype=torch.float64, device=device)
    if owner and total is not None:
        sums += total.to(device=device, dtype=torch.float64)
    if dist.is_initialized() and ps.is_initialized():
        dist.all_reduce(sums)
    return {"mtp_loss": [float(v) / max(float(n), 1.0) for v, n in zip(sums.tolist(), counts)]}


class _AddMTPGrad(torch.autograd.Function):
    """Identity on the LM per-token loss; its backward gives depth k's per-token losses the gradient scales[k]."""

    @staticmethod
    def forward(ctx, lm_loss, mtp_loss, scales):
        ctx.save_for_backward(scales)
        ctx.shape = mtp_loss.shape
        return lm_loss.view_as(lm_loss)

    @staticmethod
    def backward(ctx, grad):
        (scales,) = ctx.saved_tensors
        return grad, scales.view(-1, 1, 1).to(grad.dtype).expand(ctx.shape), None


class _LeadingRowsZLoss(ZLoss):
    """Records the z-loss of the first ``rows`` batch columns only (the LM's): the logged z_loss stays the LM
    tokens', while the objective's z-loss covers every head pass, each weighted as its loss is."""

    def __init__(self, inner, rows):
        super().__init__(inner.coeff)
        self.inner, self.rows = inner, rows

    def record(self, per_token):
        self.inner.record(per_token[:, :self.rows])


@contextlib.contextmanager
def head_weight_grad_in_backward():
    """Zero-bubble's W pass would add the head's weight gradient after the embedding lookup's share of the same
    (tied) weight was marked ready: this keeps the head's dW in the B pass, beside the lookup's."""
    capturing, weight_grad_store.capturing = weight_grad_store.capturing, False
    try:
        yield
    finally:
        weight_grad_store.capturing = capturing


def embed_tokens(ids, weight, sequence_parallel):
    """Vocabulary-parallel lookup of ``ids`` [s, n] in ``weight`` (this TP rank's rows): [s(/tp), n, h],
    reduce-scattered along the sequence under SP as the model's embedding is."""
    tp = ps.get_tp_size()
    if tp == 1:
        return F.embedding(ids, weight)
    start = ps.get_tp_rank() * weight.shape[0]
    outside = (ids < start) | (ids >= start + weight.shape[0])
    out = F.embedding((ids - start).masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(-1), 0.0)
    return reduce_scatter_to_sp_region(out) if sequence_parallel else reduce_from_tp_region(out)


# ---- the modules ------------------------------------------------------------------------------------------
class MTPModule(nn.Module):
    """One depth: enorm, hnorm, eh_proj [h, 2h] (replicated over TP: each rank projects its own tokens under
    SP, its gradient then summed over TP like a norm's), one transformer layer, final_norm."""

    def __init__(self, cfg, sequence_parallel, layer_number, blocks):
        super().__init__()
        Norm, TransformerLayer = blocks  # the model's own (gpt.py builds this module and hands them over)
        self.enorm, self.hnorm = Norm(cfg, sequence_parallel), Norm(cfg, sequence_parallel)
        self.eh_proj = nn.Parameter(torch.empty(cfg.hidden_size, 2 * cfg.hidden_size))
        set_init(self.eh_proj, self.eh_proj.shape, std=cfg.init_std)
        self.eh_proj.sequence_parallel = sequence_parallel
        self.layer = TransformerLayer(cfg, sequence_parallel, False, layer_number)
        self.final_norm = Norm(cfg, sequence_parallel)

    def forward(self, h, emb, rope, cu_seqlens):
        x = F.linear(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1), self.eh_proj)
        return self.final_norm(self.layer(x, *rope, cu_seqlens=cu_seqlens))


class MultiTokenPrediction(nn.Module):
    """The D modules, keyed by their layers' global index (``layers.{L + k - 1}``), on the last pipeline stage;
    ``blocks``: the model's (Norm, TransformerLayer) classes.
    ``embedding``: the word embeddings' copy a last stage without them needs (pp > 1, untied), starting equal
    to them (same init name) and summed with them by distributed/finalize.py, as a tied head is."""

    def __init__(self, cfg, sequence_parallel, blocks, embedding_rows=None):
        super().__init__()
        self.cfg, self.sp = cfg, sequence_parallel
        self.layers = nn.ModuleDict({str(cfg.num_layers + k): MTPModule(cfg, sequence_parallel, cfg.num_layers + k,
                                                                        blocks) for k in range(cfg.mtp_num_layers)})
        if embedding_rows is not None:
            self.embedding = nn.Parameter(torch.empty(embedding_rows, cfg.hidden_size))
            set_init(self.embedding, (cfg.vocab_size, cfg.hidden_size), partition_dim=0, std=cfg.init_std,
                     init_name="embedding.word.weight")
            self.embedding.shared_embedding = True
        self.losses = MTPLosses()

    def forward(self, h, mtp_tokens, weight, rope, cu_seqlens=None):
        """[h^1, .., h^D] (each [s(/tp), b, hidden]) from h^0 = ``h`` and ``mtp_tokens`` [D, b, s]."""
        d, b, s = mtp_tokens.shape
        emb = embed_tokens(mtp_tokens.permute(2, 0, 1).reshape(s, d * b), weight, self.sp)  # one lookup for all
        emb = emb.view(emb.shape[0], d, b, -1)
        out = []
        for k, module in enumerate(self.layers.values()):
            h = module(h, emb[:, k], rope, cu_seqlens)
            out.append(h)
        return out

    def forward_loss(self, lm_x, labels, mtp_tokens, mtp_labels, weight, head, rope, cu_seqlens, cross_entropy,
                     z_loss=0.0):
        """The LM per-token loss [b, s] carrying the MTP terms' gradient. ``lm_x``: h^0; ``head(x)``: logits;
        ``cross_entropy(logits, labels, z_loss=)``: per-token losses, as the model computes its own."""
        d, b = self.cfg.mtp_num_layers, labels.shape[0]
        if mtp_tokens is None:
            mtp_tokens, mtp_labels = self._from_labels(labels, cu_seqlens)
        hidden = self(lm_x, mtp_tokens, weight, rope, cu_seqlens)  # a call: the wrapper's hooks run
        logits = head(torch.cat([lm_x] + hidden, dim=1))  # [s, (D + 1) b, vocab / tp]
        all_labels = torch.cat([labels, mtp_labels.reshape(d * b, -1)], dim=0)
        if isinstance(z_loss, ZLoss):  # the logged z-loss: the LM tokens'
            z_loss = _LeadingRowsZLoss(z_loss, b)
        loss = cross_entropy(logits, all_labels.t(), z_loss=z_loss).t()  # [(D + 1) b, s]
        lm, mtp = loss[:b], loss[b:].view(d, b, -1)
        if torch.is_grad_enabled() and self.training:
            self.losses.record(mtp.detach().float().sum((1, 2)))
        if not mtp.requires_grad:
            return lm
        if self.losses.scales is not None:
            scales = torch.tensor(self.losses.scales, dtype=torch.float32, device=lm.device)
        else:
            counts = (mtp_labels != IGNORE_INDEX).sum((1, 2)).clamp_min(1).float()
            scales = self.cfg.mtp_loss_weight / d / counts
        return _AddMTPGrad.apply(lm, mtp, scales)

    def _from_labels(self, labels, cu_seqlens):
        if ps.get_cp_size() > 1:
            raise ValueError("multi-token prediction under context parallelism needs the micro-batch's mtp_tokens "
                             "and mtp_labels (training/data.py microbatches(mtp_depth=...)): a CP rank's labels "
                             "are not whole sequences")
        known = labels != IGNORE_INDEX
        return shift_targets(labels.masked_fill(~known, 0), labels, self.cfg.mtp_num_layers, cu_seqlens, known)
