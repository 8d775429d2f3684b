"""The global gradient norm over every shard of the model, each parameter counted once (invariant 4),
and clipping by it.

A tensor-parallel shard is counted on every TP rank (each holds a different piece); a parameter replicated
over TP is counted on TP rank 0 only; the last pipeline stage's copy of tied embeddings is not counted
(the first stage's is). The squared sums are then all-reduced over the model-parallel group (TP x PP),
and, when each data-parallel rank holds only a shard of the gradients (ZeRO-1), over DP too. Expert
parameters under expert parallelism are a part of their own (``global_norm_of_parts``): every rank of an
expert-parallel group counts its own experts, summed over that group (and over expert DP under ZeRO-1).
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
    return global_norm_of_parts([(tensors_to_count, extra_groups)])


def global_norm_of_parts(parts):
    """L2 norm of [(tensors, extra_groups), ...]: each part's squares summed over the model-parallel group
    and its own extra groups, then the parts added (every rank passes the same number of parts)."""
    total = None
    for tensors, extra_groups in parts:
        device = tensors[0].device if tensors else ps.get_device()
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for t in tensors:
            sq += t.detach().float().pow(2).sum()
        if ps.is_initialized():
            for g in [ps.get_model_parallel_group(), *extra_groups]:
                if dist.get_world_size(g) > 1:
                    dist.all_reduce(sq, group=g)
        total = sq if total is None else total + sq
    return total.sqrt()


def clip_by_norm(grads, norm, max_norm):
    """Scales ``grads`` in place so that their global norm is at most ``max_norm``; returns the factor."""
    if max_norm <= 0:
        return 1.0
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor)
    return float(factor)
