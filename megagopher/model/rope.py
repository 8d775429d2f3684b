"""Rotary position tables (Su et al. 2021, RoFormer) with the context-extension scalings of ``model.rope_scaling``,
and the attention softmax scale that goes with them.

The scalings change the inverse frequencies (and for YaRN the tables' magnitude), as transformers'
``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` computes them (the outside reference of tests/test_arch_attention.py):

- ``linear`` (kaiokendev's position interpolation): every frequency divided by ``factor``;
- ``llama3`` (Llama 3.1): wavelengths longer than original_max_position_embeddings / low_freq_factor divided by
  ``factor``, shorter than .../high_freq_factor kept, a smooth interpolation between;
- ``yarn`` (Peng et al. 2023, "YaRN"; DeepSeek-V2/V3's form): interpolated and extrapolated frequencies blended
  by a linear ramp between the dimensions where beta_fast and beta_slow rotations fit in
  original_max_position_embeddings (floor/ceil, transformers' truncate=True); cos and sin are multiplied by the
  attention factor yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim) when
  mscale_all_dim is set, else yarn_get_mscale(factor) (transformers' rule), and the softmax scale by
  yarn_get_mscale(factor, mscale_all_dim) ** 2 (DeepseekV3Attention).

Tables are computed in float64 and handed out in float32. The inverse frequencies, and the tables of the
default positions 0..s-1 (or a context-parallel rank's zig-zag chunks of them), are computed once per
configuration, length and device and then reused by every forward; tables for other positions (document
masking's per-row position ids, a decoding step's offset) are computed from the cached frequencies.
"""
import functools
import math

import torch

from megagopher.config.model import rope_scaling_params
from megagopher.context_parallel import zigzag_positions


def _key(cfg):
    """The rope parameters of ``cfg`` as a hashable key (the caches' key)."""
    table = tuple(sorted(rope_scaling_params(cfg.rope_scaling).items())) if cfg.rope_scaling else ()
    return float(cfg.rope_theta), int(cfg.rotary_dim), table


def yarn_get_mscale(scale, mscale=1.0):
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(cfg):
    """The factor cos and sin are multiplied by: 1, or YaRN's (see the module docstring)."""
    if not cfg.rope_scaling or cfg.rope_scaling["type"] != "yarn":
        return 1.0
    p = rope_scaling_params(cfg.rope_scaling)
    if p["mscale"] and p["mscale_all_dim"]:
        return yarn_get_mscale(p["factor"], p["mscale"]) / yarn_get_mscale(p["factor"], p["mscale_all_dim"])
    return yarn_get_mscale(p["factor"])


def softmax_scale(cfg):
    """The attention scores' scale: head_dim ** -0.5, times yarn_get_mscale(factor, mscale_all_dim) ** 2 under
    YaRN with mscale_all_dim set (DeepSeek-V2/V3)."""
    scale = cfg.head_dim ** -0.5
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "yarn":
        p = rope_scaling_params(cfg.rope_scaling)
        if p["mscale_all_dim"]:
            scale *= yarn_get_mscale(p["factor"], p["mscale_all_dim"]) ** 2
    return scale


def _yarn(base_inv, dim, theta, p):
    """YaRN's blend of interpolated (inv / factor) and extrapolated (inv) frequencies."""
    def correction_dim(rotations):
        return dim * math.log(p["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(p["beta_fast"] or 32)), 0)
    high = min(math.ceil(correction_dim(p["beta_slow"] or 1)), dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return base_inv / p["factor"] * (1 - extrapolate) + base_inv * extrapolate


def _llama3(base_inv, p):
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / p["low_freq_factor"], old / p["high_freq_factor"]
    wavelen = 2 * math.pi / base_inv
    scaled = torch.where(wavelen > low_wavelen, base_inv / p["factor"], base_inv)
    smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / p["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


@functools.lru_cache(maxsize=32)
def _inv_freq(key, device):
    theta, rot, table = key
    inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    p = dict(table)
    kind = p.get("type")
    if kind == "linear":
        inv = inv / p["factor"]
    elif kind == "llama3":
        inv = _llama3(inv, p)
    elif kind == "yarn":
        inv = _yarn(inv, rot, theta, p)
    return inv.to(device)


def inv_freq(cfg, device=None):
    """The float64 inverse frequencies (rotary_dim // 2,) of ``cfg``'s RoPE and scaling (cached: do not modify)."""
    return _inv_freq(_key(cfg), torch.device(device or "cpu"))


def _tables(cfg, positions, device):
    freqs = torch.outer(positions.to(device=device, dtype=torch.float64), inv_freq(cfg, device))
    scale = attention_factor(cfg)
    return (freqs.cos() * scale).float(), (freqs.sin() * scale).float()


@functools.lru_cache(maxsize=32)
def _default_tables(cfg_key, factor, seq_length, cp_size, cp_rank, device):
    if cp_size == 1:
        positions = torch.arange(seq_length, dtype=torch.float64)
    else:
        positions = zigzag_positions(seq_length * cp_size, cp_size, cp_rank)
    freqs = torch.outer(positions.to(device=device, dtype=torch.float64), _inv_freq(cfg_key, device))
    return (freqs.cos() * factor).float(), (freqs.sin() * factor).float()


def rope_tables(cfg, seq_length, device, offset=0, positions=None, cp=(1, 0)):
    """cos and sin of shape (seq_length, rotary_dim // 2), YaRN's attention factor folded in, for positions
    offset .. offset + seq_length - 1, for the 1-D ``positions`` given, or with ``cp`` = (cp size, cp rank) > 1
    for that context-parallel rank's zig-zag chunks (seq_length local tokens of a seq_length * cp sequence).
    Offset-free default positions come from a cache shared by every forward: do not modify them in place."""
    device = torch.device(device)
    if positions is not None:
        return _tables(cfg, positions, device)
    if offset:
        return _tables(cfg, torch.arange(offset, offset + seq_length, dtype=torch.float64), device)
    return _default_tables(_key(cfg), attention_factor(cfg), seq_length, cp[0], cp[1], device)
