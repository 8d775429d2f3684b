"""Mixture of experts (docs/moe.md): the MoE layer that replaces the dense MLP in the layers
``GPTConfig.is_moe_layer`` names (every ``moe_layer_freq``-th from ``first_k_dense`` on: DeepSeek's dense
first layers), and the training loop's entry points.

The parts live beside it: the router, its selection (softmax or sigmoid scores, DeepSeek-V3's balancing
bias and group-limited routing, the routed scaling factor), its auxiliary losses and capacity in
model/moe_router.py; the step's statistics, metrics and the auxiliary-loss-free bias update in
model/moe_balance.py; the experts and the local dispatcher in model/moe_experts.py; expert parallelism's
all-to-all dispatcher in model/moe_dispatch.py.
"""
import dataclasses

import torch.nn as nn

from megagopher import parallel_state as ps

from .mlp import MLP
from .moe_balance import MoEAuxLosses, apply_bias_update, moe_step_summary  # noqa: F401
from .moe_dispatch import AllToAllDispatcher
from .moe_experts import GroupedExperts, LocalDispatcher
from .moe_router import Router, apply_capacity, route  # noqa: F401


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
        weights, routing_map = self.router(tokens, self.aux_losses, self.layer_number, batch=b)
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


def update_expert_bias(chunks, losses, cfg):
    """After the optimizer step: every MoE layer of ``chunks`` moves its router's balancing bias from the
    step's loads (``losses``, the MoEAuxLosses that ``moe_step_summary`` read; model/moe_balance.py)."""
    apply_bias_update([(m.layer_number, m.router.expert_bias) for m in moe_layers(chunks)], losses,
                      cfg.moe_bias_update_rate)
