"""Multi-head latent attention (megagopher/model/mla.py): the module against transformers' DeepseekV3Attention
(the outside reference: a tiny random DeepseekV3Config, its weights copied into ours with the RoPE rows taken
from DeepSeek's interleaved pairs to our rotate-half order), outputs and every gradient; the generation
cache, which holds only the latent and the rope key and decodes exactly as the no-cache forward, padded
batches included; ring attention with value heads narrower than query/key heads; and a 4-layer MLA model
under tp 2 + SP, tp 2 without SP, pp 2 (1F1B and interleaved), cp 2 and dp 2 + ZeRO-1 equal to the serial run
(one spawn of 2 gloo ranks, tests/layouts.py), with q_lora_rank > 0 and = 0.
"""
import pytest
import torch
import torch.distributed as dist

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.config import ConfigError
from megagopher.context_parallel import ring_attention, split_for_cp_rank
from megagopher.model import GPTConfig
from megagopher.model.attention import KVCache
from megagopher.model.gpt import GPTModel
from megagopher.model.mla import MLAttention
from megagopher.model.rope import rope_tables
from megagopher.testing import spawn
from layouts import check_equal, model_config, train

MLA = dict(q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=1.0)


def _mla_config(**kw):
    return model_config("llama", num_query_groups=0, **{**MLA, **kw})


# ---- against transformers ---------------------------------------------------------------------------------
def _hf_attention(cfg):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
    hf_cfg = DeepseekV3Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                              num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or None,
                              kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                              qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                              attention_bias=cfg.bias, rope_interleave=True, rope_parameters=rope,
                              max_position_embeddings=cfg.seq_length)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = DeepseekV3Attention(hf_cfg, layer_idx=0)
    with torch.no_grad():
        for p in attn.parameters():  # norms away from 1 and biases away from 0, so a swap would show
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() == 2 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return attn, DeepseekV3RotaryEmbedding(hf_cfg)


def _interleaved_to_half(rot):
    """Index of our rotate-half channel j among DeepSeek's interleaved ones: pair i is (2i, 2i + 1) there,
    (i, i + rot/2) here."""
    return torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2)])


def _to_ours(name, t, cfg):
    """transformers' tensor (weight, bias or gradient) of ``name`` in our layout: the rope rows permuted."""
    nope, rot, perm = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, _interleaved_to_half(cfg.qk_rope_head_dim)
    if name.startswith(("q_b_proj", "q_proj")):
        heads = t.view(cfg.num_attention_heads, nope + rot, *t.shape[1:])
        return torch.cat([heads[:, :nope], heads[:, nope:][:, perm]], dim=1).reshape(t.shape)
    if name.startswith("kv_a_proj_with_mqa"):
        return torch.cat([t[:cfg.kv_lora_rank], t[cfg.kv_lora_rank:][perm]])
    return t


def _our_name(hf_name):
    return hf_name.replace("o_proj", "proj")


@pytest.mark.parametrize("kw", [dict(rope_scaling=YARN), dict(q_lora_rank=0, bias=True)],
                         ids=["q_lora yarn", "q_proj bias"])
def test_mla_equals_transformers_deepseek_v3_attention(kw):
    cfg = _mla_config(**kw)
    hf, rotary = _hf_attention(cfg)
    ours = MLAttention(cfg, cfg.num_layers, sequence_parallel=False, selective_recompute=False)
    hf_params = dict(hf.named_parameters())
    assert {_our_name(n) for n in hf_params} == {n for n, _ in ours.named_parameters()}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            hf_name = name.replace("proj.", "o_proj.") if name.startswith("proj.") else name
            p.copy_(_to_ours(name, hf_params[hf_name], cfg))
    b, s = 3, cfg.seq_length
    x = torch.randn(b, s, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(b, s, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    x_hf, x_ours = x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()
    mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None]
    position_ids = torch.arange(s)[None].expand(b, s)
    want = hf(x_hf, rotary(x_hf, position_ids), mask)[0]
    want.backward(upstream)
    got = ours(x_ours, rope_tables(cfg, s, "cpu"))
    got.backward(upstream.transpose(0, 1))
    torch.testing.assert_close(got.transpose(0, 1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ours.grad.transpose(0, 1), x_hf.grad, rtol=1e-5, atol=1e-5)
    for name, p in ours.named_parameters():
        hf_name = name.replace("proj.", "o_proj.") if name.startswith("proj.") else name
        torch.testing.assert_close(p.grad, _to_ours(name, hf_params[hf_name].grad, cfg), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")


def test_config_rules():
    with pytest.raises(ConfigError, match="window_size do not apply"):
        _mla_config(window_size=4)
    with pytest.raises(ConfigError, match="parallel_residual"):
        _mla_config(parallel_residual=True)
    with pytest.raises(ConfigError, match="needs v_head_dim"):
        _mla_config(v_head_dim=0)


# ---- generation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("core", ["flash", "unfused"])
def test_cache_holds_latent_and_rope_key_and_decodes_as_without_cache(core):
    cfg = _mla_config(core_attention=core, seq_length=20)
    model = GPTModel(cfg).initialize(3).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        steps = [model(ids[:, :11], kv_cache=cache)]
        steps += [model(ids[:, t:t + 1], kv_cache=cache, position_offset=t) for t in range(11, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    for slot in cache.slots.values():  # the latent and the rope key per token, nothing per head
        assert slot.k.shape == (2, 20, cfg.kv_lora_rank) and slot.v.shape == (2, 20, 1, cfg.qk_rope_head_dim)
    # Greedy decoding with the cache picks the tokens the no-cache forward picks.
    with torch.no_grad():
        seq, cache = ids[:, :6], KVCache()
        logits = model(seq, kv_cache=cache)[:, -1]
        for t in range(6, 14):
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            logits = model(seq[:, -1:], kv_cache=cache, position_offset=t)[:, -1]
        nocache = seq[:, :6]
        for _ in range(6, 14):
            nocache = torch.cat([nocache, model(nocache)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, nocache)


def test_padded_cache_and_keep_with_mla():
    """Rows of different lengths right-aligned in a padded cache (batched generation), one row dropped half
    way (KVCache.keep): every row's logits equal its own unpadded, uncached forward."""
    cfg = _mla_config(seq_length=16)
    model = GPTModel(cfg).initialize(5).eval()
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in (9, 5, 7)]
    pad = [9 - len(r) for r in rows]
    prompt = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pad, rows)])
    position_ids = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), torch.arange(9 - p)]) for p in pad])
    more = torch.randint(0, cfg.vocab_size, (3, 4), generator=gen)
    with torch.no_grad():
        cache = KVCache(pad=pad)
        got = [[l] for l in model(prompt, kv_cache=cache, position_ids=position_ids)[:, -1:]]
        live = [0, 1, 2]
        for t in range(4):
            if t == 2:  # row 0 finishes: the cache keeps rows 1 and 2 and trims their common padding
                live = [1, 2]
                cache.keep([1, 2])
            pos = torch.tensor([[9 - pad[i] + t] for i in live])
            out = model(more[live, t:t + 1], kv_cache=cache, position_ids=pos)
            for j, i in enumerate(live):
                got[i].append(out[j:j + 1, -1:][0])
        for i, r in enumerate(rows):
            n = 1 + (4 if i else 2)
            whole = torch.cat([r, more[i, :n - 1]])[None]
            want = model(whole)[0, len(r) - 1:]
            torch.testing.assert_close(torch.cat(got[i]), want, rtol=1e-5, atol=1e-5)
    assert cache.slots[0].k.shape == (2, 9 - min(pad[1:]) + 4, cfg.kv_lora_rank)


# ---- every parallelism ------------------------------------------------------------------------------------
LAYOUTS = {
    "tp2 sp": dict(tp=2, sp=True),
    "tp2 (no sp), selective recompute": dict(tp=2, recompute="selective"),
    "pp2 1f1b": dict(tp=1, pp=2),
    "pp2 interleaved vpp2": dict(tp=1, pp=2, vpp=2, schedule="interleaved"),
    "cp2": dict(tp=1, cp=2),
    "dp2 zero1": dict(tp=1, distributed=True),
}
Q_PROJ_LAYOUTS = {"tp2 sp": dict(tp=2, sp=True)}  # q_proj: a column-parallel projection of the gathered x


def _ring_with_value_head_dim(documents):
    """Ring attention at cp 2 with d_qk 24 and d_v 16 against the one-rank kernel, forward and backward."""
    ps.initialize_model_parallel(tp=1, cp=2)
    gen = torch.Generator().manual_seed(3)
    b, s, h = 2, 16, 2
    q, k = (torch.randn(b, s, h, 24, generator=gen) for _ in range(2))
    v, dout = (torch.randn(b, s, h, 16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 5, 16, 19, 32], dtype=torch.int32) if documents else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    if documents:
        ref = kernels.flash_attention(*(t.reshape(1, b * s, h, -1) for t in full), causal=True,
                                      cu_seqlens=cu).view(b, s, h, 16)
    else:
        ref = kernels.flash_attention(*full, causal=True)
    ref.backward(dout)
    cp, r = ps.get_cp_size(), ps.get_cp_rank()
    local = [split_for_cp_rank(t, cp, r).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, ps.get_cp_group(), cu_seqlens=cu)
    out.backward(split_for_cp_rank(dout, cp, r))
    failures = []
    for name, got, want in [("out", out, ref)] + [(f"d{n}", t.grad, f.grad) for n, t, f in zip("qkv", local, full)]:
        want = split_for_cp_rank(want.detach(), cp, r)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            failures.append(f"ring attention d_v != d_qk (documents={documents}): {name} differs")
    ps.destroy_model_parallel()
    return failures


def _layouts(rank, world_size):
    failures = _ring_with_value_head_dim(False) + _ring_with_value_head_dim(True)
    for variant, kw, layouts in (("q_lora_rank 12", {}, LAYOUTS), ("q_lora_rank 0", dict(q_lora_rank=0),
                                                                     Q_PROJ_LAYOUTS)):
        cfg = _mla_config(num_layers=4, **kw)
        ref = train(cfg)[0]
        for name, kwargs in layouts.items():
            try:
                check_equal(f"MLA {variant}, {name}", train(cfg, **kwargs)[0], ref)
            except AssertionError as e:
                failures.append(str(e))
    dist.barrier()
    return failures


def test_mla_model_under_every_layout_equals_serial():
    for failures in spawn(_layouts, 2):
        assert not failures, failures
