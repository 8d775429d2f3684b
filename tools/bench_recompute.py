#!/usr/bin/env python3
"""Activation memory per transformer layer with and without recomputation, measured against Korthikanti
et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Table 2) and megagopher's
memory report.

    python tools/bench_recompute.py [--hidden 128 --heads 4 --seq 128 --batch 2] [--markdown]

For each (tp, sequence parallel, recompute) the bytes saved for the backward pass by one layer's forward
are measured with torch.autograd.graph.saved_tensors_hooks (distinct storages, parameters excluded, the
layer's input included), in bf16 with dropout on and the unfused attention, the paper's setting, using
megagopher's fused kernels (the GPU path; on CPU the Triton interpreter runs them). tp = 2 runs on two
gloo ranks. The paper counts 1 byte per dropout-mask element (CUDA); CPU dropout keeps a bf16 mask, so
the table also shows memory.py's prediction for CUDA next to its prediction for this CPU run.
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused kernels on CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megagopher import kernels  # noqa: E402
from megagopher import parallel_state as ps  # noqa: E402
from megagopher.memory import layer_activations, saved_activation_bytes  # noqa: E402
from megagopher.model import GPTConfig  # noqa: E402
from megagopher.model.gpt import TransformerLayer  # noqa: E402
from megagopher.tensor_parallel import checkpoint, model_parallel_seed  # noqa: E402
from megagopher.testing import spawn  # noqa: E402

SETTINGS = [(1, False, "none"), (1, False, "selective"), (1, False, "full"),
            (2, False, "none"), (2, False, "selective"),
            (2, True, "none"), (2, True, "selective"), (2, True, "full")]


def korthikanti(s, b, h, a, t, sp, recompute):
    """Table 2 of the paper: bytes of activations per layer (16-bit activations, 1-byte masks); and the
    formula as text."""
    sbh = s * b * h
    if recompute == "full":
        return (2 * sbh / t, "2sbh/t") if sp else (2 * sbh, "2sbh")
    if recompute == "selective":
        return (34 * sbh / t, "34sbh/t") if sp or t == 1 else (sbh * (10 + 24 / t), "sbh(10 + 24/t)")
    if sp or t == 1:
        return sbh / t * (34 + 5 * a * s / h), "sbh/t (34 + 5as/h)" if t > 1 else "sbh(34 + 5as/h)"
    return sbh * (10 + 24 / t + 5 * a * s / (h * t)), "sbh(10 + 24/t + 5as/(ht))"


def layer_config(hidden, heads, seq):
    return GPTConfig(num_layers=1, hidden_size=hidden, num_attention_heads=heads, seq_length=seq, vocab_size=128,
                     core_attention="unfused", dropout=0.1, attention_dropout=0.1, normalization="layernorm",
                     activation="gelu", position_embedding="learned")


def measure_layer(cfg, batch, sp, recompute, dtype=torch.bfloat16):
    """Bytes one TransformerLayer saves for backward (this rank), under the current parallel_state."""
    tp = ps.get_tp_size()
    model_parallel_seed(7, ps.get_tp_rank())
    layer = TransformerLayer(cfg, sp and tp > 1, selective_recompute=recompute == "selective").to(dtype)
    rows = cfg.seq_length // tp if sp and tp > 1 else cfg.seq_length
    x = torch.randn(rows, batch, cfg.hidden_size, dtype=dtype, requires_grad=True)
    run = (lambda: checkpoint(layer, x)) if recompute == "full" else (lambda: layer(x))
    with kernels.use_backend("triton"):
        _, saved, _ = saved_activation_bytes(run, list(layer.parameters()))
    return saved


def _rows(cfg, batch, settings):
    rows = []
    for tp, sp, recompute in settings:
        if ps.get_tp_size() != tp:
            continue
        measured = measure_layer(cfg, batch, sp, recompute)
        s, b, h, a = cfg.seq_length, batch, cfg.hidden_size, cfg.num_attention_heads
        formula, text = korthikanti(s, b, h, a, tp, sp, recompute)
        cpu = sum(layer_activations(cfg, s, b, tp, sp, recompute, e=2, mask_bytes=2).values())
        cuda = sum(layer_activations(cfg, s, b, tp, sp, recompute, e=2, mask_bytes=1).values())
        rows.append(dict(tp=tp, sp=sp, recompute=recompute, measured=measured, predicted_cpu=cpu,
                         predicted_cuda=cuda, formula=formula, formula_text=text, sbh=s * b * h))
    return rows


def _tp2_worker(rank, world, hidden, heads, seq, batch):
    ps.initialize_model_parallel(tp=2)
    return _rows(layer_config(hidden, heads, seq), batch, SETTINGS)


def run(hidden=128, heads=4, seq=128, batch=2, tp2=True):
    cfg = layer_config(hidden, heads, seq)
    rows = _rows(cfg, batch, SETTINGS)
    if tp2:
        rows += spawn(_tp2_worker, 2, hidden, heads, seq, batch, timeout_s=600)[0]
    return rows


def table(rows, hidden, heads, seq, batch):
    lines = [f"s = {seq}, b = {batch}, h = {hidden}, a = {heads} (5as/h = {5 * heads * seq / hidden:g}); bf16, "
             "unfused attention, dropout 0.1; bytes per layer per rank",
             "",
             "| tp | SP | recompute | measured (CPU) | memory.py, CPU | memory.py, CUDA | Korthikanti et al. "
             "| formula bytes | CUDA / formula |",
             "|---:|:--:|:--|---:|---:|---:|:--|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tp']} | {'yes' if r['sp'] else 'no'} | {r['recompute']} | {r['measured']:,} "
                     f"({r['measured'] / r['sbh']:.2f} sbh) | {r['predicted_cpu']:,} | {r['predicted_cuda']:,} "
                     f"({r['predicted_cuda'] / r['sbh']:.2f} sbh) | {r['formula_text']} | {r['formula']:,.0f} "
                     f"({r['formula'] / r['sbh']:.2f} sbh) | {r['predicted_cuda'] / r['formula']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-tp2", action="store_true", help="skip the two-rank (tp = 2) rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.hidden, args.heads, args.seq, args.batch, tp2=not args.no_tp2)
    print(table(rows, args.hidden, args.heads, args.seq, args.batch))
    mismatched = [r for r in rows if r["measured"] != r["predicted_cpu"]]
    if mismatched:
        print(f"\nwarning: memory.py's CPU prediction differs from the measurement in {len(mismatched)} row(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
