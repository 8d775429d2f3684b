"""Mixture of experts (docs/moe.md): the router, its auxiliary losses, and the MoE layer that replaces the
dense MLP in the layers ``GPTConfig.is_moe_layer`` names.

Routing, per token t with fp32 logits z_t = W_r x_t (W_r: (E, h), replicated):
  - "softmax": p_t = softmax(z_t) over all E experts; the top-k of p_t, renormalised to sum to one;
  - "sigmoid": s_t = sigmoid(z_t); the top-k of s_t, normalised to sum to one; the load-balancing loss
    reads p_t = s_t / sum(s_t).
Auxiliary losses, over the micro-batch's T tokens (the same T in every layout: under sequence or context
parallelism the sums are all-reduced over TP / CP, with an identity backward, so each rank's gradient is
that of its own tokens, as the LM loss's is):
  - load balancing (Switch / GShard): coeff * E * sum_e f_e P_e, f_e = (assignments to e) / (k T) (no
    gradient), P_e = mean_t p_te;
  - router z-loss (ST-MoE): coeff * mean_t logsumexp(z_t)^2.
They reach the gradients through ``_InjectAuxGrad`` on the routing weights: an identity forward whose
backward adds d(aux)/d(router) times ``MoEAuxLosses.grad_scale`` (the step's 1 / micro-batches times the
fp16 loss scale, set by the training loop), so the objective is the LM loss plus the aux terms averaged
over the global batch's micro-batches. The values are recorded in that backward, which runs once per
micro-batch whether or not the layer is recomputed, and never for evaluation.

Capacity (``moe_capacity_factor`` > 0): each expert keeps at most ceil(cf * T * k / E) of the assignments
routed to it from the T tokens this rank routes, the ones of highest routing weight (ties: lower token
index); the others are dropped (their weight zeroed, not renormalised: a token whose every assignment
is dropped passes through the residual alone) and counted.
"""
import dataclasses
import math

import torch
import torch.nn as nn

from megagopher import parallel_state as ps
from megagopher.tensor_parallel import reduce_from_tp_region, set_init

from .mlp import MLP
from .moe_dispatch import AllToAllDispatcher
from .moe_experts import GroupedExperts, LocalDispatcher


class MoEAuxLosses:
    """The step's gradient scale of the aux terms and, per MoE layer, the sums over the micro-batches
    backpropagated since the last ``pop()`` (kept on the device: no synchronisation per micro-batch)."""

    def __init__(self, grad_scale=1.0):
        self.grad_scale = float(grad_scale)
        self.sums = {}

    def record(self, layer, aux, z, tokens_per_expert, dropped):
        new = torch.cat([torch.stack([aux, z, dropped.float(), torch.ones_like(aux)]), tokens_per_expert.float()])
        self.sums[layer] = new if layer not in self.sums else self.sums[layer] + new

    def pop(self):
        """{layer: (aux sum, z sum, dropped assignments, micro-batches, tokens-per-expert list)}."""
        sums, self.sums = self.sums, {}
        return {k: v.tolist() for k, v in sums.items()}


def _statistic_groups(sequence_parallel):
    """The groups over which a micro-batch's tokens are spread on this rank: TP under sequence parallelism,
    and CP."""
    groups = []
    if sequence_parallel and ps.get_tp_size() > 1:
        groups.append(ps.get_tp_group())
    if ps.get_cp_size() > 1:
        groups.append(ps.get_cp_group())
    return groups


def _sum_over_tokens(x, groups):
    """x summed over the micro-batch's tokens on every rank holding some: forward all-reduce, identity
    backward (each rank differentiates its own tokens' share)."""
    for group in groups:
        x = reduce_from_tp_region(x, group)
    return x


def top_k_routing(logits, top_k, kind):
    """(weights [T, E] (zero off the top-k, the top-k summing to one), routing map [T, E] bool, the
    distribution p [T, E] the load-balancing loss averages)."""
    if kind == "softmax":
        scores = torch.softmax(logits, dim=-1)
        dist_p = scores
    else:
        scores = torch.sigmoid(logits)
        dist_p = scores / scores.sum(-1, keepdim=True)
    top, index = scores.topk(top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    weights = torch.zeros_like(scores).scatter(1, index, top)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True)
    return weights, routing_map, dist_p


def apply_capacity(weights, routing_map, top_k, capacity_factor):
    """The routing with every expert's assignments beyond its capacity dropped (see the module docstring):
    (weights, routing map, dropped assignments as a 0-d tensor)."""
    t, e = routing_map.shape
    capacity = math.ceil(capacity_factor * t * top_k / e)
    if capacity >= t:
        return weights, routing_map, routing_map.new_zeros((), dtype=torch.long)
    score = weights.detach().masked_fill(~routing_map, -1.0)
    order = torch.sort(score, dim=0, descending=True, stable=True).indices[:capacity]
    keep = torch.zeros_like(routing_map).scatter(0, order, True) & routing_map
    dropped = (routing_map & ~keep).sum()
    return weights * keep, keep, dropped


class _InjectAuxGrad(torch.autograd.Function):
    """Identity on ``weights``; its backward gives the aux loss the gradient ``losses.grad_scale`` and
    records the layer's statistics (``stats``: aux, z, tokens per expert, dropped)."""

    @staticmethod
    def forward(ctx, weights, aux_total, losses, layer, stats):
        ctx.losses, ctx.layer, ctx.stats = losses, layer, stats
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad):
        ctx.losses.record(ctx.layer, *ctx.stats)
        scale = torch.full((), ctx.losses.grad_scale, dtype=torch.float32, device=grad.device)
        return grad, scale, None, None, None


class Router(nn.Module):
    """fp32 logits from a replicated (E, h) weight; under sequence parallelism each rank sees its sequence
    chunk only, so the weight is marked for finalize's TP all-reduce of its gradient, like a norm's."""

    def __init__(self, cfg, sequence_parallel):
        super().__init__()
        self.cfg, self.sp = cfg, sequence_parallel
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        set_init(self.weight, self.weight.shape, std=cfg.init_std)
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x, losses, layer):
        """x [T, h] -> (weights [T, E] fp32 with the aux gradient attached, routing map [T, E])."""
        cfg = self.cfg
        logits = torch.nn.functional.linear(x.float(), self.weight.float())
        weights, routing_map, dist_p = top_k_routing(logits, cfg.moe_top_k, cfg.moe_router)
        groups = _statistic_groups(self.sp)
        counts = routing_map.sum(0).float()
        for group in groups:  # no gradient: a plain all-reduce
            torch.distributed.all_reduce(counts, group=group)
        tokens = torch.tensor(float(x.shape[0] * math.prod(torch.distributed.get_world_size(g) for g in groups)),
                              device=x.device)
        p_mean = _sum_over_tokens(dist_p.sum(0), groups) / tokens
        aux = cfg.moe_aux_loss_coeff * cfg.num_experts * (counts / (cfg.moe_top_k * tokens) * p_mean).sum()
        z = cfg.moe_z_loss_coeff * _sum_over_tokens(torch.logsumexp(logits, -1).square().sum(), groups) / tokens
        dropped = routing_map.new_zeros((), dtype=torch.long)
        if cfg.moe_capacity_factor > 0:
            weights, routing_map, dropped = apply_capacity(weights, routing_map, cfg.moe_top_k,
                                                           cfg.moe_capacity_factor)
        total = aux + z
        if torch.is_grad_enabled() and total.requires_grad:
            stats = (aux.detach(), z.detach(), counts, dropped)
            weights = _InjectAuxGrad.apply(weights, total, losses, layer, stats)
        return weights, routing_map


class MoELayer(nn.Module):
    """Router, dispatch, the grouped experts, combine; plus the shared experts' dense MLP on the same input.
    Input and output [s(/tp), b, h] like MLP's. ``aux_losses`` (a MoEAuxLosses) is replaced by the training
    loop each step; the default gives the aux terms weight one in a plain forward and backward."""

    def __init__(self, cfg, layer_number, sequence_parallel):
        super().__init__()
        self.cfg, self.layer_number, self.sp = cfg, layer_number, sequence_parallel
        self.router = Router(cfg, sequence_parallel)
        tp, ep = ps.get_tp_size(), ps.get_ep_size()
        if cfg.num_experts % ep:
            raise ValueError(f"model.num_experts = {cfg.num_experts} is not divisible by parallel.ep = {ep}")
        # Expert parallelism gives this rank the contiguous range [first, first + local) of the experts.
        self.num_local_experts = cfg.num_experts // ep
        self.first_expert = ps.get_ep_rank() * self.num_local_experts
        experts = (cfg.num_experts, self.first_expert, self.num_local_experts)
        self.experts = GroupedExperts(cfg, experts, cfg.num_layers, tp)
        dispatcher = AllToAllDispatcher if ep > 1 else LocalDispatcher
        self.dispatcher = dispatcher(cfg.num_experts, self.first_expert, self.num_local_experts, sequence_parallel, tp)
        self.shared = None
        if cfg.moe_shared_experts:
            shared_cfg = dataclasses.replace(cfg, ffn_hidden_size=cfg.moe_shared_experts * cfg.moe_ffn_hidden_size)
            self.shared = MLP(shared_cfg, cfg.num_layers, sequence_parallel)
        self.aux_losses = MoEAuxLosses()

    def forward(self, x):
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)
        weights, routing_map = self.router(tokens, self.aux_losses, self.layer_number)
        expert_input, tokens_per_expert = self.dispatcher.dispatch(tokens, weights, routing_map)
        out = self.dispatcher.combine(self.experts(expert_input, tokens_per_expert)).view(s, b, h)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


def moe_layers(chunks):
    """Every MoELayer of the model chunks (wrapped or not)."""
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)]


def attach_aux_losses(chunks, losses):
    """Makes every MoE layer of ``chunks`` record into and scale by ``losses`` (a MoEAuxLosses)."""
    for layer in moe_layers(chunks):
        layer.aux_losses = losses


def moe_step_summary(losses, cfg, device):
    """The step's MoE metrics from every rank's ``losses`` (a MoEAuxLosses): collective over the world. TP
    and CP peers hold the same statistics (all-reduced in the router), so TP rank 0 of CP rank 0 gives them;
    pipeline stages hold different layers and data-parallel replicas different micro-batches: summed."""
    import torch.distributed as dist
    e = cfg.num_experts
    table = torch.zeros(cfg.num_layers, 4 + e, dtype=torch.float64)
    owner = ps.get_tp_rank() == 0 and ps.get_cp_rank() == 0
    for layer, values in losses.pop().items():
        if owner:
            table[layer] = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        table = table.to(device)
        dist.all_reduce(table)
        table = table.cpu()
    ran = table[table[:, 3] > 0]  # the MoE layers that backpropagated this step
    if not len(ran):
        return {}
    tokens = ran[:, 4:]
    per_layer_load = tokens.max(1).values / tokens.mean(1).clamp_min(1e-12)
    return {"moe_aux_loss": float((ran[:, 0] / ran[:, 3]).sum()), "moe_z_loss": float((ran[:, 1] / ran[:, 3]).sum()),
            "moe_load_max_over_mean": float(per_layer_load.mean()), "moe_dropped": int(ran[:, 2].sum()),
            "moe_tokens_per_expert": [int(v) for v in tokens.sum(0).tolist()]}
