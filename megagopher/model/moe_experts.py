"""The experts of a MoE layer as grouped GEMMs, and the token dispatcher that feeds them (docs/moe.md).

Experts: one parameter per matrix, (num_local_experts, out, in), tensor-parallel as MLP's fc1/fc2 are:
fc1 column-parallel (split along its output rows, dim 1; under SwiGLU the rows interleave gate and up
channel by channel as MLP's do, so every TP shard holds whole gate/up pairs), fc2 row-parallel (split along
its input columns, dim 2). fc2's per-expert bias would be added once per TP rank to partial sums, so only
TP rank 0 adds it; its gradient (zero elsewhere) is summed over TP by finalize (marked like a sequence-
parallel parameter), which keeps every rank's copy equal.

The dispatcher's interface is the one expert parallelism needs: ``dispatch(hidden, probs, routing_map) ->
(expert_input, tokens_per_expert)`` (the rows of this rank's experts, grouped by expert, in token order
within an expert) and ``combine(expert_output) -> hidden`` (each row weighted by its routing weight and
summed back to its token). ``LocalDispatcher`` communicates only over TP: the experts are tensor-parallel,
so under sequence parallelism it all-gathers the tokens, weights and map (the weights' gradient is
reduce-scattered: each rank's is partial) and reduce-scatters the combined output; without it the tokens
are replicated, the input's gradient and the weights' are all-reduced and the output all-reduced.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.tensor_parallel import (copy_to_tp_region, gather_from_sp_region, reduce_from_tp_region,
                                        reduce_scatter_to_sp_region, set_init)
from megagopher.tensor_parallel.mappings import gather_sequence


class _ExpertLinear(nn.Module):
    """weight (local experts, out / tp or out, in / tp or in) and an optional bias (local experts, out-shard):
    experts [first, first + local) of ``total``. ``full_shape`` and ``expert_first`` say where the local
    block sits in the whole (total, out, in) tensor, which initialisation and checkpoints work on (the
    whole tensor's draw does not depend on the layout; tensor_parallel.layers.take_shard cuts it)."""

    def __init__(self, experts, out_features, in_features, split_dim, bias, init_std, tp):
        super().__init__()
        total, first, count = experts
        shape = [total, out_features, in_features]
        if shape[split_dim] % tp:
            raise ValueError(f"MoE experts: dimension {shape[split_dim]} of the expert weight {tuple(shape)} "
                             f"is not divisible by tp {tp}")
        local = [count] + shape[1:]
        local[split_dim] //= tp
        self.weight = nn.Parameter(torch.empty(*local))
        set_init(self.weight, shape, partition_dim=split_dim, std=init_std)
        self.bias = None
        if bias:
            bias_split = 1 if split_dim == 1 else None
            self.bias = nn.Parameter(torch.empty(count, local[1]))
            set_init(self.bias, (total, out_features), partition_dim=bias_split, fill=0.0)
            # A row-parallel bias is added on TP rank 0 only: sum its gradient over TP (finalize.py).
            self.bias.sequence_parallel = bias_split is None and tp > 1
        for p in self.parameters():
            p.expert_first = first

    def forward(self, x, tokens_per_expert, add_bias=True):
        """x [N, in] grouped by expert -> [N, out]. A call, not a method, so ZeRO-1's forward pre-hook (the
        wait for this module's parameters' all-gather) runs first."""
        y = kernels.grouped_mm(x, self.weight, tokens_per_expert)
        if self.bias is not None and add_bias:
            rows = self.bias.repeat_interleave(tokens_per_expert.to(self.bias.device), dim=0,
                                               output_size=x.shape[0])
            y = y + rows
        elif self.bias is not None:  # a zero gradient, not None: finalize's TP sum needs it on every rank
            y = y + 0.0 * self.bias.sum()
        return y


class GroupedExperts(nn.Module):
    """num_local_experts MLPs (fc1, activation, fc2) applied to the rows of each expert."""

    def __init__(self, cfg, experts, num_layers_total, tp):
        """``experts``: (total, first, local), the local experts being [first, first + local)."""
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.approximate = "none" if cfg.activation == "gelu_exact" else "tanh"
        ffn, h = cfg.moe_ffn_hidden_size, cfg.hidden_size
        self.tp = tp
        self.fc1 = _ExpertLinear(experts, 2 * ffn if self.swiglu else ffn, h, 1, cfg.bias,
                                 cfg.init_std, tp)
        self.fc2 = _ExpertLinear(experts, h, ffn, 2, cfg.bias,
                                 cfg.init_std / (2 * num_layers_total) ** 0.5, tp)

    def forward(self, x, tokens_per_expert):
        """x [N, h] grouped by expert (``tokens_per_expert`` rows each, a CPU int64 tensor) -> [N, h]."""
        y = self.fc1(x, tokens_per_expert)
        if self.swiglu:
            y = kernels.swiglu(y[..., 0::2], y[..., 1::2])
        else:
            y = F.gelu(y, approximate=self.approximate)
        return self.fc2(y, tokens_per_expert, add_bias=self.tp == 1 or ps.get_tp_rank() == 0)


class LocalDispatcher:
    """Dispatch and combine without expert parallelism (see the module docstring); its tensor-parallel
    steps are AllToAllDispatcher's too (model/moe_dispatch.py)."""

    def __init__(self, num_experts, first_expert, num_local_experts, sequence_parallel, tp):
        self.num_experts, self.first, self.local = num_experts, first_expert, num_local_experts
        self.sp, self.tp = sequence_parallel and tp > 1, tp
        self._state = None

    def tensor_parallel_input(self, hidden, probs, routing_map):
        """The TP group's tokens, weights and map on every TP rank (the experts are TP-split)."""
        if self.sp:
            hidden, probs = gather_from_sp_region(hidden), gather_from_sp_region(probs)
            routing_map = gather_sequence(routing_map.to(torch.uint8), ps.get_tp_group()).bool()
        elif self.tp > 1:
            hidden, probs = copy_to_tp_region(hidden), copy_to_tp_region(probs)
        return hidden, probs, routing_map

    def weighted_sum(self, rows, weight, token_index, shape):
        """Each row times its routing weight, summed into its token (fp32), then the TP reduction of the
        experts' partial sums."""
        weighted = rows.float() * weight.unsqueeze(-1)
        out = torch.zeros(shape, dtype=torch.float32, device=rows.device)
        # index_put (not index_add, which keeps its [rows, h] source for the backward) keeps only the index.
        out = out.index_put((token_index,), weighted, accumulate=True).to(rows.dtype)
        if self.sp:
            return reduce_scatter_to_sp_region(out)
        if self.tp > 1:
            return reduce_from_tp_region(out)
        return out

    def dispatch(self, hidden, probs, routing_map):
        """hidden [T, h], probs [T, E] (fp32, zero off the routing), routing_map [T, E] bool."""
        hidden, probs, routing_map = self.tensor_parallel_input(hidden, probs, routing_map)
        local_map = routing_map[:, self.first:self.first + self.local]
        expert_index, token_index = local_map.t().nonzero(as_tuple=True)  # grouped by expert, tokens in order
        weight = probs[:, self.first:self.first + self.local][token_index, expert_index]
        self._state = (token_index, weight, hidden.shape)
        return hidden[token_index], local_map.sum(0).cpu()

    def combine(self, expert_output):
        token_index, weight, shape = self._state
        self._state = None
        return self.weighted_sum(expert_output, weight, token_index, shape)
