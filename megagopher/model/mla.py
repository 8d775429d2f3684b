"""Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, "DeepSeek-V2: A Strong, Economical, and
Efficient Mixture-of-Experts Language Model", section 2.1; DeepSeek-V3 uses it unchanged), laid out as
transformers' DeepseekV3Attention and Megatron-Core's MLASelfAttention.

Keys and values come from one low-rank latent per token, c_kv (kv_lora_rank wide, after its RMSNorm), and a
single RoPE key k_pe (qk_rope_head_dim) shared by every head; each head's key is [k_nope, k_pe] with k_nope and
its value up-projected from c_kv. Queries are [q_nope, q_pe] per head, from a low-rank latent of their own
(q_lora_rank > 0) or a full projection. RoPE ("decoupled") touches only the *_pe channels, in megagopher's
rotate-half convention (DeepSeek's checkpoints rotate interleaved pairs: the importer permutes those rows of
q_b_proj / q_proj and kv_a_proj_with_mqa, as for CodeGen). Query/key heads are qk_nope + qk_rope wide and
value heads v_head_dim (192 and 128 in V3): the flash kernel takes d_qk != d_v. Generation caches only c_kv
and the rotated k_pe per token (kv_lora_rank + qk_rope_head_dim numbers, 576 in V3, instead of 2 x heads x
head widths) in the layer's KVSlot (model/attention.py; its k holds c_kv, its v k_pe) and up-projects them at
every step.

Parameters (full shapes; H = hidden_size, n = num_attention_heads, d_qk = qk_nope + qk_rope; TP splits the
head dimension of the column-parallel rows and the row-parallel input, each head's rows contiguous):
    q_a_proj.weight            [q_lora_rank, H]            replicated   (q_lora_rank > 0; bias if model.bias)
    q_a_layernorm.weight       [q_lora_rank]               replicated   (q_lora_rank > 0; RMSNorm, eps 1e-6)
    q_b_proj.weight            [n * d_qk, q_lora_rank]     column       (q_lora_rank > 0; per head [nope, rope] rows)
    q_proj.weight              [n * d_qk, H]               column       (q_lora_rank = 0 instead of the three above)
    kv_a_proj_with_mqa.weight  [kv_lora_rank + qk_rope, H] replicated   (rows [c_kv, k_pe]; bias if model.bias)
    kv_a_layernorm.weight      [kv_lora_rank]              replicated   (RMSNorm, eps 1e-6)
    kv_b_proj.weight           [n * (qk_nope + v_head_dim), kv_lora_rank]  column  (per head [k_nope, v] rows)
    proj.weight                [H, n * v_head_dim]         row          (transformers' o_proj; bias [H] if model.bias)
transformers' names are the same (self_attn.*), with o_proj for proj; its latent norms take RMSNorm's default
eps 1e-6, not rms_norm_eps, and so do these.

Tensor and sequence parallelism (Megatron-Core's layout): the down-projections and latent norms are
replicated and run on this rank's tokens, [s/tp, b, H] under SP, so only the latents are all-gathered (by the
up-projections' column-parallel input and, for k_pe, gather_from_sp_region), never the hidden states. Under
SP each rank's gradient of a replicated weight covers its own tokens: the weights carry ``sequence_parallel``
and finalize_model_grads sums them over TP once. Without SP every rank sees every token: the up-projections'
input gradient and k_pe's (copy_to_tp_region) are all-reduced in the backward, so the replicated weights'
gradients are already whole and identical and are not marked. Under context parallelism the heads' q, k, v go
round the ring (context_parallel.ring_attention) like any attention's.
"""
import math

import torch
import torch.nn as nn

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.context_parallel import ring_attention
from megagopher.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, checkpoint, copy_to_tp_region,
                                        gather_from_sp_region, parallel_linear, set_init)

from .dropout import dropout as _dropout
from .rope import softmax_scale

LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, which its q_a/kv_a_layernorm keep


class ReplicatedLinear(nn.Module):
    """y = x W^T (+ b) with W whole on every TP rank, on whatever tokens this rank holds. ``sequence_parallel``:
    those are this rank's chunk of the sequence, so the gradient is summed over TP after the backward."""

    def __init__(self, in_features, out_features, bias, init_std, sequence_parallel):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        set_init(self.weight, (out_features, in_features), std=init_std)
        self.weight.sequence_parallel = sequence_parallel
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            set_init(self.bias, (out_features,), fill=0.0)
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x):
        return parallel_linear(x, [(self.weight, self.bias)])


class LatentNorm(nn.Module):
    """RMSNorm over a latent (q_a_layernorm, kv_a_layernorm); replicated like ReplicatedLinear."""

    def __init__(self, width, sequence_parallel):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        set_init(self.weight, (width,), fill=1.0)
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, LATENT_NORM_EPS)


class MLAttention(nn.Module):
    """Causal multi-head latent attention with the forward of model/attention.py's Attention:
    forward(x [s(/tp), b, H], rope (cos, sin) or None, kv (a KVSlot) or None, cu_seqlens) -> [s(/tp), b, H]."""

    def __init__(self, cfg, num_layers_total, sequence_parallel, selective_recompute, layer_number=0):
        super().__init__()
        tp = ps.get_tp_size()
        if cfg.num_attention_heads % tp:
            raise ValueError(f"MLA: model.num_attention_heads = {cfg.num_attention_heads} is not divisible by "
                             f"tp = {tp} (the heads are split over tensor parallelism)")
        self.cfg, self.layer_number, self.selective_recompute = cfg, layer_number, selective_recompute
        self.tp, self.sp = tp, sequence_parallel and tp > 1
        self.local_heads = cfg.num_attention_heads // tp
        self.scale = softmax_scale(cfg)
        n, h, std = cfg.num_attention_heads, cfg.hidden_size, cfg.init_std
        if cfg.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(h, cfg.q_lora_rank, cfg.bias, std, self.sp)
            self.q_a_layernorm = LatentNorm(cfg.q_lora_rank, self.sp)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, n * cfg.head_dim, bias=False,
                                                 sequence_parallel=self.sp, init_std=std)
        else:
            self.q_proj = ColumnParallelLinear(h, n * cfg.head_dim, bias=False, sequence_parallel=self.sp,
                                               init_std=std)
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.bias, std, self.sp)
        self.kv_a_layernorm = LatentNorm(cfg.kv_lora_rank, self.sp)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                              bias=False, sequence_parallel=self.sp, init_std=std)
        self.proj = RowParallelLinear(n * cfg.v_head_dim, h, bias=cfg.bias, sequence_parallel=self.sp,
                                      init_std=std / math.sqrt(2 * num_layers_total))

    def _query(self, x):
        """[s, b, local heads, d_qk] (the whole sequence: the column-parallel projection gathers under SP)."""
        if self.cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        return q.view(q.shape[0], q.shape[1], self.local_heads, self.cfg.head_dim)

    def _shared(self, k_pe):
        """This rank's k_pe made the whole sequence's, every TP rank's heads reading it: its gradient, a
        partial sum per rank, is reduced (reduce-scattered under SP, all-reduced without)."""
        if self.tp == 1:
            return k_pe
        return gather_from_sp_region(k_pe) if self.sp else copy_to_tp_region(k_pe)

    def forward(self, x, rope, kv=None, cu_seqlens=None):
        """``kv``: this layer's KVSlot (generation), which the new latents and rope keys join before attention.
        ``cu_seqlens``: the micro-batch's document boundaries, its rows laid end to end."""
        cfg = self.cfg
        nope, rot = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = self._query(x)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rot], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = self._shared(k_pe).unsqueeze(2)  # [s, b, 1, rot]: one rope key per token
        q_nope, q_pe = q.split([nope, rot], dim=-1)
        if rope is not None:
            q_pe, k_pe = _rotate(q_pe, *rope), _rotate(k_pe, *rope)
        q = torch.cat([q_nope, q_pe], dim=-1)
        causal, bounds = True, None
        if kv is not None:  # the cache keeps (b, s, ...) latents and rotated rope keys (no SP in generation)
            c_kv, k_pe, causal = kv.extend(c_kv.transpose(0, 1), k_pe.transpose(0, 1))
            c_kv, k_pe, bounds = c_kv.transpose(0, 1), k_pe.transpose(0, 1), kv.key_bounds
        kv_b = self.kv_b_proj(c_kv)  # [s_k, b, local heads * (nope + v)], gathered under SP
        s_k, b = kv_b.shape[:2]
        k_nope, v = kv_b.view(s_k, b, self.local_heads, nope + cfg.v_head_dim).split([nope, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(s_k, b, self.local_heads, rot)], dim=-1)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (b, s, heads, d): the kernels' layout
        if self.selective_recompute and kv is None:  # Korthikanti et al. 2022: recompute only the s^2 part
            ctx = checkpoint(self.core_attention, q, k, v, True, cu_seqlens)
        else:
            ctx = self.core_attention(q, k, v, causal, cu_seqlens, bounds)
        s = ctx.shape[1]
        return self.proj(ctx.transpose(0, 1).reshape(s, b, -1))

    def core_attention(self, q, k, v, causal=True, cu_seqlens=None, key_bounds=None):
        """q, k (b, sq/sk, h, d_qk), v (b, sk, h, d_v) -> (b, sq, h, d_v); masks as Attention.core_attention's:
        causal (top-left), ring attention under CP or packed documents, a padded cache's key_bounds."""
        if key_bounds is None and (ps.get_cp_size() > 1 or cu_seqlens is not None):
            return ring_attention(q, k, v, ps.get_cp_group() if ps.get_cp_size() > 1 else None,
                                  softmax_scale=self.scale, cu_seqlens=cu_seqlens)
        if self.cfg.core_attention == "flash":
            if key_bounds is not None:
                return kernels.flash_attention_forward(q, k, v, causal=False, softmax_scale=self.scale,
                                                       key_bounds=key_bounds)[0]
            return kernels.flash_attention(q, k, v, causal=causal, softmax_scale=self.scale)
        # Unfused: explicit scores, Megatron's scaled-masked softmax (True = hidden), dropout on this rank's heads.
        hidden = None
        if key_bounds is not None:
            lo, hi = key_bounds
            col = torch.arange(k.shape[1], device=q.device)
            hidden = ((col < lo[..., None]) | (col >= hi[..., None])).unsqueeze(1)  # (b, 1, sq, sk)
        scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))
        probs = kernels.scaled_masked_softmax(scores, mask=hidden, scale=self.scale,
                                              causal=causal and hidden is None)
        probs = _dropout(probs, self.cfg.attention_dropout, self.training, sharded=True)
        return torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2)


def _rotate(x, cos, sin):
    """RoPE (rotate-half) on x [s, b, heads, rot]: tables (s, rot/2) shared by the rows, or (s, b, rot/2) when
    every row has its own positions (data.reset_position_ids), applied to the rows flattened."""
    if cos.dim() == 3:
        s, b = x.shape[:2]
        flat = x.reshape(1, s * b, *x.shape[2:])
        return kernels.apply_rope(flat, cos.reshape(s * b, -1), sin.reshape(s * b, -1)).view(x.shape)
    return kernels.apply_rope(x.transpose(0, 1), cos, sin).transpose(0, 1)
