"""Causal self-attention of the GPT decoder: the KV cache for generation and the attention block (fused QKV
projection laid out per query group, optional QK-norm, flash or unfused core attention, output projection).

Variants of 2024-2026 decoders (issue 26): per-head QK-norm before RoPE (Qwen3, OLMo 2: one RMSNorm weight of
head_dim shared by the heads), biases on the QKV projection alone (Qwen2, ``model.qkv_bias``), a softmax scale
with YaRN's correction (model/rope.py, which holds the rotary tables), and sliding-window attention on the
layers ``cfg.is_local_layer`` picks (Mistral, Gemma): query i sees keys i - w + 1 .. i, transformers'
``sliding_window`` (masking_utils: kv_idx > q_idx - w), which is flash-attn's window_size (w - 1, 0). The window
holds in every core path (flash, unfused, packed documents, ring attention under context parallelism, a padded
cache's bounds), and a local layer's KV cache keeps only the last w positions.
"""
import math

import torch
import torch.nn as nn

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.context_parallel import ring_attention
from megagopher.kernels import attention_args
from megagopher.tensor_parallel import ColumnParallelLinear, RowParallelLinear, checkpoint, set_init

from .dropout import dropout as _dropout
from .rope import rope_tables, softmax_scale  # noqa: F401  (rope_tables: gpt.py imports it from here)


class KVSlot:
    """One layer's cached keys and values, k and v of shape (b, s, h_kv / tp, d), RoPE already applied. A local
    (sliding-window) layer keeps only its last ``window`` positions: ``dropped`` counts the cache columns cut
    off before k[:, 0], so memory stays bounded by the window however long the generation."""

    def __init__(self, cache=None):
        self.k = self.v = None
        self.cache = cache  # the KVCache holding this slot: its padding and key bounds
        self.window, self.dropped = 0, 0
        self._base = 0  # the cache column of the first key the last extend returned

    def __len__(self):
        return 0 if self.k is None else self.k.shape[1]

    @property
    def key_bounds(self):
        """The keys each new query sees (KVCache.begin, narrowed to the window, in this slot's columns), or
        None for an unpadded cache."""
        bounds = None if self.cache is None else self.cache.key_bounds
        if bounds is None:
            return None
        lo, hi = bounds
        if self.window:
            lo = torch.maximum(lo, hi - self.window)
        return (lo - self._base).contiguous(), (hi - self._base).contiguous()

    def extend(self, k, v, window=0):
        """Appends the new positions' k and v. Returns the keys and values the new queries attend over, and
        whether they need the causal mask: only when the cache was empty, where queries and keys cover the same
        positions (kernels.flash_attention aligns its mask top-left, query i seeing keys 0..i). A padded
        cache's queries take their mask from its key bounds instead, so any number of new positions may
        arrive. ``window`` (a local layer's) keeps the last ``window`` positions once these queries are served."""
        self.window = window
        if self.k is None:
            self.k, self.v, self._base = k, v, self.dropped
            out = k, v, True
        else:
            if k.shape[1] != 1 and self.key_bounds is None:
                # A top-left mask would hide cached keys from these queries; checked before anything is appended.
                raise ValueError(f"the KV cache holds {len(self)} positions and {k.shape[1]} new ones arrive: after "
                                 "the first forward a cached forward takes one token at a time")
            self.k, self.v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
            self._base = self.dropped
            keep = -window if window and self.key_bounds is None else 0
            out = self.k[:, keep:], self.v[:, keep:], False  # one query, the newest, sees every key kept
        if window and len(self) > window:
            cut = len(self) - window
            # A long prompt's cut is copied out, so that its full keys can be freed; a step's view of w of w + 1.
            self.k, self.v = ((t[:, cut:].clone() if cut > 1 else t[:, cut:]) for t in (self.k, self.v))
            self.dropped += cut
        return out


class KVCache:
    """Keys and values of the positions a GPTModel has seen, for incremental decoding. The first
    ``model(ids, kv_cache=cache)`` fills it (causal attention over the prompt); each later call passes one
    token with ``position_offset=len(cache)``. One slot per global layer index; one cache per sequence batch
    and per model (pipeline stage).

    Batched generation (megagopher.generation.batch) gives ``pad``: per row, how many leading positions of
    the cache are padding (prompts of different lengths right-aligned, as transformers' left padding). The
    rows then carry their own ``position_ids`` and every query sees the keys from its row's first real
    position to its own (``key_bounds``, the flash kernel's general mask), padding never. ``keep(rows)``
    drops finished rows, so later steps cost only what the live rows cost."""

    def __init__(self, pad=None):
        self.slots = {}  # layer index -> KVSlot
        self.pad = None if pad is None else torch.as_tensor(pad, dtype=torch.long)
        self.key_bounds = None

    def slot(self, layer):
        return self.slots.setdefault(layer, KVSlot(self))

    def __len__(self):
        """Positions seen (a local layer's slot holds only the last window of them)."""
        return max((s.dropped + len(s) for s in self.slots.values()), default=0)

    def begin(self, s, device):
        """Before a forward of ``s`` new positions: a padded cache's key bounds (lo, hi), int32 (b, s), query
        i of row n seeing cache positions [lo, hi). A padding query sees itself alone (a query that saw no key
        would turn to NaN, and NaN keys would reach the real queries through 0 * NaN)."""
        if self.pad is None:
            self.key_bounds = None
            return
        col = torch.arange(len(self), len(self) + s, device=device, dtype=torch.int32)[None, :]
        pad = self.pad.to(device=device, dtype=torch.int32)[:, None]
        self.key_bounds = (torch.minimum(pad, col).contiguous(), (col + 1).expand(pad.shape[0], s).contiguous())

    def keep(self, rows):
        """Keeps the batch rows ``rows`` (a list of indices) of a padded cache, then drops the leading
        positions that are padding in every row left."""
        if self.pad is None:
            raise ValueError("KVCache.keep needs a padded cache (KVCache(pad=...))")
        index = torch.as_tensor(rows, dtype=torch.long)
        self.pad = self.pad[index]
        trim = int(self.pad.min()) if len(rows) else 0
        self.pad -= trim
        for slot in self.slots.values():
            i, cut = index.to(slot.k.device), max(trim - slot.dropped, 0)  # a local slot may have dropped them
            slot.k, slot.v = slot.k[i, cut:], slot.v[i, cut:]
            slot.dropped = max(slot.dropped - trim, 0)


class HeadNorm(nn.Module):
    """RMSNorm over each head's channels with one weight of head_dim shared by the heads (Qwen3's q_norm and
    k_norm). Every TP rank holds other heads, so its gradient is a partial sum over TP whether or not sequence
    parallelism is on: the mark finalize_model_grads reads (``sequence_parallel``) has it all-reduced once."""

    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.norm_epsilon
        self.weight = nn.Parameter(torch.empty(cfg.head_dim))
        set_init(self.weight, (cfg.head_dim,), fill=1.0)
        self.weight.sequence_parallel = ps.get_tp_size() > 1

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads. The fused QKV projection is laid out per query
    group, [q_g0 (heads/groups heads), k_g0, v_g0, q_g1, ...], so that splitting it contiguously over TP
    hands every rank whole groups with their own K and V."""

    def __init__(self, cfg, num_layers_total, sequence_parallel, selective_recompute, layer_number=0):
        super().__init__()
        self.layer_number = layer_number
        self.cfg, self.sp, self.selective_recompute = cfg, sequence_parallel, selective_recompute
        self.window = cfg.window_size if cfg.is_local_layer(layer_number) else 0  # 0: full causal attention
        self.scale = softmax_scale(cfg)
        tp = ps.get_tp_size()
        d, g = cfg.head_dim, cfg.num_query_groups
        self.heads_per_group = cfg.num_attention_heads // g
        self.local_groups = g // tp
        self.qkv = ColumnParallelLinear(cfg.hidden_size, g * (self.heads_per_group + 2) * d,
                                        bias=cfg.bias or cfg.qkv_bias, sequence_parallel=sequence_parallel,
                                        init_std=cfg.init_std)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = HeadNorm(cfg), HeadNorm(cfg)
        self.proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.bias,
                                      sequence_parallel=sequence_parallel,
                                      init_std=cfg.init_std / math.sqrt(2 * num_layers_total))

    def core_attention(self, q, k, v, causal=True, cu_seqlens=None, key_bounds=None):
        """q (b, sq, h, d), k and v (b, sk, h_kv, d) -> (b, sq, h, d). ``causal``: query i sees keys 0..i
        (sq == sk), within the window on a local layer; False: every query sees every key (one new token
        against a KV cache, already cut to the window). ``cu_seqlens``: queries see only keys of their own
        document (attend). ``key_bounds``: a padded KV cache's mask (KVSlot.key_bounds), which replaces the
        others (generation only)."""
        cfg = self.cfg
        if key_bounds is not None:
            return self._bounded_attention(q, k, v, key_bounds)
        if ps.get_cp_size() > 1 or cu_seqlens is not None:
            # Under CP this rank holds two chunks of the sequence and the rest comes round the ring; documents
            # are kept apart by the flash kernel's packed path, the micro-batch's rows laid end to end.
            return ring_attention(q, k, v, ps.get_cp_group() if ps.get_cp_size() > 1 else None,
                                  softmax_scale=self.scale, cu_seqlens=cu_seqlens, window=self.window)
        left = self.window - 1 if self.window and causal else None  # flash-attn's window_size (w - 1, 0)
        if cfg.core_attention == "flash":
            return kernels.flash_attention(q, k, v, causal=causal, softmax_scale=self.scale,
                                           window_size=None if left is None else (left, 0))
        # Unfused path: explicit scores, Megatron's scaled-masked softmax, dropout on this rank's heads.
        hidden = None
        if left is not None:
            hidden = ~attention_args.allowed(q.shape[1], k.shape[1], True, left, q.device)
        probs = kernels.scaled_masked_softmax(self._scores(q, k), mask=hidden, scale=self.scale,
                                              causal=causal and hidden is None)
        probs = _dropout(probs, cfg.attention_dropout, self.training, sharded=True)
        return torch.matmul(probs, self._heads(v)).transpose(1, 2)

    def _heads(self, t):
        """(b, s, h_kv, d) -> (b, h, s, d): the unfused path's layout, each key/value head repeated per query."""
        t = t.transpose(1, 2)
        return t.repeat_interleave(self.heads_per_group, dim=1) if self.heads_per_group > 1 else t

    def _scores(self, q, k):
        return torch.matmul(q.transpose(1, 2), self._heads(k).transpose(-1, -2))

    def _bounded_attention(self, q, k, v, key_bounds):
        """Attention where query i of row n sees keys [lo[n, i], hi[n, i]): the flash kernel's general mask,
        or the unfused path's scores with Megatron's masked softmax (True = hidden)."""
        if self.cfg.core_attention == "flash":
            return kernels.flash_attention_forward(q, k, v, causal=False, softmax_scale=self.scale,
                                                   key_bounds=key_bounds)[0]
        lo, hi = key_bounds
        col = torch.arange(k.shape[1], device=q.device)
        hidden = ((col < lo[..., None]) | (col >= hi[..., None])).unsqueeze(1)  # (b, 1, sq, sk)
        probs = kernels.scaled_masked_softmax(self._scores(q, k), mask=hidden, scale=self.scale)
        return torch.matmul(probs, self._heads(v)).transpose(1, 2)

    def forward(self, x, rope, kv=None, cu_seqlens=None):
        """``kv``: this layer's KVSlot, which the new keys and values join before attention."""
        return self.attend(self.qkv(x), rope, kv, cu_seqlens)

    def attend(self, qkv, rope, kv=None, cu_seqlens=None):
        """Attention from the QKV projection's output [s, b, local_groups * (hpg + 2) * d] (full s: the
        projection gathered an SP input) to the output projection's. ``cu_seqlens``: the micro-batch's
        document boundaries (data.reset_attention_mask), its rows laid end to end."""
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_groups, self.heads_per_group + 2, self.cfg.head_dim)
        q = qkv[:, :, :, :self.heads_per_group].reshape(s, b, -1, self.cfg.head_dim)
        k, v = qkv[:, :, :, self.heads_per_group], qkv[:, :, :, self.heads_per_group + 1]
        if self.cfg.qk_norm:  # Qwen3: before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (b, s, heads, d): the kernels' layout
        causal, bounds = True, None
        if kv is not None:
            k, v, causal = kv.extend(k, v, self.window)
            bounds = kv.key_bounds
        if self.selective_recompute and kv is None:  # Korthikanti et al. 2022: recompute only the s^2 part
            ctx = checkpoint(self.core_attention, q, k, v, True, cu_seqlens)
        else:  # a cache means inference: nothing to recompute
            ctx = self.core_attention(q, k, v, causal, cu_seqlens, bounds)
        ctx = ctx.transpose(0, 1).reshape(s, b, -1)
        return self.proj(ctx)


def _rotate(x, cos, sin):
    """RoPE on x [s, b, heads, d]: tables (s, rot/2) shared by the batch's rows, or (s, b, rot/2) when every
    row has its own positions (data.reset_position_ids), applied to the rows flattened (a view)."""
    if cos.dim() == 3:
        s, b = x.shape[:2]
        flat = x.reshape(1, s * b, *x.shape[2:])
        return kernels.apply_rope(flat, cos.reshape(s * b, -1), sin.reshape(s * b, -1)).view(x.shape)
    return kernels.apply_rope(x.transpose(0, 1), cos, sin).transpose(0, 1)
