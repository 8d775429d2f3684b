"""DeepSeek-V3 routing (megagopher/model/moe_router.py, moe_balance.py; docs/moe.md): against transformers
(DeepseekV3MoE: sigmoid scores, the selection bias, group-limited routing, the routed scaling factor, the
shared expert; Qwen3MoeSparseMoeBlock with norm_topk_prob false) with copied weights, forward and backward;
the sequence-wise balance loss against a float64 formula; a DeepSeek-routed model with dense first layer
under ep 2, tp 2 + SP, pp 2 (1F1B and interleaved), cp 2 and dp + ZeRO-1 equal to the serial run, the
balancing biases included, bit-identical on every rank (one spawn of 4 gloo ranks, tests/layouts.py's
harness); the bias moving a skewed router towards balance; a checkpoint resuming the bias bit-exactly
through the trainer, at the saved layout and resharded.
"""
import math

import pytest
import torch

from megagopher.model.moe import MoEAuxLosses, MoELayer, Router, moe_layers, moe_step_summary, update_expert_bias
from megagopher.testing import spawn
from layouts import check_equal, model_config, train
from train_utils import TINY, checkpoint_tensors, read_metrics, run_train, write_config

H, F, E, K = 16, 12, 8, 2


def _layer(**kw):
    cfg = model_config("llama", hidden_size=H, num_attention_heads=2, num_query_groups=2, num_experts=E,
                       moe_top_k=K, moe_ffn_hidden_size=F, **kw)
    torch.manual_seed(3)
    return MoELayer(cfg, layer_number=0, sequence_parallel=False)


def _copy_experts(layer, hf_experts):
    """transformers' gate_up_proj [E, 2F, H] holds gate rows then up rows; ours interleave them."""
    with torch.no_grad():
        layer.experts.fc1.weight[:, 0::2] = hf_experts.gate_up_proj[:, :F]
        layer.experts.fc1.weight[:, 1::2] = hf_experts.gate_up_proj[:, F:]
        layer.experts.fc2.weight.copy_(hf_experts.down_proj)


def _compare_blocks(layer, hf, pairs):
    """The same input through both blocks ([s, b, h] ours, [b, s, h] theirs): outputs, the input's gradient
    and every (ours, theirs) parameter gradient pair equal to fp32 rounding."""
    x = torch.randn(5, 3, H, requires_grad=True)
    xh = x.detach().transpose(0, 1).contiguous().requires_grad_()
    out, ref = layer(x), hf(xh).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, xh.grad.transpose(0, 1), rtol=1e-5, atol=1e-6)
    for ours, theirs in pairs:
        torch.testing.assert_close(ours(), theirs(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_group,topk_group,norm", [(4, 2, True), (1, 1, False)])
def test_deepseek_v3_routing_and_block_match_transformers(n_group, topk_group, norm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    hf_cfg = DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group,
                              topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=norm,
                              moe_intermediate_size=F, n_shared_experts=1, hidden_act="silu")
    torch.manual_seed(0)
    hf = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
        hf.gate.e_score_correction_bias.normal_(0.0, 0.2)  # large enough to change the selection
    layer = _layer(moe_router="sigmoid", moe_n_group=n_group, moe_topk_group=topk_group,
                   moe_routed_scaling_factor=2.5, moe_norm_topk_prob=norm, moe_shared_experts=1)
    _copy_experts(layer, hf.experts)
    with torch.no_grad():
        layer.router.weight.copy_(hf.gate.weight)
        layer.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
        layer.shared.fc1.weight[0::2] = hf.shared_experts.gate_proj.weight
        layer.shared.fc1.weight[1::2] = hf.shared_experts.up_proj.weight
        layer.shared.fc2.weight.copy_(hf.shared_experts.down_proj.weight)
    tokens = torch.randn(40, H)
    _, top_w, top_i = hf.gate(tokens)
    weights, routing_map = layer.router(tokens, MoEAuxLosses(), 0)
    chosen = torch.zeros(40, E, dtype=torch.bool).scatter(1, top_i, True)
    assert torch.equal(routing_map, chosen)
    unbiased_top = torch.sigmoid(tokens @ hf.gate.weight.t()).topk(K).indices
    unbiased = torch.zeros(40, E, dtype=torch.bool).scatter(1, unbiased_top, True)
    assert not torch.equal(chosen, unbiased)  # the bias decided some selections
    torch.testing.assert_close(weights, torch.zeros(40, E).scatter(1, top_i, top_w), rtol=1e-6, atol=1e-7)
    _compare_blocks(layer, hf, [(lambda: layer.router.weight.grad, lambda: hf.gate.weight.grad),
                                (lambda: layer.experts.fc2.weight.grad, lambda: hf.experts.down_proj.grad),
                                (lambda: layer.experts.fc1.weight.grad[:, 0::2],
                                 lambda: hf.experts.gate_up_proj.grad[:, :F]),
                                (lambda: layer.shared.fc1.weight.grad[1::2],
                                 lambda: hf.shared_experts.up_proj.weight.grad)])


def test_qwen3_moe_block_without_top_k_normalisation_matches_transformers():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    hf_cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False,
                            moe_intermediate_size=F)
    torch.manual_seed(1)
    hf = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    layer = _layer(moe_router="softmax", moe_norm_topk_prob=False)
    assert layer.router.expert_bias is None
    _copy_experts(layer, hf.experts)
    with torch.no_grad():
        layer.router.weight.copy_(hf.gate.weight)
    weights, _ = layer.router(torch.randn(30, H), MoEAuxLosses(), 0)
    assert float(weights.detach().sum(-1).max()) < 0.99  # raw softmax values: not renormalised
    _compare_blocks(layer, hf, [(lambda: layer.router.weight.grad, lambda: hf.gate.weight.grad),
                                (lambda: layer.experts.fc1.weight.grad[:, 1::2],
                                 lambda: hf.experts.gate_up_proj.grad[:, F:])])


def _reference_seq_aux(x, w, bias, router, coeff, n_group, topk_group):
    """DeepSeek-V3 eqs. 17-20 in float64 for x [S, B, h]: per sequence b, f_e = E / (K S) * (its tokens
    whose selection, on the biased and group-limited scores, includes e), P_e = mean over its tokens of
    s_e / sum s (softmax: the probabilities); coeff * mean_b sum_e f_e P_e."""
    s_len, batch = x.shape[:2]
    logits = x.double() @ w.double().t()
    scores = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdim=True)
    total = 0.0
    for b in range(batch):
        count = torch.zeros(E, dtype=torch.float64)
        for t in range(s_len):
            choice = scores[t, b].detach() + bias.double()
            per_group = E // n_group
            group_score = [sorted(choice[g * per_group:(g + 1) * per_group].tolist())[-2:] for g in range(n_group)]
            kept = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
            allowed = [e for e in range(E) if e // per_group in kept]
            for e in sorted(allowed, key=lambda e: -float(choice[e]))[:K]:
                count[e] += 1
        f = E / (K * s_len) * count
        total = total + (f * probs[:, b].mean(0)).sum()
    return coeff * total / batch


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_sequence_aux_loss_and_gradients_match_float64_formula(router):
    groups = dict(moe_n_group=4, moe_topk_group=2) if router == "sigmoid" else {}
    cfg = model_config("llama", hidden_size=H, num_attention_heads=2, num_experts=E, moe_top_k=K, moe_router=router,
                       moe_seq_aux_loss_coeff=0.3, **groups)
    torch.manual_seed(2)
    module = Router(cfg, sequence_parallel=False)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)
        if router == "sigmoid":
            module.expert_bias.normal_(0.0, 0.1)
    bias = module.expert_bias if router == "sigmoid" else torch.zeros(E)
    x = torch.randn(7, 3, H, requires_grad=True)
    losses = MoEAuxLosses()
    weights, _ = module(x.reshape(-1, H), losses, layer=1, batch=3)
    (weights * 0.0).sum().backward()  # only the aux terms reach the router
    (_, _, _, _, seq_sum, *_), = losses.pop().values()
    xr, wr = x.detach().double().requires_grad_(), module.weight.detach().double().requires_grad_()
    ref = _reference_seq_aux(xr, wr, bias, router, 0.3, cfg.moe_n_group, cfg.moe_topk_group)
    ref.backward()
    ref = float(ref.detach())
    assert math.isclose(seq_sum, ref, rel_tol=1e-6), (seq_sum, ref)
    torch.testing.assert_close(module.weight.grad.double(), wr.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-8)


# ---- the model under every layout -------------------------------------------------------------------------
DEEPSEEK = dict(num_layers=4, num_experts=E, moe_top_k=K, moe_ffn_hidden_size=16, moe_shared_experts=1,
                moe_router="sigmoid", moe_bias_update_rate=0.002, moe_n_group=4, moe_topk_group=2,
                moe_routed_scaling_factor=2.5, moe_seq_aux_loss_coeff=0.01, moe_aux_loss_coeff=0.01, first_k_dense=1)


def _balance_step(cfg, record):
    """A ``before_step`` for tests/layouts.py's train: the training loop's MoE step (moe_step_summary's one
    all-reduce, then the bias update; the harness's layers keep their own MoEAuxLosses, merged here).
    The biases change only the next forward, so updating them before the optimizer step is the same."""
    def hook(step, chunks, optimizer):
        merged = MoEAuxLosses()
        for layer in moe_layers(chunks):
            merged.sums.update(layer.aux_losses.sums)
            layer.aux_losses.sums = {}
        record.append(moe_step_summary(merged, cfg, "cpu"))
        update_expert_bias(chunks, merged, cfg)
    return hook


def _biases(chunks):
    return {n: b.clone() for c in chunks for n, b in c.module.named_buffers() if n.endswith("expert_bias")}


LAYOUTS = {
    "ep2 x dp4 zero1": dict(tp=1, ep=2, distributed=True),
    "tp2 sp x ep2 zero1": dict(tp=2, sp=True, ep=2, distributed=True),
    "pp2 1f1b x dp2 zero1": dict(tp=1, pp=2, distributed=True),
    "pp2 interleaved vpp2 x dp2": dict(tp=1, pp=2, vpp=2, schedule="interleaved"),
    "cp2 x ep2": dict(tp=1, cp=2, ep=2),
}


def _layouts(rank, world_size):
    cfg = model_config("llama", **DEEPSEEK)
    # Every rank runs the serial reference at once, so moe_step_summary's world all-reduce pairs up; it
    # multiplies the loads by the world size, which leaves sign(mean - load) unchanged.
    ref, chunks = train(cfg, before_step=_balance_step(cfg, []))
    ref_bias, failures = _biases(chunks), []
    assert sorted(ref_bias) == [f"layers.{i}.mlp.router.expert_bias" for i in (1, 2, 3)]
    assert all(b.abs().max() > 0 for b in ref_bias.values())  # the biases moved
    for name, kwargs in LAYOUTS.items():
        got, chunks = train(cfg, before_step=_balance_step(cfg, []), **kwargs)
        try:
            check_equal(name, got, ref)
            for key, bias in _biases(chunks).items():
                assert torch.equal(bias, ref_bias[key]), f"{name}: rank {rank} {key} {bias} vs serial {ref_bias[key]}"
        except AssertionError as e:
            failures.append(str(e))
    return failures


def test_deepseek_routed_model_layouts_equal_serial_with_the_biases():
    for failures in spawn(_layouts, 4):
        assert not failures, failures


# ---- balance ----------------------------------------------------------------------------------------------
def _skew(cfg):
    """An ``on_microbatch`` that, before the first forward, makes every MoE layer's router favour expert 0:
    the norm before the experts gets a bias along a unit vector u and the router's row 0 a large u."""
    def hook(step, i, last, chunk):
        if step or i:
            return
        u = torch.nn.functional.normalize(torch.ones(cfg.hidden_size), dim=0)
        with torch.no_grad():
            for layer in chunk.module.layers.values():
                if layer.moe:
                    layer.post_attention_norm.bias.copy_(2.0 * u)
                    layer.mlp.router.weight[0] += 3.0 * u
    return hook


def test_balancing_bias_brings_a_skewed_router_towards_balance():
    runs = {}
    for rate in (0.0, 0.05):
        cfg = model_config("gpt2", num_experts=4, moe_top_k=1, moe_router="sigmoid", moe_bias_update_rate=rate,
                           moe_ffn_hidden_size=16)
        record = []
        train(cfg, steps=10, on_microbatch=_skew(cfg), before_step=_balance_step(cfg, record))
        runs[rate] = [r["moe_load_max_over_mean"] for r in record]
    # Every token on expert 0 at first: max / mean = E. Without the bias it stays there; with it, the load
    # spreads once the bias has closed the score gap (about 5 steps here; the sign update then oscillates
    # around balance, so the second half's mean is what falls).
    assert runs[0.0] == pytest.approx([4.0] * 10), runs[0.0]
    assert runs[0.05][0] == pytest.approx(4.0)
    assert sum(runs[0.05][5:]) / 5 < 2.5, runs[0.05]


# ---- checkpoints ------------------------------------------------------------------------------------------
MODEL_KEYS = ["--model.num_experts=8", "--model.moe_top_k=2", "--model.moe_ffn_hidden_size=16",
              "--model.moe_shared_experts=1", "--model.moe_router=sigmoid", "--model.moe_bias_update_rate=0.002",
              "--model.moe_n_group=4", "--model.moe_topk_group=2", "--model.moe_routed_scaling_factor=2.5",
              "--model.moe_seq_aux_loss_coeff=0.01", "--model.first_k_dense=1"]


def test_checkpoint_resumes_the_bias_bit_exactly(tmp_path):
    cfg = write_config(tmp_path, TINY)
    first, ckpt = str(tmp_path / "a"), str(tmp_path / "a_ckpt")
    ep2 = ("--parallel.ep=2", "--optimizer.distributed=true")
    run_train(cfg, first, *MODEL_KEYS, *ep2, f"--checkpoint.dir={ckpt}", "--checkpoint.save_interval=2", nproc=2)
    expected = {r["iteration"]: r for r in read_metrics(first)}
    assert all("moe_seq_aux_loss" in r for r in expected.values())
    saved = {n: t for n, t in checkpoint_tensors(ckpt, 2).items() if n.endswith("expert_bias")}
    final = {n: t for n, t in checkpoint_tensors(ckpt, 4).items() if n.endswith("expert_bias")}
    assert sorted(saved) == [f"layers.{i}.mlp.router.expert_bias" for i in (1, 2, 3)]
    assert all(t.dtype == torch.float32 and t.shape == (8,) for t in saved.values())
    assert all(t.abs().max() > 0 for t in final.values())  # moved (after 2 steps a sign may have cancelled)
    for name, nproc, layout in (("same", 2, ep2), ("tp2 pp2", 4, ("--parallel.tp=2", "--parallel.pp=2"))):
        run_dir, out = str(tmp_path / name.replace(" ", "_")), str(tmp_path / (name.replace(" ", "_") + "_ckpt"))
        run_train(cfg, run_dir, *MODEL_KEYS, *layout, f"--checkpoint.load={ckpt}/iter_0000002",
                  f"--checkpoint.dir={out}", "--checkpoint.save_interval=2", nproc=nproc)
        rows = {r["iteration"]: r for r in read_metrics(run_dir)}
        assert sorted(rows) == [3, 4], name
        resumed = checkpoint_tensors(out, 4)
        for key, bias in final.items():
            assert torch.equal(resumed[key], bias), (name, key)
        if name == "same":  # the saved layout: every step and tensor bit for bit
            assert [rows[i]["loss"] for i in (3, 4)] == [expected[i]["loss"] for i in (3, 4)]
            reference = checkpoint_tensors(ckpt, 4)
            assert all(torch.equal(resumed[k], reference[k]) for k in reference)
        else:
            for i in (3, 4):
                assert rows[i]["loss"] == pytest.approx(expected[i]["loss"], rel=1e-5), (name, i)


def test_bias_is_an_fp32_buffer_outside_the_optimizer_and_old_checkpoints_load_with_zero(tmp_path):
    """The bias stays fp32 when the model is cast, is no parameter (no optimizer state, no weight decay), and
    a checkpoint written before it existed (a model without it) loads with the bias at zero."""
    from megagopher.config import JobConfig
    from megagopher.model.gpt import GPTModel
    from megagopher.pipeline_parallel.stages import build_model_chunks
    from megagopher.training.checkpoint import CheckpointReader, load_weights, save_weights_only
    cfg = model_config("llama", **DEEPSEEK)
    model = GPTModel(cfg).to(torch.bfloat16)
    bias = model.layers["1"].mlp.router.expert_bias
    assert bias.dtype == torch.float32 and bias.shape == (E,)
    assert all(p is not bias for p in model.parameters())
    old_cfg = model_config("llama", **{**DEEPSEEK, "moe_bias_update_rate": 0.0, "moe_router": "softmax"})
    old, = build_model_chunks(old_cfg, seed=1)
    path = save_weights_only(str(tmp_path), 0, old, {"iteration": 0}, JobConfig())
    fresh, = build_model_chunks(cfg, seed=2)
    load_weights(CheckpointReader(path), [fresh])
    assert torch.equal(fresh.layers["1"].mlp.router.weight, old.layers["1"].mlp.router.weight)
    assert not fresh.layers["1"].mlp.router.expert_bias.any()


def test_config_rules_and_memory_report_of_dense_first_layers():
    """The routing keys' rules name key, value and what is valid; memory.py counts the first_k_dense layers as
    dense (tests/test_memory.py's measurement harness, exactly)."""
    from megagopher.config import ConfigError
    from test_memory import _model_cfg, compare
    with pytest.raises(ConfigError, match="moe_bias_update_rate = 0.1 needs model.moe_router = 'sigmoid'"):
        model_config("llama", num_experts=4, moe_bias_update_rate=0.1)
    with pytest.raises(ConfigError, match="moe_n_group = 4 leaves fewer than 2 of model.num_experts = 4"):
        model_config("llama", num_experts=4, moe_top_k=1, moe_n_group=4)
    routing = {k: v for k, v in DEEPSEEK.items() if k != "num_layers"}
    model_cfg = _model_cfg("gpt2", seq_length=16, num_layers=2, **routing)
    measured, predicted = compare(model_cfg, {}, {"precision": "fp32", "recompute": "none", "micro_batch_size": 2},
                                  {"distributed": False})
    assert predicted["activations"] == measured["activations"]
