"""The accounting of the 2024-2026 architectures (issue 26, item 8) against measurement: parameters per
pipeline stage, TP and expert-parallel rank against the built model's numel; the training FLOPs of
training/metrics.py against torch's own FLOP counter (torch.utils.flop_counter.FlopCounterMode) on the
PyTorch kernels; the memory report against the trainer's buffers and autograd's saved tensors
(tests/test_memory.py's harness); the generation cache against a KVCache after a prompt.

Configurations: Qwen3-like (kv_channels apart from hidden / heads, QK-norm, q/k/v biases, local and global
layers), MLA with and without the query bottleneck (DeepSeek-V2/V3), multi-token prediction, DeepSeek-V3
routing (sigmoid with the balancing bias, groups, shared expert, a dense first layer), and all of DeepSeek-V3
together.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megagopher import kernels
from megagopher.memory_params import forward_macs_per_token, kv_cache_bytes, stage_params
from megagopher.model import GPTConfig, GPTModel
from megagopher.pipeline_parallel.stages import stage_layer_ranges
from megagopher.testing import spawn
from megagopher.training.metrics import model_flops_per_token
from layouts import model_dict

# vocabulary 128 with make_vocab_size_divisible_by 8: no padding rows at tp 1 and 2, so the head's measured
# FLOPs are the formula's (which counts the real vocabulary).
BASE = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=8)  # d_qk 16, d_v 8
DEEPSEEK_MOE = dict(num_experts=8, moe_top_k=2, moe_ffn_hidden_size=24, moe_shared_experts=1, moe_router="sigmoid",
                    moe_bias_update_rate=1e-3, moe_n_group=4, moe_topk_group=2, moe_routed_scaling_factor=2.5,
                    first_k_dense=1)
CONFIGS = {
    "qwen3": model_dict("llama", **BASE, kv_channels=16, qk_norm=True, qkv_bias=True, window_size=8,
                        window_pattern=["local", "global"]),
    "mla-q-lora": model_dict("llama", **BASE, **MLA, q_lora_rank=24, num_query_groups=0),
    "mla": model_dict("llama", **BASE, **MLA, num_query_groups=0, bias=True),
    "mtp": model_dict("llama", **BASE, mtp_num_layers=2),
    "mtp-tied": model_dict("gpt2", **BASE, mtp_num_layers=1),
    "deepseek-moe": model_dict("llama", **BASE, **DEEPSEEK_MOE),
    "deepseek-v3": model_dict("llama", **BASE, **MLA, **DEEPSEEK_MOE, q_lora_rank=24, num_query_groups=0,
                              mtp_num_layers=1),
}


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def _stage_counts(cfg, pp, vpp=1):
    """[(measured numel, stage_params)] for every model chunk of a pp x vpp split, tp = ep = 1."""
    out = []
    ranges = stage_layer_ranges(cfg.num_layers, pp, vpp)
    for v, (start, end) in enumerate(ranges):
        pre, post = v == 0, v == len(ranges) - 1
        model = GPTModel(cfg, pre_process=pre, post_process=post, layer_range=(start, end))
        out.append((_numel(model), stage_params(cfg, 1, end - start, pre, post, first_layer=start)))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_per_pipeline_stage_match_the_built_model(name):
    cfg = GPTConfig(**CONFIGS[name])
    for pp, vpp in ((1, 1), (2, 1), (2, 2)):
        counts = _stage_counts(cfg, pp, vpp)
        assert [m for m, _ in counts] == [p for _, p in counts], (name, pp, vpp, counts)


def _forward_flops(cfg, ids):
    model = GPTModel(cfg).initialize(1)
    with kernels.use_backend("torch"), FlopCounterMode(display=False) as counter:
        model(ids, labels=ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_flops_match_torch_flop_counter(name):
    """One forward's matmul FLOPs as torch counts them on the PyTorch kernels, against 2 x the formula's
    multiply-accumulates per token (training: 3 x that, 4 x under full recompute). The PyTorch attention
    computes every score of the s x s square and masks the causal half and what lies outside a window: the
    formula counts the full square too, and a local layer's min(window, s) keys per query, so the
    measurement is the formula plus the (s - window) keys a local layer's query masks."""
    cfg = GPTConfig(**CONFIGS[name])
    b, s = 2, cfg.seq_length
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    masked = sum(max(s - cfg.window_size, 0) * 2 * cfg.num_attention_heads * cfg.head_dim
                 for i in range(cfg.num_layers) if cfg.is_local_layer(i))
    assert _forward_flops(cfg, ids) == 2 * b * s * (forward_macs_per_token(cfg, s) + masked)
    assert model_flops_per_token(cfg, s) == 3 * 2 * forward_macs_per_token(cfg, s)
    assert model_flops_per_token(cfg, s, "full") == 4 * 2 * forward_macs_per_token(cfg, s)


def test_flops_count_the_window_and_not_the_masked_keys():
    """A local layer at s = 4 w counts w keys per query, a quarter of a global layer's score products."""
    local = GPTConfig(**{**CONFIGS["qwen3"], "window_pattern": [], "seq_length": 32})
    full = GPTConfig(**{**CONFIGS["qwen3"], "window_size": 0, "window_pattern": [], "seq_length": 32})
    a, d, w, layers = local.num_attention_heads, local.head_dim, local.window_size, local.num_layers
    assert forward_macs_per_token(full, 32) - forward_macs_per_token(local, 32) == layers * (32 - w) * 2 * a * d


# (config, recompute) pairs whose whole report is held to measurement on one rank: parameters, gradients and
# optimizer state to the byte, and the activations (Triton kernels, interpreted) to the byte as well.
REPORTED = [(name, "none") for name in CONFIGS] + [("qwen3", "selective"), ("deepseek-v3", "selective"),
                                                   ("mtp", "full")]


@pytest.mark.parametrize("name, recompute", REPORTED, ids=[f"{n}-{r}" for n, r in REPORTED])
def test_report_matches_measurement_single_rank(name, recompute):
    from test_memory import compare
    training = {"precision": "fp32", "recompute": recompute, "micro_batch_size": 2}
    measured, predicted = compare(CONFIGS[name], {}, training, {"distributed": False})
    assert predicted["activations"] == measured["activations"], predicted["activation_items"]


def test_unfused_grouped_attention_activations_are_exact():
    """The unfused core with grouped keys saves k and v repeated to every head, not the rotated k (a fix the
    QK-norm accounting brought: the rotated copy was counted on top)."""
    from test_memory import compare
    for extra in ({"core_attention": "unfused"}, {"core_attention": "unfused", "qk_norm": False}):
        measured, predicted = compare({**CONFIGS["qwen3"], **extra}, {},
                                      {"precision": "fp32", "recompute": "none", "micro_batch_size": 2},
                                      {"distributed": False})
        assert predicted["activations"] == measured["activations"], extra


# Under tp 2 with sequence parallelism (world 2) and ep 2 inside dp 2 (world 2), bf16: every rank's report
# equals its measurement (test_memory.compare: parameters, gradients and ZeRO-1 state to the byte), and the
# activations to the byte under tp; under ep a rank's experts see the rows routed to them, which the report
# counts as the balanced share (n * top_k), so there the ranks' sum is exact and each rank within the 10%.
LAYOUTS = [(name, {"tp": 2, "sp": True}) for name in CONFIGS] + \
          [(name, {"dp": 2, "ep": 2}) for name in ("deepseek-moe", "deepseek-v3")]


def _world2(rank, world):
    from test_memory import compare
    out = {}
    for name, parallel in LAYOUTS:
        training = {"precision": "bf16", "recompute": "none", "micro_batch_size": 2}
        measured, predicted = compare(CONFIGS[name], parallel, training, {"distributed": True}, world_size=world)
        out[f"{name} {parallel}"] = (measured["activations"], predicted["activations"])
    return out


def test_report_matches_measurement_under_tp2_sp_and_ep2():
    results = spawn(_world2, 2, timeout_s=300)
    for key in results[0]:
        measured, predicted = [r[key][0] for r in results], [r[key][1] for r in results]
        if "'ep'" in key:
            assert sum(measured) == sum(predicted), (key, measured, predicted)
        else:
            assert measured == predicted, (key, measured, predicted)


@pytest.mark.parametrize("name", ["qwen3", "mla", "deepseek-v3"])
def test_kv_cache_bytes_match_the_generation_cache(name):
    """After a prompt and a few decoding steps, the KVCache's tensors hold what kv_cache_bytes says: keys and
    values per group (a local layer only its window), or MLA's latent and rope key; nothing for MTP."""
    from megagopher.model.attention import KVCache
    cfg = GPTConfig(**CONFIGS[name])
    model = GPTModel(cfg).initialize(1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache()
    with torch.no_grad(), kernels.use_backend("torch"):
        model(ids, kv_cache=cache, last_only=True)
        for _ in range(3):
            model(ids[:, -1:], kv_cache=cache, position_offset=len(cache), last_only=True)
    held = sum(t.numel() * t.element_size() for slot in cache.slots.values() for t in (slot.k, slot.v))
    assert len(cache) == 15 and held == kv_cache_bytes(cfg, 2, 15, 4)
    if cfg.window_size:  # the local layers' share stays at the window however long the sequence
        assert kv_cache_bytes(cfg, 2, 1000, 4) - kv_cache_bytes(cfg, 2, 999, 4) == \
            2 * 4 * 2 * cfg.num_query_groups * cfg.head_dim * sum(not cfg.is_local_layer(i) for i in range(4))
