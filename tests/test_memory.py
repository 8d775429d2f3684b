"""The memory report against measurement, and Megatron's bytes-per-parameter accounting.

Measured: parameters and gradients are the data-parallel wrapper's flat buffers, optimizer state is the sum
of the tensors the optimizer holds beyond the model's own, activations are the distinct storages autograd
saves during one micro-batch's forward pass (torch.autograd.graph.saved_tensors_hooks). Activations are
measured with the fused Triton kernels (the GPU path) run by the interpreter on CPU, with CPU dropout masks
(one activation element each, as the report is told with device="cpu").
"""
import pytest
import torch

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.common import PRECISION_DTYPES
from megagopher.distributed import wrap_data_parallel
from megagopher.memory import memory_report, saved_activation_bytes
from megagopher.model import GPTConfig, GPTModel
from megagopher.optimizer import build_optimizer
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.testing import spawn
from layouts import model_dict

# Parameters, gradients and optimizer state are counts of what the code allocates (the wrapper's flat
# buffers, ZeRO-1's padded shards, fp32 masters and Adam's two moments): the report gives them to the byte.
EXACT = ("params", "grads", "optimizer")
# Activations are a model of what autograd saves (Korthikanti et al.'s per-layer terms): which storages a
# kernel keeps is its implementation's choice (a fused kernel may save its output rather than its input, CUDA
# keeps a dropout mask as bytes where the CPU keeps an element), so the report, a planning estimate, is held
# to the 10% bar there (and in the total, which includes them); measured, it is exact for every
# configuration below.
ACTIVATION_TOLERANCE = 0.10
OPT = dict(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, clip_grad=1.0)
DROPOUT = {"codegen": dict(dropout=0.1, attention_dropout=0.1)}  # the dropout masks are counted too


def _model_cfg(flavour, seq_length=32, **extra):
    return model_dict(flavour, hidden_size=64, seq_length=seq_length, vocab_size=100,
                      **{**DROPOUT.get(flavour, {}), **extra})


def measure(model_cfg, parallel, training, optimizer):
    """Builds the rank's model, wrapper and optimizer as the trainer does and measures every component."""
    tp, sp, ep = parallel.get("tp", 1), parallel.get("sp", False), parallel.get("ep", 1)
    if parallel.get("dp", 1) * tp > 1:
        ps.initialize_model_parallel(tp=tp, ep=ep)
    model_parallel_seed(3, ps.get_tp_rank())
    cfg = GPTConfig(**model_cfg)
    model = GPTModel(cfg, sequence_parallel=sp, recompute=training["recompute"],
                     recompute_num_layers=training.get("recompute_num_layers") or None).initialize(1)
    model.to(PRECISION_DTYPES[training["precision"]])
    chunks = wrap_data_parallel([model], {"bucket_size_mb": 0.05}, distributed_optimizer=optimizer["distributed"])
    opt = build_optimizer(chunks, {**OPT, "distributed": optimizer["distributed"]}, training)
    ids = torch.randint(0, cfg.vocab_size, (training["micro_batch_size"], cfg.seq_length),
                        generator=torch.Generator().manual_seed(0))
    with kernels.use_backend("triton"):
        _, activations, _ = saved_activation_bytes(lambda: chunks[0](ids, labels=ids), list(model.parameters()))
    buffers = chunks[0].grad_buffers  # the experts' own buffer too, under expert parallelism
    measured = {"params": sum(b.param_data.numel() * b.param_data.element_size() for b in buffers),
                "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
                "optimizer": opt.state_bytes(), "activations": activations,
                "num_params": sum(p.numel() for p in model.parameters())}
    measured["total"] = sum(measured[k] for k in ("params", "grads", "optimizer", "activations"))
    ps.destroy_model_parallel()
    return measured


def compare(model_cfg, parallel, training, optimizer, world_size=1):
    measured = measure(model_cfg, parallel, training, optimizer)
    predicted = memory_report(model_cfg, parallel, training, optimizer, world_size=world_size, device="cpu")
    assert predicted["num_params"] == measured["num_params"]
    for key in EXACT:
        assert predicted[key] == measured[key], f"{key}: predicted {predicted[key]} bytes vs measured {measured[key]}"
    for key in ("activations", "total"):
        error = abs(predicted[key] - measured[key]) / measured[key]
        assert error <= ACTIVATION_TOLERANCE, \
            f"{key}: predicted {predicted[key]} vs measured {measured[key]} ({error:.1%})"
    return measured, predicted


SINGLE = [  # (model, training): tp = dp = 1
    (_model_cfg("gpt2"), {"precision": "fp32", "recompute": "none", "micro_batch_size": 2}),
    (_model_cfg("llama"), {"precision": "bf16", "recompute": "selective", "micro_batch_size": 2}),
    (_model_cfg("codegen", seq_length=16), {"precision": "fp16", "recompute": "full", "recompute_num_layers": 1,
                                            "micro_batch_size": 2}),
]


@pytest.mark.parametrize("model_cfg, training", SINGLE, ids=["gpt2-fp32", "llama-bf16-selective",
                                                             "codegen-fp16-full1-dropout"])
def test_report_matches_measurement_single_rank(model_cfg, training):
    measured, predicted = compare(model_cfg, {}, training, {"distributed": False})
    # Non-distributed accounting: 16 bytes per parameter in fp32, 18 in bf16/fp16 (Megatron's table).
    per_param = (measured["params"] + measured["grads"] + measured["optimizer"]) / measured["num_params"]
    assert per_param == (16 if training["precision"] == "fp32" else 18)
    assert "activations" in predicted["line"] and "predicted" in predicted["line"]


def _world4(rank, world):
    out = {}
    cases = {  # name: (model, parallel, training, optimizer, Megatron's bytes per parameter)
        "gpt2 bf16 dp4 zero1": (_model_cfg("gpt2"), {"tp": 1, "dp": 4},
                                {"precision": "bf16", "recompute": "none", "micro_batch_size": 2},
                                {"distributed": True}, 6 + 12 / 4),
        "llama bf16 tp2 sp dp2 zero1 selective": (_model_cfg("llama"), {"tp": 2, "dp": 2, "sp": True},
                                                  {"precision": "bf16", "recompute": "selective",
                                                   "micro_batch_size": 2},
                                                  {"distributed": True}, 6 + 12 / 2),
        "gpt2 fp32 tp2 dp2 zero1 full": (_model_cfg("gpt2", dropout=0.1), {"tp": 2, "dp": 2},
                                         {"precision": "fp32", "recompute": "full", "micro_batch_size": 2},
                                         {"distributed": True}, 8 + 8 / 2),
        "gpt2 fp16 tp2 sp dp2": (_model_cfg("gpt2"), {"tp": 2, "dp": 2, "sp": True},
                                 {"precision": "fp16", "recompute": "none", "micro_batch_size": 1},
                                 {"distributed": False}, 18),
        # Expert parallelism: each rank holds half the experts; their state shards over expert DP (2).
        "llama moe bf16 ep2 x edp2 zero1": (_model_cfg("llama", num_experts=4, moe_top_k=2, moe_ffn_hidden_size=64),
                                            {"tp": 1, "dp": 4, "ep": 2},
                                            {"precision": "bf16", "recompute": "none", "micro_batch_size": 2},
                                            {"distributed": True}, None),
    }
    for name, (model_cfg, parallel, training, optimizer, megatron) in cases.items():
        measured, predicted = compare(model_cfg, parallel, training, optimizer, world_size=world)
        n = measured["num_params"]
        per_param = (measured["params"] + measured["grads"] + measured["optimizer"]) / n
        # ZeRO-1 pads each bucket to a multiple of dp: a handful of elements.
        assert megatron is None or abs(per_param - megatron) / megatron < 0.01, \
            f"{name}: {per_param:.3f} bytes/param vs {megatron}"
        out[name] = {"bytes per param": per_param, "optimizer bytes per param": measured["optimizer"] / n,
                     "activations": (measured["activations"], predicted["activations"])}
    return out


def test_report_and_sharded_state_bytes_multi_rank():
    results = spawn(_world4, 4, timeout_s=300)
    for r in results:
        # The sharded optimizer holds fp32 master weights and two moments for 1/dp of the parameters.
        assert abs(r["gpt2 bf16 dp4 zero1"]["optimizer bytes per param"] - 12 / 4) < 0.03
        assert abs(r["llama bf16 tp2 sp dp2 zero1 selective"]["optimizer bytes per param"] - 12 / 2) < 0.06
        assert abs(r["gpt2 fp32 tp2 dp2 zero1 full"]["optimizer bytes per param"] - 8 / 2) < 0.04


def test_pipeline_and_recompute_accounting():
    """The report's pipeline and recompute arithmetic: the first 1F1B stage holds pp micro-batches, GPipe
    all of them, interleaving (1 + (pp - 1) / (pp vpp)) times the layers; full recompute keeps only each
    layer's input; ZeRO-1 divides the optimizer state by dp."""
    model = _model_cfg("gpt2", num_layers=8)
    base = {"precision": "bf16", "recompute": "none", "micro_batch_size": 1, "global_batch_size": 16}
    one = memory_report(model, {"pp": 4, "dp": 1, "schedule": "1f1b"}, base, {}, pp_rank=0, device="cuda")
    gpipe = memory_report(model, {"pp": 4, "dp": 1, "schedule": "gpipe"}, base, {}, pp_rank=0, device="cuda")
    inter = memory_report(model, {"pp": 4, "vpp": 2, "dp": 1, "schedule": "interleaved"}, base, {}, pp_rank=0,
                          device="cuda")
    assert one["in_flight"] == 4 and gpipe["in_flight"] == 16 and inter["in_flight"] == (2 - 1) * 4 + 2 * 3 + 1
    assert gpipe["activations"] == 4 * one["activations"]
    full = memory_report(model, {}, {**base, "recompute": "full"}, {}, device="cuda")
    h, s = model["hidden_size"], model["seq_length"]
    assert full["activation_items"]["layer input (full recompute)"] == 8 * s * h * 2
    zero = memory_report(model, {"dp": 8}, base, {"distributed": True}, device="cuda")
    plain = memory_report(model, {"dp": 8}, base, {"distributed": False}, device="cuda")
    assert zero["optimizer"] * 8 == plain["optimizer"] == 12 * plain["num_params"]
    with pytest.raises(ValueError, match="training.precision = 'fp8'"):
        memory_report(model, {}, {"precision": "fp8"}, {})


def test_interleaved_in_flight_follows_the_plan_for_any_number_of_microbatches():
    """The leftover micro-batches of m mod pp join the first group (plan.interleaved_groups), so rank 0's
    warm-up, and the activations it holds, grow with them: (vpp - 1)(pp + m mod pp) + 2 (pp - 1) + 1, at
    most all m * vpp micro-batch-chunks."""
    from megagopher.memory import in_flight_microbatch_chunks
    for m in (4, 5, 6, 7, 8, 18):
        expected = min(m * 2, (2 - 1) * (4 + m % 4) + 2 * 3 + 1)
        assert in_flight_microbatch_chunks("interleaved", 4, 2, m, pp_rank=0) == expected, m
    assert in_flight_microbatch_chunks("1f1b", 4, 1, 3, pp_rank=0) == 3
    assert in_flight_microbatch_chunks("gpipe", 4, 2, 5, pp_rank=2) == 10
    assert in_flight_microbatch_chunks("zb-h1", 4, 1, 8, pp_rank=1) == 3
