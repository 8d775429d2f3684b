"""The MoE layers' per-step statistics, the step's MoE metrics, and DeepSeek-V3's auxiliary-loss-free
balancing update (docs/moe.md).

Statistics: each MoE layer's router records, in the backward of every micro-batch (model/moe_router.py
``_InjectAuxGrad``), its aux, z and sequence-wise aux losses, dropped assignments and tokens per expert;
``moe_step_summary`` sums them into one (layers, 5 + E) table with ONE all-reduce over the world per step
(pipeline stages hold different layers, data-parallel replicas different micro-batches; TP and CP peers
already hold the same sums, so one of them contributes).

Balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts";
DeepSeek-V3, section 2.1.2): after each optimizer step every expert's selection bias moves by

    b_e += rate * sign(mean_e' load_e' - load_e)

where load_e is the step's assignments to expert e summed over every micro-batch and every replica: the
column of that same table, so no further collective is needed and every rank, whatever its layout, applies
the same float64-exact sign to the same fp32 bias (the biases stay identical on every rank holding the
layer; each pipeline stage updates its own layers).
"""
import torch

from megagopher import parallel_state as ps

AUX, Z, DROPPED, MICRO_BATCHES, SEQ_AUX, STAT_COLUMNS = 0, 1, 2, 3, 4, 5


class MoEAuxLosses:
    """The step's gradient scale of the aux terms and, per MoE layer, the sums over the micro-batches
    backpropagated since the last ``pop()`` (kept on the device: no synchronisation per micro-batch).
    ``moe_step_summary`` leaves the world's table in ``loads`` for the bias update."""

    def __init__(self, grad_scale=1.0):
        self.grad_scale = float(grad_scale)
        self.sums = {}
        self.loads = None  # (layers, E) float64 tokens per expert over the global batch, or None

    def record(self, layer, aux, z, seq_aux, tokens_per_expert, dropped):
        new = torch.cat([torch.stack([aux, z, dropped.float(), torch.ones_like(aux), seq_aux]),
                         tokens_per_expert.float()])
        self.sums[layer] = new if layer not in self.sums else self.sums[layer] + new

    def pop(self):
        """{layer: (aux sum, z sum, dropped assignments, micro-batches, seq aux sum, tokens-per-expert list)}."""
        sums, self.sums = self.sums, {}
        return {k: v.tolist() for k, v in sums.items()}


def moe_step_summary(losses, cfg, device):
    """The step's MoE metrics from every rank's ``losses`` (a MoEAuxLosses): collective over the world. TP
    and CP peers hold the same statistics (all-reduced in the router), so TP rank 0 of CP rank 0 gives them;
    pipeline stages hold different layers and data-parallel replicas different micro-batches: summed.
    Leaves the layers' loads in ``losses.loads`` (rows of the layers that ran, else zero)."""
    import torch.distributed as dist
    e = cfg.num_experts
    # A row per layer index: the decoder's, then the MTP modules' (their layers are numbered on from num_layers).
    table = torch.zeros(cfg.num_layers + cfg.mtp_num_layers, STAT_COLUMNS + e, dtype=torch.float64)
    owner = ps.get_tp_rank() == 0 and ps.get_cp_rank() == 0
    for layer, values in losses.pop().items():
        if owner:
            table[layer] = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        table = table.to(device)
        dist.all_reduce(table)
        table = table.cpu()
    losses.loads = table[:, STAT_COLUMNS:]
    ran = table[table[:, MICRO_BATCHES] > 0]  # the MoE layers that backpropagated this step
    if not len(ran):
        return {}
    tokens = ran[:, STAT_COLUMNS:]
    per_layer_load = tokens.max(1).values / tokens.mean(1).clamp_min(1e-12)
    steps = ran[:, MICRO_BATCHES]
    out = {"moe_aux_loss": float((ran[:, AUX] / steps).sum()), "moe_z_loss": float((ran[:, Z] / steps).sum()),
           "moe_load_max_over_mean": float(per_layer_load.mean()), "moe_dropped": int(ran[:, DROPPED].sum()),
           "moe_tokens_per_expert": [int(v) for v in tokens.sum(0).tolist()]}
    if cfg.moe_seq_aux_loss_coeff > 0:
        out["moe_seq_aux_loss"] = float((ran[:, SEQ_AUX] / steps).sum())
    return out


@torch.no_grad()
def apply_bias_update(biases, losses, rate):
    """``biases``: (global layer index, fp32 expert_bias [E]) of this rank's MoE layers; moves each by
    ``rate`` times sign(mean load - load) (module docstring) from ``losses.loads``. A layer with no
    assignments this step (it did not run) keeps its bias."""
    if rate <= 0 or losses is None or losses.loads is None:
        return
    for layer, bias in biases:
        load = losses.loads[layer]
        if bias is None or not load.any():
            continue
        step = torch.sign(load.mean() - load).to(torch.float32) * rate
        bias.add_(step.to(bias.device))
