"""The gradient reductions that follow a forward-backward pass, in one place.

1. Sequence parallelism: replicated parameters (norm weights, row-parallel biases, learned positions)
   saw only this rank's sequence chunk, so their gradients are partial sums: all-reduce over TP.
2. Tied embeddings across pipeline stages: the first stage's word embeddings and the last stage's
   output-head copy are one parameter; summing their gradients over the embedding group keeps both copies
   equal after every optimizer step (invariant 1 made them start equal).
Data-parallel reduction of the gradients is the data-parallel wrapper's business (distributed/ddp.py):
its ``finish_grad_sync`` runs first, then these two work on ``main_grad``. With the distributed optimizer
only this rank's shards of main_grad are reduced at that point; summing whole gradients over TP or the
embedding group is still right for those shards, because TP peers share a buffer layout and the tied
embedding sits alone at the start of a bucket of the same size on both stages (param_and_grad_buffer.py).
Unwrapped models (plain ``.grad``) work too.
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import unwrap_model


def _grad(p):
    return p.main_grad if getattr(p, "main_grad", None) is not None else p.grad


def _all_reduce_coalesced(grads, group):
    """One all-reduce for a list of gradients (flatten, reduce, copy back)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def finalize_model_grads(model_chunks):
    """Sums sequence-parallel replicated gradients over TP and tied-embedding gradients over the embedding
    group. Collective over those groups: every rank calls it after its backward passes."""
    for chunk in model_chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync()
    model_chunks = [unwrap_model(chunk) for chunk in model_chunks]
    if not ps.is_initialized():
        return
    if ps.get_tp_size() > 1:
        sp_grads = [_grad(p) for m in model_chunks for p in m.parameters()
                    if getattr(p, "sequence_parallel", False) and _grad(p) is not None]
        _all_reduce_coalesced(sp_grads, ps.get_tp_group())
    if ps.get_pp_size() > 1 and ps.get_embedding_group() is not None:
        tied = [p for m in model_chunks for p in tied_embedding_params(m)]
        for p in tied:
            if _grad(p) is None:
                p.grad = torch.zeros_like(p)
        _all_reduce_coalesced([_grad(p) for p in tied], ps.get_embedding_group())


def tied_embedding_params(model):
    """The word-embedding weight (first stage) or the last stage's copy of it: the tied output head, or the
    multi-token prediction modules' embedding (model/mtp.py) of an untied model."""
    model = unwrap_model(model)
    if not (model.cfg.tie_embeddings or model.cfg.mtp_num_layers):
        return []
    if model.pre_process:
        return [model.embedding.word.weight]
    if model.post_process:
        return [model.output_layer if model.cfg.tie_embeddings else model.mtp.embedding]
    return []

