"""The MoE layer (megagopher/model/moe.py): the auxiliary losses and their gradients against a float64
reference written from the papers' formulas, capacity dropping on a crafted routing, the dispatcher's
permutation, and a dropless top-2 MoE model under tp2 (sequence parallel), pp2, dp with ZeRO-1 and expert
parallelism (ep 2 and 4, tp2 x ep2, ep2 x pp2 x expert-DP 2, recompute, bf16) equal to the serial run (one
spawn of 4 gloo ranks and one of 8; the harness of tests/layouts.py).
"""
import math

import pytest
import torch

from megagopher.config import ConfigError
from megagopher.model.gpt import GPTModel
from megagopher.model.moe import MoEAuxLosses, MoELayer, Router, apply_capacity
from megagopher.testing import spawn
from layouts import check_close_bf16, check_equal, model_config, train

E, K, H, T = 6, 2, 8, 20


def _cfg(**kw):
    """The GPT-2 flavour with 4 experts, top-2, both auxiliary losses on."""
    return model_config("gpt2", **{**dict(num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                                          moe_ffn_hidden_size=24), **kw})


def _reference_aux(x, w, router, coeff_aux, coeff_z):
    """Switch/GShard load balancing and ST-MoE's z-loss in float64, from the formulas: aux = c E sum_e f_e P_e
    with f_e the fraction of the k T assignments routed to e and P_e the mean router probability of e;
    z = c mean_t logsumexp(logits_t)^2."""
    logits = x.double() @ w.double().t()
    if router == "softmax":
        scores = logits.exp() / logits.exp().sum(-1, keepdim=True)
        probs = scores
    else:
        scores = 1.0 / (1.0 + (-logits).exp())
        probs = scores / scores.sum(-1, keepdim=True)
    chosen = scores.detach().argsort(-1, descending=True)[:, :K]
    f = torch.zeros(E, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e in chosen[t].tolist():
            f[e] += 1.0 / (K * x.shape[0])
    aux = coeff_aux * E * (f * probs.mean(0)).sum()
    z = coeff_z * (logits.exp().sum(-1).log() ** 2).mean()
    return aux, z


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_and_z_loss_and_gradients_match_float64_reference(router):
    cfg = _cfg(hidden_size=H, num_attention_heads=2, num_experts=E, moe_top_k=K, moe_router=router)
    torch.manual_seed(0)
    module = Router(cfg, sequence_parallel=False)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)
    x = torch.randn(T, H, requires_grad=True)
    losses = MoEAuxLosses(grad_scale=1.0)
    weights, routing_map = module(x, losses, layer=3)
    assert torch.allclose(weights.sum(-1), torch.ones(T)) and routing_map.sum(-1).eq(K).all()
    (weights * 0.0).sum().backward()  # only the aux terms reach the router now
    (aux_sum, z_sum, dropped, micro_batches, _seq_aux, *tokens), = losses.pop().values()
    xr, wr = x.detach().double().requires_grad_(), module.weight.detach().double().requires_grad_()
    aux, z = _reference_aux(xr, wr, router, cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff)
    (aux + z).backward()
    aux, z = aux.detach(), z.detach()
    assert math.isclose(aux_sum, float(aux), rel_tol=1e-6) and math.isclose(z_sum, float(z), rel_tol=1e-6)
    assert dropped == 0 and micro_batches == 1 and sum(tokens) == K * T
    torch.testing.assert_close(module.weight.grad.double(), wr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


def _reference_drops(weights, routing_map, capacity):
    """Per expert, the assignments beyond ``capacity`` in order of decreasing weight (ties: lower token)."""
    dropped = 0
    for e in range(routing_map.shape[1]):
        routed = [(-float(weights[t, e]), t) for t in range(routing_map.shape[0]) if routing_map[t, e]]
        dropped += max(0, len(sorted(routed)) - capacity)
    return dropped


def test_capacity_drops_lowest_weights_and_counts_them():
    # 8 tokens, 4 experts, top-2: token t goes to expert 0 (weight 0.9 - t / 20) and expert 1 + t % 3.
    t_count, experts = 8, 4
    weights = torch.zeros(t_count, experts)
    for t in range(t_count):
        weights[t, 0] = 0.9 - t / 20
        weights[t, 1 + t % 3] = 1.0 - weights[t, 0]
    routing_map = weights > 0
    capacity_factor = 1.0  # capacity ceil(1 * 8 * 2 / 4) = 4: expert 0 (8 tokens) keeps 4
    kept_weights, kept, dropped = apply_capacity(weights, routing_map, 2, capacity_factor)
    assert int(dropped) == _reference_drops(weights, routing_map, 4) == 4
    assert kept[:4, 0].all() and not kept[4:, 0].any()  # the highest weights stay
    assert torch.equal(kept[:, 1:], routing_map[:, 1:]) and torch.equal(kept_weights, weights * kept)


def test_capacity_count_reaches_the_step_record():
    cfg = _cfg(hidden_size=4, num_attention_heads=2, num_experts=4, moe_top_k=1, moe_capacity_factor=1.0)
    layer = MoELayer(cfg, layer_number=0, sequence_parallel=False)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4) * 10.0)
        for p in layer.experts.parameters():
            p.normal_()
    x = torch.zeros(6, 1, 4)
    x[:, 0, 0] = torch.arange(6.0) + 1.0  # every token prefers expert 0; its capacity is ceil(1 * 6 * 1 / 4) = 2
    layer(x).sum().backward()
    (_, _, dropped, _, _, *tokens), = layer.aux_losses.pop().values()
    assert dropped == 4 and tokens == [6.0, 0.0, 0.0, 0.0]


def test_moe_layer_equals_dense_experts_computed_one_token_at_a_time():
    cfg = _cfg(activation="swiglu", bias=True, moe_shared_experts=1)
    torch.manual_seed(1)
    layer = MoELayer(cfg, layer_number=0, sequence_parallel=False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 2, cfg.hidden_size)
    out = layer(x)
    tokens = x.reshape(-1, cfg.hidden_size)
    probs = torch.softmax(tokens @ layer.router.weight.t(), -1)
    top, index = probs.topk(2, -1)
    top = top / top.sum(-1, keepdim=True)
    f1, f2 = layer.experts.fc1, layer.experts.fc2
    expected = []
    for t in range(tokens.shape[0]):
        acc = layer.shared(tokens[t].view(1, 1, -1)).view(-1)
        for w, e in zip(top[t], index[t].tolist()):
            y = f1.weight[e] @ tokens[t] + f1.bias[e]
            y = torch.nn.functional.silu(y[0::2]) * y[1::2]
            acc = acc + w * (f2.weight[e] @ y + f2.bias[e])
        expected.append(acc)
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_config_rules():
    with pytest.raises(ConfigError, match="moe_top_k = 3 exceeds model.num_experts = 2"):
        _cfg(num_experts=2, moe_top_k=3)
    with pytest.raises(ConfigError, match="moe_shared_experts = 1 needs routed experts"):
        _cfg(num_experts=0, moe_shared_experts=1)
    cfg = _cfg(num_layers=4, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    model = GPTModel(cfg)
    assert [type(layer.mlp).__name__ for layer in model.layers.values()] == ["MoELayer", "MLP", "MoELayer", "MLP"]


LAYOUTS = {  # name: (flavour overrides, train() keywords)
    "tp2 sp x dp2 zero1": (dict(), dict(tp=2, sp=True, distributed=True)),
    "tp2 x dp2 (no sp)": (dict(), dict(tp=2)),
    "pp2 x dp2 zero1": (dict(), dict(tp=1, pp=2, distributed=True)),
    "dp4 zero1 (swiglu)": (dict(activation="swiglu", bias=False, normalization="rmsnorm"),
                           dict(tp=1, distributed=True)),
    # Expert parallelism: the experts split over ep data-parallel ranks, tokens exchanged by all-to-all,
    # expert gradients summed over expert DP (dp / ep ranks), sharded over it under ZeRO-1.
    "ep2 x edp2 zero1": (dict(), dict(tp=1, ep=2, distributed=True)),
    "ep2 x edp2 (no zero1)": (dict(), dict(tp=1, ep=2)),
    "ep4 zero1 (swiglu)": (dict(activation="swiglu", bias=False, normalization="rmsnorm"),
                           dict(tp=1, ep=4, distributed=True)),
    "tp2 sp x ep2 zero1": (dict(), dict(tp=2, sp=True, ep=2, distributed=True)),
    "tp2 x ep2 (no sp), full recompute": (dict(), dict(tp=2, ep=2, recompute="full")),
}


def _layouts(rank, world_size):
    failures, serial = [], {}
    for name, (flavour, kwargs) in LAYOUTS.items():
        cfg = _cfg(**flavour)
        key = tuple(sorted(flavour.items()))
        if key not in serial:
            serial[key] = train(cfg)[0]
        ref = serial[key]
        got, _ = train(cfg, **kwargs)
        try:
            check_equal(name, got, ref)
        except AssertionError as e:
            failures.append(str(e))
    return failures


def test_dropless_top2_moe_layouts_equal_serial():
    for failures in spawn(_layouts, 4):
        assert not failures, failures


LAYOUTS_8 = {  # 8 ranks, 4 layers: every pipeline stage holds MoE layers
    "ep2 x pp2 x edp2 zero1": dict(tp=1, pp=2, ep=2, distributed=True),
    "tp2 sp x ep2 x pp2 zero1, selective recompute": dict(tp=2, sp=True, pp=2, ep=2, distributed=True,
                                                           recompute="selective"),
}


def _layouts_8(rank, world_size):
    cfg = _cfg(num_layers=4)
    ref, failures = train(cfg)[0], []
    for name, kwargs in LAYOUTS_8.items():
        try:
            check_equal(name, train(cfg, **kwargs)[0], ref)
        except AssertionError as e:
            failures.append(str(e))
    # bf16: the same run in the same precision, to bf16's rounding (tests/layouts.py's bounds): losses,
    # first-step gradients and final parameters.
    ref_bf16, _ = train(cfg, precision="bf16")
    got_bf16, _ = train(cfg, tp=1, ep=4, distributed=True, precision="bf16")
    try:
        check_close_bf16("bf16 ep4 x edp2 zero1", got_bf16, ref_bf16)
    except AssertionError as e:
        failures.append(str(e))
    return failures


def test_expert_parallel_with_pipeline_and_bf16_equals_serial():
    for failures in spawn(_layouts_8, 8):
        assert not failures, failures


def test_memory_report_counts_experts_and_dispatch_buffers():
    """memory.py against measurement (tests/test_memory.py's harness, Triton kernels under the interpreter):
    router, expert and shared-expert parameters and the activations (dispatch buffers included), exactly."""
    from test_memory import _model_cfg, compare
    model_cfg = _model_cfg("gpt2", seq_length=16, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=48,
                           moe_shared_experts=1)
    measured, predicted = compare(model_cfg, {}, {"precision": "fp32", "recompute": "none", "micro_batch_size": 2},
                                  {"distributed": False})
    assert any(k.startswith("MoE permuted") for k in predicted["activation_items"])
    assert predicted["activations"] == measured["activations"]


def test_expert_parallel_config_rules(tmp_path):
    """parallel.ep: inside dp, a divisor of the experts, and only for a model that has (or grows) experts;
    each rule fails on every rank before any collective (config/validate.py)."""
    from megagopher.config import load_config, validate
    from megagopher.config.validate import ParallelConfigError
    from train_utils import TINY, write_config
    path = write_config(tmp_path, TINY.replace("num_layers = 4", "num_layers = 2\nnum_experts = 4"))
    assert validate(load_config(path, {"parallel.ep": 4}), 4) == 4
    for overrides, world, message in (({"parallel.ep": 3}, 6, "num_experts = 4 is not divisible by parallel.ep = 3"),
                                      ({"parallel.ep": 4, "parallel.tp": 2}, 4, "parallel.ep = 4 must divide the "
                                                                                "data-parallel size 2"),
                                      ({"parallel.ep": 2, "model.num_experts": 0}, 2, "needs a MoE model")):
        with pytest.raises(ParallelConfigError, match=message):
            validate(load_config(path, overrides), world)
    upcycled = write_config(tmp_path, TINY + '[[stages]]\nname = "dense"\ntrain_iters = 1\n[[stages]]\n'
                            'name = "moe"\ntrain_iters = 1\ngrow.num_experts = 4\n', "upcycled.toml")
    assert validate(load_config(upcycled, {"parallel.ep": 2}), 2) == 2  # the dense stage runs under ep too
