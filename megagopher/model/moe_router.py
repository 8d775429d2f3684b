"""The MoE router (docs/moe.md): scores, expert selection, routing weights and the auxiliary losses whose
gradients it carries. model/moe.py builds it into the MoE layer.

Per token t with fp32 logits z_t = W_r x_t (W_r: (E, h), replicated):
  - scores s_t: softmax(z_t) over the E experts ("softmax"), or sigmoid(z_t) ("sigmoid");
  - selection: the top-k experts of s_t + b, b the per-expert balancing bias (``expert_bias``, sigmoid
    router only: DeepSeek-V3's auxiliary-loss-free balancing, Wang et al. 2024, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts"; model/moe_balance.py moves it between steps). With
    ``moe_n_group`` > 1 the E experts form n_group contiguous groups, a group scores the sum of its two
    highest biased scores, and only the experts of the ``moe_topk_group`` best groups compete (DeepSeek-V3's
    rule, transformers' DeepseekV3TopkRouter);
  - weights: the unbiased s_t of the chosen experts, divided by their sum when ``moe_norm_topk_prob``
    (plus 1e-20 for the sigmoid router, as DeepSeek-V3's code does), then times
    ``moe_routed_scaling_factor``; transformers' Qwen3MoeTopKRouter with norm_topk_prob false keeps the raw
    softmax values.
Auxiliary losses, over the micro-batch's T tokens (the same T in every layout: under sequence or context
parallelism the sums are all-reduced over TP / CP, with an identity backward, so each rank's gradient is
that of its own tokens, as the LM loss's is). p_t is s_t for softmax, s_t / sum(s_t) for sigmoid, and the
counts are the selected (biased, pre-capacity) assignments, which carry no gradient:
  - load balancing (Switch / GShard): coeff * E * sum_e f_e P_e, f_e = (assignments to e) / (k T),
    P_e = mean_t p_te;
  - sequence-wise balance (DeepSeek-V3 eqs. 17-20): the same per sequence (a column b of the [s, b, h]
    input: T_b = its s tokens wherever they sit), averaged over the B sequences:
    coeff / B * sum_b E * sum_e (count_be / (k T_b)) (sum_{t in b} p_te / T_b);
  - router z-loss (ST-MoE): coeff * mean_t logsumexp(z_t)^2.
They reach the gradients through ``_InjectAuxGrad`` on the routing weights: an identity forward whose
backward adds d(aux)/d(router) times ``MoEAuxLosses.grad_scale`` and records the statistics.

Capacity (``moe_capacity_factor`` > 0): each expert keeps at most ceil(cf * T * k / E) of the assignments
routed to it from the T tokens this rank routes, the ones of highest routing weight (ties: lower token
index); the others are dropped (their weight zeroed, not renormalised) and counted.
"""
import math

import torch
import torch.nn as nn

from megagopher import parallel_state as ps
from megagopher.tensor_parallel import reduce_from_tp_region, set_init


def statistic_groups(sequence_parallel):
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


def _group_limit(choice, n_group, topk_group):
    """``choice`` [T, E] with the experts outside each token's ``topk_group`` best groups set to -inf; a
    group's score is the sum of its two highest entries."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    best = group_scores.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)


def route(logits, cfg, bias=None):
    """(weights [T, E] (zero off the chosen experts), routing map [T, E] bool, the distribution p [T, E]
    the balance losses average), from fp32 logits [T, E] and the selection bias [E] (or None)."""
    if cfg.moe_router == "softmax":
        scores = torch.softmax(logits, dim=-1)
        dist_p = scores
    else:
        scores = torch.sigmoid(logits)
        dist_p = scores / scores.sum(-1, keepdim=True)
    choice = scores.detach() if bias is None else scores.detach() + bias
    if cfg.moe_n_group > 1:
        choice = _group_limit(choice, cfg.moe_n_group, cfg.moe_topk_group)
    index = choice.topk(cfg.moe_top_k, dim=-1).indices
    top = scores.gather(1, index)
    if cfg.moe_norm_topk_prob:
        total = top.sum(-1, keepdim=True)
        top = top / (total + 1e-20 if cfg.moe_router == "sigmoid" else total)
    if cfg.moe_routed_scaling_factor != 1.0:
        top = top * cfg.moe_routed_scaling_factor
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
    """Identity on ``weights``; its backward gives the aux losses the gradient ``losses.grad_scale`` and
    records the layer's statistics (``stats``: aux, z, sequence-wise aux, tokens per expert, dropped)."""

    @staticmethod
    def forward(ctx, weights, aux_total, losses, layer, stats):
        ctx.losses, ctx.layer, ctx.stats = losses, layer, stats
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad):
        ctx.losses.record(ctx.layer, *ctx.stats)
        scale = torch.full((), ctx.losses.grad_scale, dtype=torch.float32, device=grad.device)
        return grad, scale, None, None, None


def _all_reduce_counts(counts, groups):
    for group in groups:  # no gradient: a plain all-reduce
        torch.distributed.all_reduce(counts, group=group)
    return counts


def sequence_aux_loss(routing_map, dist_p, batch, groups, cfg):
    """DeepSeek-V3's sequence-wise balance loss (module docstring) of tokens [s * batch, E] in the [s, b]
    order of the layer's input; each sequence's sums are completed over ``groups``."""
    e, k = cfg.num_experts, cfg.moe_top_k
    counts = _all_reduce_counts(routing_map.view(-1, batch, e).sum(0).float(), groups)  # [B, E]
    seq_tokens = routing_map.shape[0] // batch * math.prod(torch.distributed.get_world_size(g) for g in groups)
    p_mean = _sum_over_tokens(dist_p.view(-1, batch, e).sum(0), groups) / seq_tokens
    per_sequence = (counts * e / (k * seq_tokens) * p_mean).sum(-1)
    return cfg.moe_seq_aux_loss_coeff * per_sequence.mean()


class Router(nn.Module):
    """fp32 logits from a replicated (E, h) weight; under sequence parallelism each rank sees its sequence
    chunk only, so the weight is marked for finalize's TP all-reduce of its gradient, like a norm's. The
    sigmoid router holds ``expert_bias`` [E], fp32 whatever the model's dtype, a persistent buffer (in the
    checkpoint, outside the optimizer: transformers' ``e_score_correction_bias``)."""

    def __init__(self, cfg, sequence_parallel):
        super().__init__()
        self.cfg, self.sp = cfg, sequence_parallel
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        set_init(self.weight, self.weight.shape, std=cfg.init_std)
        self.weight.sequence_parallel = sequence_parallel
        bias = torch.zeros(cfg.num_experts, dtype=torch.float32) if cfg.moe_router == "sigmoid" else None
        self.register_buffer("expert_bias", bias)

    def _apply(self, fn, recurse=True):
        """Casts and moves the module, keeping ``expert_bias`` fp32: a bf16 bias could not hold the small
        steps of the balancing update."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device)
        return self

    def forward(self, x, losses, layer, batch=1):
        """x [T, h] (T = s * batch, [s, b] order) -> (weights [T, E] fp32 with the aux gradient attached,
        routing map [T, E])."""
        cfg = self.cfg
        logits = torch.nn.functional.linear(x.float(), self.weight.float())
        weights, routing_map, dist_p = route(logits, cfg, self.expert_bias)
        groups = statistic_groups(self.sp)
        counts = _all_reduce_counts(routing_map.sum(0).float(), groups)
        tokens = torch.tensor(float(x.shape[0] * math.prod(torch.distributed.get_world_size(g) for g in groups)),
                              device=x.device)
        p_mean = _sum_over_tokens(dist_p.sum(0), groups) / tokens
        aux = cfg.moe_aux_loss_coeff * cfg.num_experts * (counts / (cfg.moe_top_k * tokens) * p_mean).sum()
        z = cfg.moe_z_loss_coeff * _sum_over_tokens(torch.logsumexp(logits, -1).square().sum(), groups) / tokens
        seq_aux = sequence_aux_loss(routing_map, dist_p, batch, groups, cfg) if cfg.moe_seq_aux_loss_coeff > 0 \
            else torch.zeros_like(aux)
        dropped = routing_map.new_zeros((), dtype=torch.long)
        if cfg.moe_capacity_factor > 0:
            weights, routing_map, dropped = apply_capacity(weights, routing_map, cfg.moe_top_k,
                                                           cfg.moe_capacity_factor)
        total = aux + z + seq_aux
        if torch.is_grad_enabled() and total.requires_grad:
            stats = (aux.detach(), z.detach(), seq_aux.detach(), counts, dropped)
            weights = _InjectAuxGrad.apply(weights, total, losses, layer, stats)
        return weights, routing_map
