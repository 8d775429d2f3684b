"""The global gradient norm over every shard of the model, each parameter counted once (invariant 4),
and clipping by it.

A tensor-parallel shard is counted on every TP rank (each holds a different piece); a parameter replicated
over TP is counted on TP rank 0 only; the last pipeline stage's copy of tied embeddings is not counted
(the first stage's is). The squared sums are then all-reduced over the model-parallel group (TP x PP),
and, when each data-parallel rank holds only a shard of the gradients (ZeRO-1), over DP too.
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps


def counts_once(param):
    """True when this rank is the one that counts ``param`` in norms and parameter counts."""
    if getattr(param, "shared_embedding", False):
        return False
    if getattr(param, "tensor_model_parallel", False):
        return True
    return ps.get_tp_rank() == 0


def global_norm(tensors_to_count, extra_groups=()):
    """L2 norm of the given tensors summed over the model-parallel group (and ``extra_groups``)."""
    device = tensors_to_count[0].device if tensors_to_count else ps.get_device()
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors_to_count:
        sq += t.detach().float().pow(2).sum()
    if ps.is_initialized():
        groups = [ps.get_model_parallel_group(), *extra_groups]
        for g in groups:
            if dist.get_world_size(g) > 1:
                dist.all_reduce(sq, group=g)
    return sq.sqrt()


def clip_by_norm(grads, norm, max_norm):
    """Scales ``grads`` in place so that their global norm is at most ``max_norm``; returns the factor."""
    if max_norm <= 0:
        return 1.0
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor)
    return float(factor)
