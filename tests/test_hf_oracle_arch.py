"""transformers as the oracle of the 2024-2026 architectures (issue 26, item 7): a small random model of each,
built in-process (no download) and imported with ``import_hf``, computes transformers' logits, per-parameter
gradients of the mean token cross entropy (fp32) and greedy generation:

  llama        LlamaForCausalLM with Llama 3.1's rope_scaling (type llama3), GQA;
  qwen2        Qwen2ForCausalLM: q/k/v biases, YaRN (Qwen2.5's long-context form), a sliding window on the
               second layer only (layer_types), window 3 < the sequence;
  qwen3        Qwen3ForCausalLM: QK-norm, head_dim 12 apart from hidden / heads = 8, linear rope scaling;
  mistral      MistralForCausalLM: a sliding window of 3 in every layer;
  qwen3_moe    Qwen3MoeForCausalLM: QK-norm, softmax routing without renormalisation (norm_topk_prob
               false), layer 0 dense (mlp_only_layers);
  deepseek_v3  DeepseekV3ForCausalLM: MLA with a query latent, interleaved rope rows, YaRN with mscale /
               mscale_all_dim, sigmoid routing with a random e_score_correction_bias, n_group 2 / topk_group 1,
               routed_scaling_factor 2.5, a shared expert, the first layer dense;
  deepseek_v3_plain (tp 1 and the round trip only): MLA without a query latent, rope_interleave false.

At tp 1 and, in ONE 4-rank spawn, at tp 2 x pp 2 with SP and pp 2 x ep 2 (MoE), through the trainer's 1F1B
step, gradients are gathered and mapped by the import's own mapping (test_hf_oracle.py's helpers). Import ->
export -> import is exact and transformers loads the export; DeepSeek's MTP module rides in mtp.safetensors and
equals transformers' MtpLayer; what cannot be expressed is refused naming it, both ways.
"""
import dataclasses
import json
import os

import pytest
import torch

from megagopher.export.hf import ExportError, choose_format, export_hf
from megagopher.export.hf_config import DEFAULTS, HFImportError, model_config
from megagopher.export.hf_import import import_hf, our_tensors
from megagopher.export.loading import model_config_of, open_checkpoint
from megagopher.model import GPTConfig
from megagopher.testing import spawn
from test_hf_oracle import ATOL, RTOL, VOCAB, as_saved, batch, hf_loss, unpadded

SEQ = 8
# Logits (magnitude up to ~3) after two layers in fp32: a few ulp apart, 8.5e-7 seen (Mistral); gradients take
# test_hf_oracle's RTOL / ATOL.
LOGITS_ATOL = 2e-6
MOE = ("qwen3_moe", "deepseek_v3")
DISTRIBUTED = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "deepseek_v3")
ARCHS = DISTRIBUTED + ("deepseek_v3_plain",)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


def tf():
    import transformers  # here, not at import time: the spawned ranks import this module and need it not
    return transformers


def hf_config(arch):
    t = tf()
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if arch == "llama":
        return t.LlamaConfig(**common, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
    if arch == "qwen2":
        return t.Qwen2Config(**common, num_key_value_heads=2, rope_parameters=YARN, use_sliding_window=True,
                             sliding_window=3, layer_types=["full_attention", "sliding_attention"])
    if arch == "qwen3":
        return t.Qwen3Config(**common, num_key_value_heads=2, head_dim=12,
                             rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    if arch == "mistral":
        return t.MistralConfig(**common, num_key_value_heads=2, sliding_window=3)
    if arch == "qwen3_moe":  # no load-balancing loss: transformers pools the layers' routers (another definition)
        return t.Qwen3MoeConfig(**common, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=24, norm_topk_prob=False, mlp_only_layers=[0],
                                router_aux_loss_coef=0.0)
    mla = dict(moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
               first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=12, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=6, routed_scaling_factor=2.5)
    if arch == "deepseek_v3":
        return t.DeepseekV3Config(**common, **mla, q_lora_rank=16, rope_parameters={
            **YARN, "mscale": 0.8, "mscale_all_dim": 0.6, "beta_fast": 16, "beta_slow": 2})
    return t.DeepseekV3Config(**common, **mla, q_lora_rank=None, rope_interleave=False)


def random_model(arch, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf().AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32).eval()
        with torch.no_grad():  # every tensor random, norms and the selection bias included
            for p in model.parameters():
                p.normal_(0.0, 0.3)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{arch: (transformers model, GPTConfig, its directory, the imported checkpoint, step-1 gradients)}."""
    tmp, out = tmp_path_factory.mktemp("oracle_arch"), {}
    for seed, arch in enumerate(ARCHS):
        model = random_model(arch, seed)
        hf_dir, mg_dir = str(tmp / f"hf_{arch}"), str(tmp / f"mg_{arch}")
        model.save_pretrained(hf_dir)
        fmt, cfg, _ = import_hf(hf_dir, mg_dir, tokenizer=False)
        assert fmt == arch.replace("_plain", "")
        model.zero_grad()
        hf_loss(model, *batch(0)).backward()
        grads = as_saved(model, {n: p.grad for n, p in model.named_parameters()})
        out[arch] = (model, cfg, hf_dir, mg_dir, grads)
    return out


def check_grads(ours, arch, cfg, hf_dir, theirs, what):
    """``ours`` ({our name: full gradient}) equals ``theirs`` (saved names) mapped by the import's mapping;
    buffers (the selection bias) have no gradient on either side."""
    options = {"rope_interleave": json.load(open(f"{hf_dir}/config.json")).get("rope_interleave", True)}
    expected = {n: t for n, t in our_tensors(arch.replace("_plain", ""), cfg, dict(theirs), **options).items()
                if not n.endswith("expert_bias")}
    assert set(ours) == set(expected), sorted(set(ours) ^ set(expected))
    for name, t in expected.items():
        assert t.abs().max() > 0, f"{arch} {what} {name}: zero on both sides tests nothing"
        torch.testing.assert_close(ours[name], t, rtol=RTOL, atol=ATOL, msg=lambda m: f"{arch} {what} {name}:\n{m}")


def prompt(seed=0, b=2):
    return torch.randint(0, VOCAB, (b, SEQ), generator=torch.Generator().manual_seed(seed))


# -- tp 1 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_gradients_and_greedy_generation_at_tp1(models, arch):
    from megagopher.generate import generate, load_model
    model, cfg, hf_dir, mg_dir, grads = models[arch]
    loaded = load_model(mg_dir, tp=1, device="cpu")
    ids = prompt()
    with torch.no_grad():
        theirs = model(ids).logits
        ours = loaded.model.gather_logits(loaded.model.eval()(ids))
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=LOGITS_ATOL)
    net = loaded.model.train()
    net(input_ids=batch(0)[0], labels=batch(0)[1]).mean().backward()
    check_grads({n: unpadded(p, p.grad) for n, p in net.named_parameters()}, arch, cfg, hf_dir, grads, "tp1 grad")
    net.eval()
    # 5 + 10 tokens: past the window of 3 (the cache keeps only the window) and MLA's latent cache.
    expected = model.generate(ids[:1, :5], max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 5:].tolist()
    assert generate(loaded, ids[0, :5].tolist(), max_new_tokens=10, greedy=True) == expected


# -- tp 2 x pp 2 (SP) and pp 2 x ep 2: one spawn ----------------------------------------------------------------
def _layouts():
    return [(arch, dict(tp=2, pp=2)) for arch in DISTRIBUTED] + [(arch, dict(pp=2, ep=2)) for arch in MOE]


def _logits(path, layout, ids):
    """The last stage's logits at ``layout`` (stage 0's hidden states sent to stage 1)."""
    import torch.distributed as dist
    from megagopher import parallel_state as ps
    from megagopher.pipeline_parallel.stages import build_model_chunks
    from megagopher.training.checkpoint import load_weights
    ps.initialize_model_parallel(**layout)
    reader = open_checkpoint(path)
    cfg = model_config_of(reader)
    (chunk,) = build_model_chunks(cfg, sequence_parallel=ps.get_tp_size() > 1)
    load_weights(reader, [chunk])
    chunk.eval()
    out = None
    with torch.no_grad():
        if ps.is_pipeline_first_stage():
            dist.send(chunk(input_ids=ids).contiguous(), ps.get_pp_next_rank())
        else:
            hidden = torch.empty(SEQ // ps.get_tp_size(), ids.shape[0], cfg.hidden_size)
            dist.recv(hidden, ps.get_pp_prev_rank())
            out = chunk.gather_logits(chunk(hidden_states=hidden))
    ps.destroy_model_parallel()
    return out


def _all_layouts(rank, world, checkpoints, ids):
    from test_hf_oracle import _train
    return [(_logits(checkpoints[arch], layout, ids), _train(checkpoints[arch], layout, False, 1))
            for arch, layout in _layouts()]


@pytest.fixture(scope="module")
def spawned(models):
    results = spawn(_all_layouts, 4, {arch: models[arch][3] for arch in DISTRIBUTED}, prompt(1), timeout_s=600)
    out = {}
    for i, (arch, layout) in enumerate(_layouts()):
        runs = [r[i] for r in results]
        grads = {}
        for _, run in runs:
            assert run["losses"] == runs[0][1]["losses"]  # every rank agrees
            grads.update(run["grads"])
        logits = [lg for lg, _ in runs if lg is not None]
        out[arch, " x ".join(f"{k}{v}" for k, v in layout.items())] = (logits, runs[0][1]["losses"][0], grads)
    return out


JOBS = [(arch, " x ".join(f"{k}{v}" for k, v in layout.items())) for arch, layout in _layouts()]


@pytest.mark.parametrize("arch, layout", JOBS)
def test_logits_loss_and_gradients_at_tp2_pp2_and_ep2(models, spawned, arch, layout):
    model, cfg, hf_dir, _, grads = models[arch]
    logits, loss, ours = spawned[arch, layout]
    with torch.no_grad():
        theirs = model(prompt(1)).logits
        their_loss = float(hf_loss(model, *batch(0)))
    assert len(logits) == 2  # the last stage's ranks (tp 2) or its expert-parallel pair
    for lg in logits:
        torch.testing.assert_close(lg, theirs, rtol=RTOL, atol=LOGITS_ATOL)
    assert loss == pytest.approx(their_loss, rel=RTOL)
    check_grads(ours, arch, cfg, hf_dir, grads, f"gradient at {layout}")


# -- import -> export -> import -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_import_export_import_is_exact_and_transformers_loads_the_export(models, arch, tmp_path):
    model, cfg, _, mg_dir, _ = models[arch]
    assert export_hf(mg_dir, str(tmp_path / "hf"), tokenizer=False)[0] == arch.replace("_plain", "")
    assert import_hf(str(tmp_path / "hf"), str(tmp_path / "mg"), tokenizer=False)[1] == cfg
    first, second = open_checkpoint(mg_dir), open_checkpoint(str(tmp_path / "mg"))
    assert model_config_of(first) == model_config_of(second)  # the [model] round trip, every key
    assert sorted(first.names()) == sorted(second.names())
    for name in first.names():
        assert torch.equal(first.full_tensor(name), second.full_tensor(name)), name
    exported = tf().AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():  # the same function (DeepSeek's plain variant now with interleaved rope rows)
        torch.testing.assert_close(exported(prompt()).logits, model(prompt()).logits, rtol=RTOL, atol=LOGITS_ATOL)


def test_mtp_modules_ride_in_mtp_safetensors_under_deepseeks_names(models, tmp_path):
    """A DeepSeek-V3 with one MTP module: written as transformers' directory plus mtp.safetensors (model.layers.2.*,
    DeepSeek's names, hf.py), imported with its module (model.mtp_num_layers = 1), exported and imported again
    exactly; the copies of the shared embedding and head must equal them."""
    from safetensors.torch import load_file, save_file
    from megagopher.export.hf import hf_config as config_json, hf_tensors
    from megagopher.model import GPTModel
    cfg = dataclasses.replace(models["deepseek_v3"][1], mtp_num_layers=1)
    model, gen = GPTModel(cfg), torch.Generator().manual_seed(3)
    shapes = {n: getattr(p, "full_shape", p.shape) for n, p in model.named_parameters()}
    shapes.update((n, t.shape) for n, t in model.named_buffers() if n.endswith("expert_bias"))
    # Every tensor random, the norms included (their init, ones, would hide a swap of enorm and hnorm).
    ours = {n: torch.randn(shape, generator=gen) * (0.1 if n.endswith("expert_bias") else 0.3)
            for n, shape in shapes.items()}
    theirs = hf_tensors(ours.__getitem__, "deepseek_v3", cfg)
    src = tmp_path / "src"
    os.makedirs(src)
    mtp = {n: t.contiguous() for n, t in theirs.items() if n.startswith("model.layers.2.")}
    assert {n for n in mtp if not n.split(".", 3)[3].startswith(("self_attn.", "mlp.", "input_", "post_"))} == {
        f"model.layers.2.{n}" for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                        "embed_tokens.weight", "shared_head.head.weight")}
    save_file({n: t.contiguous().clone() for n, t in theirs.items() if n not in mtp}, str(src / "model.safetensors"))
    save_file({n: t.clone() for n, t in mtp.items()}, str(src / "mtp.safetensors"))
    json.dump(config_json(cfg, "deepseek_v3", torch.float32), open(src / "config.json", "w"))
    assert import_hf(str(src), str(tmp_path / "a"), tokenizer=False)[1] == cfg
    export_hf(str(tmp_path / "a"), str(tmp_path / "hf"), tokenizer=False)
    assert set(load_file(str(tmp_path / "hf" / "mtp.safetensors"))) == set(mtp)
    assert import_hf(str(tmp_path / "hf"), str(tmp_path / "b"), tokenizer=False)[1] == cfg
    first, second = open_checkpoint(str(tmp_path / "a")), open_checkpoint(str(tmp_path / "b"))
    assert sorted(first.names()) == sorted(second.names()) == sorted(ours)
    for name in first.names():
        assert torch.equal(first.full_tensor(name), ours[name]) and torch.equal(second.full_tensor(name), ours[name])
    mtp_equals_transformers_mtp_layer(str(tmp_path / "a"), str(tmp_path / "hf"))
    bad = {**mtp, "model.layers.2.embed_tokens.weight": mtp["model.layers.2.embed_tokens.weight"] + 1}
    save_file({n: t.clone() for n, t in bad.items()}, str(src / "mtp.safetensors"))
    with pytest.raises(HFImportError, match="model.layers.2.embed_tokens.weight differs from model.embed_tokens"):
        import_hf(str(src), str(tmp_path / "c"), tokenizer=False)


def mtp_equals_transformers_mtp_layer(mg_dir, hf_dir):
    """Depth 1's cross entropy summed over its targets: ours (the training forward's record, model/mtp.py)
    against transformers' own MTP layer (modeling_layers.MtpLayer, the speculative decoder of
    generate(use_mtp=True)) holding the exported mtp.safetensors: [enorm(embedding of t_i+1); hnorm(final-normed
    hidden state at i)] -> eh_proj -> DeepseekV3DecoderLayer -> post_norm -> the model's lm_head, target t_i+2."""
    from safetensors.torch import load_file
    from transformers.modeling_layers import MtpModel
    from megagopher.generate import load_model
    from megagopher.model.mtp import MTPLosses
    main = tf().AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    theirs = {}
    for name, t in load_file(f"{hf_dir}/mtp.safetensors").items():
        rest = name[len("model.layers.2."):]
        if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
            theirs["layers.0." + rest] = t
        elif rest == "shared_head.norm.weight":
            theirs["layers.0.post_norm.weight"] = t
        elif not rest.startswith(("embed_tokens.", "shared_head.head.")):
            theirs["layers.0.mtp_block." + rest] = t
    mtp = MtpModel(main, 1).eval()
    e = main.config.n_routed_experts
    for part in ("gate", "up", "down"):  # transformers 5's fused experts, as its loading would fuse them
        theirs[f"layers.0.mtp_block.mlp.experts.{part}"] = torch.stack(
            [theirs.pop(f"layers.0.mtp_block.mlp.experts.{j}.{part}_proj.weight") for j in range(e)])
    theirs["layers.0.mtp_block.mlp.experts.gate_up_proj"] = torch.cat(
        [theirs.pop("layers.0.mtp_block.mlp.experts.gate"), theirs.pop("layers.0.mtp_block.mlp.experts.up")], dim=1)
    theirs["layers.0.mtp_block.mlp.experts.down_proj"] = theirs.pop("layers.0.mtp_block.mlp.experts.down")
    missing, unexpected = mtp.load_state_dict(theirs, strict=False)
    assert not unexpected and all(n.startswith(("embed_tokens", "shared_head")) for n in missing), missing
    full = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h0 = main.model(full[:, :SEQ]).last_hidden_state[:, :SEQ - 1]
        positions = torch.arange(SEQ - 1)[None]
        hidden = mtp.layers[0](main.model.embed_tokens(full[:, 1:SEQ]), h0, main.model.rotary_emb(h0, positions),
                               None, positions, None)
        logits = main.lm_head(hidden).reshape(-1, VOCAB)
        expected = torch.nn.functional.cross_entropy(logits, full[:, 2:].reshape(-1), reduction="sum")
    model = load_model(mg_dir, tp=1, device="cpu").model.train()  # a training forward records the MTP losses
    model.mtp.losses = MTPLosses()
    model(input_ids=full[:, :SEQ], labels=full[:, 1:])
    assert float(expected) > 1.0
    torch.testing.assert_close(model.mtp.losses.pop()[0], expected, rtol=RTOL, atol=ATOL)


def test_defaults_are_transformers():
    classes = {arch: type(hf_config(arch)) for arch in ("qwen2", "qwen3", "mistral", "qwen3_moe", "deepseek_v3")}
    for arch, cls in classes.items():
        reference = cls()
        for key, value in DEFAULTS[arch].items():
            if value is not None and not (key == "sliding_window" and arch != "mistral"):  # None unless enabled
                assert getattr(reference, key) == value, (arch, key)


# -- what cannot be expressed -------------------------------------------------------------------------------------
def _hf(arch, **kw):
    config = hf_config(arch).to_dict()
    return {**config, "architectures": [tf().AutoModelForCausalLM._model_mapping[type(hf_config(arch))].__name__],
            **kw}


REFUSED_IMPORTS = [
    ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type 'dynamic' is not supported"),
    ("qwen2", dict(rope_parameters={**YARN, "mscale_all_dim": 1.0}), "mscale_all_dim = 1.0 is not supported"),
    ("qwen2", dict(layer_types=["full_attention", "chunked_attention"]),
     "layer_types entries \\['chunked_attention'\\]"),
    ("qwen3", dict(attention_bias=True), "attention_bias = true is not supported \\(qwen3 puts it on o_proj too"),
    ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[]),
     "decoder_sparse_step = 2, mlp_only_layers = \\[\\] make layers \\[1, 3\\] sparse"),
    ("deepseek_v3", dict(rope_parameters={**YARN, "attention_factor": 1.5}), "attention_factor"),
    ("deepseek_v3", dict(rope_parameters={**YARN, "truncate": False}), "truncate = false"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias = true is not supported \\(megagopher's MLA"),
    ("deepseek_v3", dict(num_key_value_heads=2), "num_key_value_heads = 2 < num_attention_heads = 4"),
]


@pytest.mark.parametrize("arch, keys, message", REFUSED_IMPORTS)
def test_imports_we_cannot_express_name_the_key(arch, keys, message):
    with pytest.raises(HFImportError, match=message):
        model_config(_hf(arch, **keys), "config.json")


def test_transformers_4_forms_read_as_5s():
    """4.x config.json: rope_theta beside rope_scaling {"type": ...}, Qwen2's window placed by max_window_layers
    (layer i slides when i >= it), Qwen3-MoE's num_experts: the same [model] as transformers 5's forms."""
    new = _hf("llama")
    legacy = {**{k: v for k, v in new.items() if k != "rope_parameters"}, "rope_theta": 5e5,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}}
    assert model_config(legacy, "config.json") == model_config(new, "config.json")
    qwen2 = model_config(_hf("qwen2", layer_types=None, max_window_layers=1), "config.json")[1]
    assert (qwen2.window_size, qwen2.window_pattern) == (3, ["global", "local"])
    assert model_config(_hf("qwen2"), "config.json")[1] == qwen2
    moe = {k: v for k, v in _hf("qwen3_moe").items() if k != "num_local_experts"}
    assert model_config({**moe, "num_experts": 4}, "config.json")[1].num_experts == 4


def test_exports_we_cannot_express_name_the_key():
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50, seq_length=8, bias=False,
                normalization="rmsnorm", activation="swiglu", position_embedding="rope", tie_embeddings=False)

    def refused(fmt, message, **kw):
        with pytest.raises(ExportError, match=f"{fmt}.*{message}"):
            choose_format(GPTConfig(**{**base, **kw}), fmt)

    assert choose_format(GPTConfig(**base, qk_norm=True)) == "qwen3"
    assert choose_format(GPTConfig(**base, window_size=4)) == "mistral"
    assert choose_format(GPTConfig(**base, window_size=4, window_pattern=["global", "local"])) == "qwen2"
    assert choose_format(GPTConfig(**base, qkv_bias=True)) == "qwen2"
    refused("llama", "has no query/key norms", qk_norm=True)
    refused("mistral", "slides in every layer or none", window_size=4, window_pattern=["global", "local"])
    refused("qwen3", "has no biases on q, k, v alone", qkv_bias=True, qk_norm=True)
    refused("qwen2", "has no biases on o_proj and the MLP", bias=True)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale_all_dim": 1.0}
    refused("qwen2", "mscale_all_dim = 1.0", rope_scaling=yarn)
    refused("gpt_neox", "has no rope scaling", normalization="layernorm", activation="gelu",
            rope_scaling={"type": "linear", "factor": 2.0})
    moe = dict(num_experts=4, moe_top_k=2)
    refused("mixtral", "places experts otherwise", first_k_dense=1, **moe)
    refused("mixtral", "renormalises the top-k weights", moe_norm_topk_prob=False, **moe)
    refused("qwen3_moe", "routes by softmax", moe_router="sigmoid", qk_norm=True, **moe)
    refused("deepseek_v3", "needs multi-head latent attention", moe_router="sigmoid", **moe)
    mla = dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, moe_router="sigmoid", **moe)
    refused("qwen3_moe", "has no multi-head latent attention", **mla)
    refused("deepseek_v3", "is dropless", moe_capacity_factor=1.0, **mla)
    assert choose_format(GPTConfig(**base, **mla, moe_n_group=2, moe_topk_group=1, first_k_dense=1,
                                   moe_shared_experts=1, moe_routed_scaling_factor=2.5)) == "deepseek_v3"
