"""The dense MLP of a transformer layer, tensor-parallel as in Megatron-LM (Shoeybi et al. 2019, section 3:
fc1 column-parallel, fc2 row-parallel, one all-reduce in each direction), with GeLU or SwiGLU (Shazeer 2020,
"GLU Variants Improve Transformer"). Its own module because both the decoder layer (model/gpt.py) and the
MoE layer's shared experts (model/moe.py) build it, and gpt.py builds MoE layers: imports point one way.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

from megagopher import kernels
from megagopher.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """fc1, the activation, fc2. Under SwiGLU fc1 is the gate and up projections in one column-parallel GEMM
    (one gathered input, one input-gradient collective): its 2 * ffn output rows interleave them channel by
    channel, [gate_0, up_0, gate_1, up_1, ...], so every contiguous TP shard holds the gate and up rows of
    the same channels, and the checkpoint's full tensor is the same under every TP size."""

    def __init__(self, cfg, num_layers_total, sequence_parallel):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.approximate = "none" if cfg.activation == "gelu_exact" else "tanh"
        ffn = cfg.ffn_hidden_size
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * ffn if self.swiglu else ffn, bias=cfg.bias,
                                        sequence_parallel=sequence_parallel, init_std=cfg.init_std)
        if self.swiglu:  # the initial values of the separate gate (fc1) and up (fc_up) projections
            self.fc1.weight.init_parts = ("fc1.weight", "fc_up.weight")
        self.fc2 = RowParallelLinear(ffn, cfg.hidden_size, bias=cfg.bias, sequence_parallel=sequence_parallel,
                                     init_std=cfg.init_std / math.sqrt(2 * num_layers_total))

    def forward(self, x):
        return self.project(self.fc1(x))

    def project(self, y):
        """The activation and fc2, from fc1's output."""
        if self.swiglu:
            return self.fc2(kernels.swiglu(y[..., 0::2], y[..., 1::2]))
        return self.fc2(F.gelu(y, approximate=self.approximate))
