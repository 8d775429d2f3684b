"""The token dispatcher of expert parallelism (docs/moe.md): the experts of a MoE layer are split over the
``ep`` ranks of the expert-parallel group (inside data parallelism, parallel_state.py), each holding the
contiguous range [ep_rank * E / ep, (ep_rank + 1) * E / ep), and every rank sends each of its routed
(token, expert) assignments to the rank that holds the expert, with all-to-all (Lepikhin et al. 2020,
GShard; Megatron-Core's MoEAlltoAllTokenDispatcher). Dropless: the splits vary from step to step.

Per micro-batch, on every rank of the group:
  1. tensor parallelism first, as LocalDispatcher does: under sequence parallelism the TP group's tokens,
     weights and map are all-gathered (each TP rank then routes the same tokens; the experts are
     TP-split, so the EP group of each TP rank exchanges its TP shard's share of the work);
  2. the assignments in global-expert order (tokens in order within an expert), so the rows bound for
     EP rank j are one contiguous block; the per-expert counts are exchanged first (a small all-to-all:
     every rank learns how many rows it receives for each of its experts from each peer, the one
     device-to-host synchronisation, which the grouped GEMM's CPU split sizes need anyway);
  3. the rows go out with a variable-split all-to-all and arrive grouped by source rank, then expert;
     a permutation regroups them by local expert (source order within an expert) for the grouped GEMM.
``combine`` runs the same steps backwards, then weights each row by its routing weight and sums it into
its token, and finishes the TP reduction (reduce-scatter under SP, all-reduce otherwise). The backward of
each all-to-all is the all-to-all with the splits swapped.

Every rank of an expert-parallel group runs the same micro-batches in the same pipeline schedule, so
their all-to-alls match one to one (recomputation included: the recomputed forward exchanges again).
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps

from .moe_experts import LocalDispatcher


def _all_to_all(x, out_splits, in_splits, group):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows [sum(in_splits), ...] -> [sum(out_splits), ...] over ``group``; the backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x, out_splits, in_splits, group):
    """Differentiable variable-split all-to-all (lists of row counts per rank of ``group``)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class AllToAllDispatcher(LocalDispatcher):
    """Dispatch and combine across the expert-parallel group (see the module docstring); the interface and
    the tensor-parallel steps are LocalDispatcher's (model/moe_experts.py)."""

    def __init__(self, num_experts, first_expert, num_local_experts, sequence_parallel, tp):
        super().__init__(num_experts, first_expert, num_local_experts, sequence_parallel, tp)
        self.ep, self.group = ps.get_ep_size(), ps.get_ep_group()

    def dispatch(self, hidden, probs, routing_map):
        """hidden [T, h], probs [T, E] (fp32, zero off the routing), routing_map [T, E] bool ->
        (rows for this rank's experts grouped by expert, tokens per local expert as a CPU int64 tensor)."""
        hidden, probs, routing_map = self.tensor_parallel_input(hidden, probs, routing_map)
        expert_index, token_index = routing_map.t().nonzero(as_tuple=True)  # global expert order
        weight = probs[token_index, expert_index]
        send = routing_map.sum(0)  # [E]: rows for each expert; rank j's experts are block j
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # [ep * local]: from each source, per expert
        send_cpu, recv_cpu = torch.stack([send, recv]).cpu().view(2, self.ep, self.local)  # one host sync
        in_splits, out_splits = send_cpu.sum(1).tolist(), recv_cpu.sum(1).tolist()
        rows = all_to_all(hidden[token_index], out_splits, in_splits, self.group)
        # Arrived as (source, expert) blocks; the grouped GEMM wants (expert, source).
        order = _regroup_index(recv_cpu).to(rows.device)
        self._state = (token_index, weight, hidden.shape, in_splits, out_splits, order)
        return rows[order], recv_cpu.sum(0)

    def combine(self, expert_output):
        token_index, weight, shape, in_splits, out_splits, order = self._state
        self._state = None
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        rows = all_to_all(expert_output[inverse], in_splits, out_splits, self.group)
        return self.weighted_sum(rows, weight, token_index, shape)


def _regroup_index(counts):
    """counts [sources, experts] (CPU) of rows laid out source-major -> the index that lists them
    expert-major, sources in order within an expert (one vectorised pass: no loop over the blocks)."""
    flat = counts.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(counts.shape).t().reshape(-1)  # each block, expert-major
    lengths = counts.t().reshape(-1)
    ends = torch.cumsum(lengths, 0)
    # Row i of the expert-major list is row (i - where its block starts there) + the block's start.
    return torch.arange(int(ends[-1]) if len(ends) else 0) + torch.repeat_interleave(starts - (ends - lengths), lengths)
