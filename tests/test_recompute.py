"""Activation recomputation: "full" (every layer, or the first N) and "selective" (the core attention only)
give the same gradients as none, bitwise, with dropout on (fp32, same seed): the RNG tracker's streams are
replayed. Through the data-parallel wrapper too (its gradient hooks fire inside the recomputation). And the
memory it saves, measured with saved_tensors_hooks, is what Korthikanti et al. count (tools/bench_recompute.py
prints the full table for docs/memory.md)."""
import importlib.util
import os

import pytest
import torch

from megagopher import kernels
from megagopher.distributed import finalize_model_grads, wrap_data_parallel
from megagopher.memory import layer_activations, saved_activation_bytes
from megagopher.model import GPTConfig, GPTModel
from megagopher.tensor_parallel import model_parallel_seed
from layouts import model_config

# Unfused attention so that attention dropout runs (the fused kernel has none); Llama keeps the fused kernel.
DROPOUT = dict(dropout=0.2, attention_dropout=0.2)
FLAVOURS = {"codegen": DROPOUT, "gpt2": dict(core_attention="unfused", **DROPOUT), "llama": dict(dropout=0.2)}
MODES = [("none", None), ("selective", None), ("full", None), ("full", 2)]  # (recompute, recompute_num_layers)


def _cfg(flavour):
    return model_config(flavour, num_layers=3, vocab_size=64, **FLAVOURS[flavour])


def _grads(cfg, recompute, num_layers, seed=5, wrapped=False):
    model_parallel_seed(seed, 0)
    model = GPTModel(cfg, recompute=recompute, recompute_num_layers=num_layers).initialize(1)
    chunks = wrap_data_parallel([model], {"bucket_size_mb": 0.01}) if wrapped else [model]
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two micro-batches: the dropout streams move on between them
        with (chunks[0].no_sync() if wrapped else torch.enable_grad()):
            chunks[0](ids, labels=ids).mean().backward()
    finalize_model_grads(chunks)
    return {n: (p.main_grad if wrapped else p.grad).clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_recompute_gives_identical_gradients(flavour):
    cfg = _cfg(flavour)
    reference = _grads(cfg, "none", None)
    for recompute, num_layers in MODES[1:]:
        grads = _grads(cfg, recompute, num_layers)
        for name, g in reference.items():
            assert torch.equal(grads[name], g), f"{flavour} recompute={recompute} ({num_layers}): grad {name} differs"
    wrapped = _grads(cfg, "full", None, wrapped=True)  # main_grad filled by the hooks inside checkpoint()
    for name, g in reference.items():
        torch.testing.assert_close(wrapped[name], g, rtol=1e-6, atol=1e-8,
                                   msg=lambda m: f"{flavour} wrapped {name}: {m}")
    # Dropout really was on: another seed gives other gradients.
    other = _grads(cfg, "none", None, seed=6)
    assert any(not torch.equal(other[n], g) for n, g in reference.items())


def test_saved_bytes_per_layer_match_the_count():
    """One bf16 layer, unfused attention, dropout on: full recompute keeps the layer input only (2sbh),
    selective drops every s^2 tensor, and all three equal memory.layer_activations exactly (CPU masks:
    one bf16 element each) -- which on CUDA is Korthikanti et al.'s sbh(34 + 5as/h) and 34sbh plus the
    norms' fp32 statistics."""
    from megagopher.model.gpt import TransformerLayer
    from megagopher.tensor_parallel import checkpoint
    cfg = GPTConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=64,
                    core_attention="unfused", dropout=0.1, attention_dropout=0.1)
    s, b, h, a = cfg.seq_length, 2, cfg.hidden_size, cfg.num_attention_heads
    model_parallel_seed(1, 0)
    measured, shapes = {}, {}
    for recompute in ("none", "selective", "full"):
        layer = TransformerLayer(cfg, False, selective_recompute=recompute == "selective").to(torch.bfloat16)
        x = torch.randn(s, b, h, dtype=torch.bfloat16, requires_grad=True)
        run = (lambda: checkpoint(layer, x)) if recompute == "full" else (lambda: layer(x))
        with kernels.use_backend("triton"):  # the fused kernels (the GPU path), interpreted on CPU
            _, measured[recompute], seen = saved_activation_bytes(run, list(layer.parameters()))
        shapes[recompute] = [shape for _, shape, _ in seen.values()]
        predicted = sum(layer_activations(cfg, s, b, recompute=recompute, e=2, mask_bytes=2).values())
        assert measured[recompute] == predicted, (recompute, measured[recompute], predicted)
    assert measured["full"] == 2 * s * b * h
    assert any(shape[-2:] == (s, s) for shape in shapes["none"])
    assert not any(shape[-2:] == (s, s) for shape in shapes["selective"])
    cuda = sum(layer_activations(cfg, s, b, e=2, mask_bytes=1).values())
    norm_stats = 2 * 2 * 4 * s * b  # two LayerNorms, mean and rstd in fp32 per token
    assert cuda - norm_stats == s * b * h * (34 + 5 * a * s / h)
    cuda_selective = sum(layer_activations(cfg, s, b, recompute="selective", e=2, mask_bytes=1).values())
    assert cuda_selective - norm_stats == 34 * s * b * h


def test_bench_script_runs():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_recompute.py")
    spec = importlib.util.spec_from_file_location("bench_recompute", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(hidden=32, heads=4, seq=16, batch=1, tp2=False)
    assert [r["recompute"] for r in rows] == ["none", "selective", "full"]
    assert all(r["measured"] == r["predicted_cpu"] for r in rows)
    assert "Korthikanti" in bench.table(rows, 32, 4, 16, 1)
