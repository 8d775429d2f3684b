"""The attention features of issue 26 (model/rope.py, model/attention.py, context_parallel.py):

- RoPE scaling (linear, llama3, yarn with DeepSeek's mscale): inverse frequencies, attention factor, cos/sin
  tables and softmax scale against transformers' ROPE_INIT_FUNCTIONS, its rotary embedding and
  yarn_apply_mscale; the default tables come from the cache;
- one attention layer against transformers' Qwen3Attention (QK-norm, head_dim != hidden / heads, llama3 RoPE,
  sliding window as transformers masks it) and Qwen2Attention (biases on q, k, v only), flash and unfused;
- two model flavours (QK-norm + qkv bias + kv_channels + llama3; local/global windows + yarn) under tp 2 + SP,
  pp 2 (1F1B, interleaved), cp 2, dp 2 + ZeRO-1 equal to the serial run, and ring attention with documents
  and a window spanning ranks equal to the one-rank kernel (one spawn of 4 gloo ranks);
- generation with a window: cached greedy decoding (one sequence, and the padded batch that drops rows)
  equals the forward without a cache, and a local layer's cache never holds more than the window.
"""
import math

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.config.model import rope_scaling_params
from megagopher.context_parallel import _Mask, ring_attention, split_for_cp_rank, zigzag_positions
from megagopher.generation.batch import generate_batch
from megagopher.generation.core import generate
from megagopher.model import GPTConfig
from megagopher.model.attention import Attention, KVCache
from megagopher.model.gpt import GPTModel
from megagopher.model.rope import attention_factor, inv_freq, rope_tables, softmax_scale
from megagopher.testing import spawn
from layouts import check_equal, model_config, train

SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    # rotary dim 24, theta 1e4: wavelengths 6.3 (kept), 13.5 and 29 (blended), 63 and longer (divided)
    "llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    # the ramp between dimensions 3.02 -> 3 and 5.73 -> 6 (rotary dim 24; 1.51 -> 1 and 2.87 -> 3 at 12)
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16.0,
             "beta_slow": 2.0},
    "yarn_deepseek": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 2048, "mscale": 0.8,
                      "mscale_all_dim": 0.7},
}
LLAMA3 = SCALINGS["llama3"]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0, "mscale_all_dim": 1.0}


def _hf_rope(cfg, config_class=LlamaConfig, **kw):
    """A transformers config with ``cfg``'s attention shape and RoPE parameters."""
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_percent}
    if cfg.rope_scaling:
        scaling = rope_scaling_params(cfg.rope_scaling)
        params.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling["type"])
    return config_class(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, rope_parameters=params,
                        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
                        attn_implementation="eager", **kw)


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_rope_scaling_matches_transformers(name, rotary_percent):
    cfg = GPTConfig(hidden_size=64, num_attention_heads=4, kv_channels=24, position_embedding="rope",
                    rotary_percent=rotary_percent, seq_length=48, rope_scaling=SCALINGS[name])
    hf = _hf_rope(cfg)
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[cfg.rope_scaling["type"]](hf, "cpu")
    torch.testing.assert_close(inv_freq(cfg).float(), ref_inv)  # transformers computes them in fp32
    assert math.isclose(attention_factor(cfg), ref_factor, rel_tol=1e-12)
    assert math.isclose(softmax_scale(cfg), yarn_apply_mscale(hf.rope_parameters, cfg.head_dim ** -0.5),
                         rel_tol=1e-12)
    positions = torch.arange(cfg.seq_length)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, cfg.seq_length), positions[None])
    cos, sin = rope_tables(cfg, cfg.seq_length, "cpu")
    half = cfg.rotary_dim // 2
    torch.testing.assert_close(cos, ref_cos[0, :, :half])
    torch.testing.assert_close(sin, ref_sin[0, :, :half])
    # Computed once: the default positions' tables are the cached tensors; other positions agree with them.
    assert all(a is b for a, b in zip(rope_tables(cfg, cfg.seq_length, "cpu"), (cos, sin)))
    torch.testing.assert_close(rope_tables(cfg, 7, "cpu", offset=5)[0], cos[5:12], rtol=0, atol=0)
    zig_cos, _ = rope_tables(cfg, cfg.seq_length // 2, "cpu", cp=(2, 1))
    torch.testing.assert_close(zig_cos, split_for_cp_rank(cos, 2, 1, dim=0), rtol=0, atol=0)


def _load_hf_attention(ours, hf, cfg):
    """Our Attention's weights from a transformers attention (q/k/v/o projections, QK-norms): the fused QKV
    rows per query group, [q heads of group j, k_j, v_j]."""
    d, g = cfg.head_dim, cfg.num_query_groups
    hpg = cfg.num_attention_heads // g

    def fused(q, k, v):
        return torch.cat([torch.cat([q[j * hpg * d:(j + 1) * hpg * d], k[j * d:(j + 1) * d], v[j * d:(j + 1) * d]])
                          for j in range(g)])
    with torch.no_grad():
        ours.qkv.weight.copy_(fused(hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight))
        if hf.q_proj.bias is not None:
            ours.qkv.bias.copy_(fused(hf.q_proj.bias, hf.k_proj.bias, hf.v_proj.bias))
        ours.proj.weight.copy_(hf.o_proj.weight)
        if cfg.qk_norm:
            ours.q_norm.weight.copy_(hf.q_norm.weight)
            ours.k_norm.weight.copy_(hf.k_norm.weight)


ATTENTION_CASES = {
    # QK-norm, head_dim 12 != 48 / 4, GQA, llama3 RoPE, sliding window of 5 over 16 tokens
    "qwen3 window": (dict(qk_norm=True, kv_channels=12, rope_scaling=LLAMA3, window_size=5, bias=False),
                     Qwen3Attention, Qwen3Config, dict(layer_types=["sliding_attention"], sliding_window=5)),
    "qwen3 global": (dict(qk_norm=True, kv_channels=12, bias=False), Qwen3Attention, Qwen3Config, {}),
    # yarn without mscale_all_dim: transformers' Llama/Qwen attention keeps head_dim ** -0.5 (only DeepSeek's
    # multiplies it by mscale ** 2, checked against yarn_apply_mscale above)
    "qwen2 qkv bias": (dict(qkv_bias=True, bias=False, rope_scaling=SCALINGS["yarn"]), Qwen2Attention,
                       Qwen2Config, {}),
}


@pytest.mark.parametrize("core", ["flash", "unfused"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_layer_equals_transformers(case, core):
    ours_kw, hf_class, config_class, hf_kw = ATTENTION_CASES[case]
    cfg = GPTConfig(hidden_size=48, num_attention_heads=4, num_query_groups=2, seq_length=16, num_layers=1,
                    position_embedding="rope", normalization="rmsnorm", core_attention=core, **ours_kw)
    torch.manual_seed(0)
    hf_config = _hf_rope(cfg, config_class, num_hidden_layers=1, **hf_kw)
    hf = hf_class(hf_config, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours = Attention(cfg, 1, False, False, layer_number=0)
    assert ("qkv.bias" in dict(ours.named_parameters())) == cfg.qkv_bias and ours.proj.bias is None
    _load_hf_attention(ours, hf, cfg)
    b, s = 2, cfg.seq_length
    x = torch.randn(b, s, cfg.hidden_size)
    positions = torch.arange(s)
    q_idx, kv_idx = positions[:, None], positions[None, :]
    allowed = (sliding_window_causal_mask_function(cfg.window_size) if cfg.window_size
               else causal_mask_function)(0, 0, q_idx, kv_idx)  # transformers' own mask: its off-by-one
    mask = torch.zeros(b, 1, s, s).masked_fill(~allowed, float("-inf"))
    hf_cos_sin = LlamaRotaryEmbedding(hf_config)(x, positions[None].expand(b, s))
    ref = hf(x, hf_cos_sin, mask)[0]
    with torch.no_grad():
        got = ours(x.transpose(0, 1).contiguous(), rope_tables(cfg, s, "cpu")).transpose(0, 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---- every parallelism ------------------------------------------------------------------------------------
FLAVOURS = {  # llama flavour, 4 layers (interleaved pp 2 x vpp 2 needs them), seq_length 16
    "qk_norm + qkv_bias + kv_channels + llama3": dict(qk_norm=True, qkv_bias=True, kv_channels=12,
                                                      rope_scaling=LLAMA3),
    "local/global window 5 + yarn": dict(window_size=5, window_pattern=["local", "global"], rope_scaling=YARN),
}
STEPS = 2  # two optimizer steps: the second runs on parameters the first updated from reduced gradients
LAYOUTS = {
    "tp2 sp": dict(tp=2, sp=True),
    "pp2 1f1b": dict(tp=1, pp=2),
    "pp2 interleaved vpp2": dict(tp=1, pp=2, vpp=2, schedule="interleaved"),
    "cp2": dict(tp=1, cp=2),
    "dp2 zero1": dict(tp=1, distributed=True),
}
EXTRA = {  # QK-norm weights are partial over TP without sequence parallelism too
    "qk_norm + qkv_bias + kv_channels + llama3": {"tp2 (no sp)": dict(tp=2)},
}


@pytest.mark.parametrize("documents", [False, True])
def test_ring_blocks_follow_global_positions_and_skip_chunks_out_of_reach(documents):
    """Every ring block's key_bounds and query_bounds (the dK/dV kernel's view) equal the mask written from the
    global positions (causal, same document, key > query - w); without documents, exactly the key chunks some
    local query reaches are computed."""
    b, s, cp, w = 2, 24, 3, 6  # chunks of 4: a window of 6 reaches exactly the last key of the chunk two back
    cu = torch.tensor([0, 7, 24, 30, 48], dtype=torch.int32) if documents else None
    flat = torch.arange(b)[:, None] * s + torch.arange(s)
    doc = torch.searchsorted(cu, flat.int(), right=True) if documents else torch.zeros(b, s, dtype=torch.long)
    for rank in range(cp):
        mask, qpos = _Mask(cu, b, s, cp, rank, w, "cpu"), zigzag_positions(s, cp, rank)
        for source in range(cp):
            kpos = zigzag_positions(s, cp, source)
            want = ((kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - w)
                    & (doc[:, qpos][:, :, None] == doc[:, kpos][:, None, :]))
            got_k, got_q = torch.zeros_like(want), torch.zeros_like(want)
            pieces = mask.pieces(source, rank, cp)
            for rows, cols, causal, (lo, hi), (q_lo, q_hi) in pieces:
                r = torch.arange(len(qpos))[rows][:, None]
                c = torch.arange(len(kpos))[cols][None, :]
                kk, qq = torch.arange(c.shape[1]), torch.arange(r.shape[0])
                got_k[:, r, c] = (kk >= lo[..., None]) & (kk < hi[..., None])
                got_q[:, r, c] = (qq[:, None] >= q_lo[:, None, :]) & (qq[:, None] < q_hi[:, None, :])
                assert not causal
            assert torch.equal(got_k, want) and torch.equal(got_q, want), (rank, source)
            if not documents:
                reached = sum(bool(want[:, :, half].any()) for half in (slice(0, 4), slice(4, 8)))
                assert len(pieces) == reached, (rank, source)


def _ring_with_documents_and_window(rank):
    """Ring attention at cp 2 with packed documents and a window of 6 (chunks of 4: the window spans ranks)
    against the one-rank kernel, forward and backward."""
    ps.initialize_model_parallel(tp=1, cp=2)
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 2, 16, 2, 8
    q, k, v, dout = (torch.randn(b, s, h, d, generator=gen) for _ in range(4))
    cu = torch.tensor([0, 5, 16, 19, 32], dtype=torch.int32)  # rows laid end to end: a document crosses none
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    packed = [t.reshape(1, b * s, h, d) for t in full]
    ref = kernels.flash_attention(*packed, causal=True, cu_seqlens=cu, window_size=(5, 0)).view(b, s, h, d)
    ref.backward(dout)
    cp, r = ps.get_cp_size(), ps.get_cp_rank()
    local = [split_for_cp_rank(t, cp, r).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, ps.get_cp_group(), cu_seqlens=cu, window=6)
    out.backward(split_for_cp_rank(dout, cp, r))
    failures = []
    for name, got, want in [("out", out, ref)] + [(f"d{n}", t.grad, f.grad) for n, t, f in zip("qkv", local, full)]:
        want = split_for_cp_rank(want.detach(), cp, r)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            failures.append(f"ring attention with documents and a window: {name} differs by "
                            f"{float((got - want).abs().max())}")
    ps.destroy_model_parallel()
    return failures


def _layouts(rank, world_size):
    failures = _ring_with_documents_and_window(rank)
    for flavour, kw in FLAVOURS.items():
        cfg = model_config("llama", num_layers=4, **kw)
        ref = train(cfg, steps=STEPS)[0]
        for name, kwargs in {**LAYOUTS, **EXTRA.get(flavour, {})}.items():
            try:
                check_equal(f"{flavour}, {name}", train(cfg, steps=STEPS, **kwargs)[0], ref)
            except AssertionError as e:
                failures.append(str(e))
    dist.barrier()
    return failures


def test_attention_features_under_every_layout_equal_serial():
    for failures in spawn(_layouts, 4):
        assert not failures, failures


# ---- generation with a window -----------------------------------------------------------------------------
@pytest.mark.parametrize("core", ["flash", "unfused"])
def test_windowed_generation_cache_equals_forward_and_stays_bounded(core):
    w = 4
    cfg = model_config("llama", seq_length=40, window_size=w, window_pattern=["local", "global"],
                       rope_scaling=YARN, qk_norm=True, init_std=0.3, core_attention=core)
    model = GPTModel(cfg).initialize(7).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=gen).tolist()[0]
    with torch.no_grad():
        cache, ids = KVCache(), list(prompt)
        logits = model(torch.tensor([ids]), kv_cache=cache)[:, -1]
        for _ in range(12):
            full = model(torch.tensor([ids]))[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            ids.append(int(full.argmax()))
            local = [len(s) for i, s in cache.slots.items() if cfg.is_local_layer(i)]
            assert local and max(local) <= w and len(cache) == len(ids) - 1
            logits = model(torch.tensor([ids[-1:]]), kv_cache=cache, position_offset=len(ids) - 1)[:, -1]
    assert generate(model, prompt, 12) == generate(model, prompt, 12, use_cache=False) == ids[len(prompt):]
    # The padded batch: prompts of 1, 9 and 11 tokens (padding 10, 2, 0) whose rows end after 10, 3 and 1 new
    # tokens: KVCache.keep then trims 2 columns, fewer than a local slot dropped, then 8, more than it dropped.
    prompts = [prompt[:1], prompt, prompt[:6] + prompt[:5]]
    budgets = [10, 3, 1]
    singles = [generate(model, p, n, use_cache=False) for p, n in zip(prompts, budgets)]
    assert generate_batch(model, prompts, max_new_tokens=budgets) == singles
