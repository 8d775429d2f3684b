#!/usr/bin/env python3
"""Activation bytes each pipeline stage holds at its peak, with the stage outputs kept and freed once sent
(Megatron's deallocate_output_tensor), against megagopher's memory report.

    python tools/bench_activations.py [--pp 4 --layers 8 --microbatches 8 --hidden 64 --seq 32 --batch 2]
                                      [--recompute none|full] [--schedules 1f1b gpipe interleaved]

One gloo rank per stage runs one forward-backward of a GPT (LayerNorm, GeLU, learned positions, tied
embeddings, fp32, flash attention) under each schedule with megagopher's fused kernels (the GPU path; on
CPU the Triton interpreter runs them), twice: stage outputs kept (the runtime before the change), and
freed (``forward_backward(..., deallocate_outputs=True)``, the default). memory.ActivationMeter samples,
after every pass, the distinct storages of the tensors autograd saved and still holds plus the stage
inputs and outputs the runtime keeps (parameters excluded; communication buffers not counted), and keeps
the peak. The prediction is ``memory_report(..., pp_rank=stage, device="cpu")["activations"]``.
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused kernels on CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megagopher import kernels  # noqa: E402
from megagopher import parallel_state as ps  # noqa: E402
from megagopher.memory import ActivationMeter, memory_report  # noqa: E402
from megagopher.model import GPTConfig  # noqa: E402
from megagopher.pipeline_parallel.schedules import forward_backward  # noqa: E402
from megagopher.pipeline_parallel.stages import build_model_chunks  # noqa: E402
from megagopher.testing import spawn  # noqa: E402

SCHEDULES = {"1f1b": 1, "gpipe": 1, "interleaved": 2}  # schedule: vpp


def model_dict(layers, hidden, heads, seq):
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, seq_length=seq, vocab_size=256,
                make_vocab_size_divisible_by=8, normalization="layernorm", activation="gelu",
                position_embedding="learned", tie_embeddings=True)


def measure(model, schedule, m, batch, recompute, deallocate):
    """This stage's peak held bytes over one forward-backward of ``m`` micro-batches."""
    cfg = GPTConfig(**model)
    chunks = build_model_chunks(cfg, recompute=recompute, seed=3)
    gen = torch.Generator().manual_seed(0)
    data = [{"tokens": torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=gen),
             "labels": torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=gen)} for _ in range(m)]
    tokens = m * batch * cfg.seq_length
    with kernels.use_backend("triton"), ActivationMeter(exclude=[p for c in chunks for p in c.parameters()]) as meter:
        forward_backward(chunks, data, lambda per_token: per_token.sum() / tokens, schedule=schedule, meter=meter,
                         deallocate_outputs=deallocate)
    return meter.peak


def _worker(rank, world, layers, hidden, heads, seq, batch, m, recompute, schedules):
    rows = []
    for schedule in schedules:
        vpp = SCHEDULES[schedule]
        model = model_dict(layers * vpp, hidden, heads, seq)
        ps.initialize_model_parallel(pp=world, vpp=vpp)
        kept = measure(model, schedule, m, batch, recompute, deallocate=False)
        freed = measure(model, schedule, m, batch, recompute, deallocate=True)
        report = memory_report(model, {"pp": world, "vpp": vpp, "schedule": schedule, "dp": 1},
                               {"precision": "fp32", "micro_batch_size": batch, "global_batch_size": batch * m,
                                "recompute": recompute}, {}, pp_rank=rank, device="cpu")
        rows.append(dict(schedule=schedule, vpp=vpp, layers=layers * vpp, stage=rank, in_flight=report["in_flight"],
                         predicted=report["activations"], kept=kept, freed=freed))
        ps.destroy_model_parallel()
    return rows


def table(rows, args):
    sbh = args.seq * args.batch * args.hidden * 4
    lines = [f"pp = {args.pp}, {args.microbatches} micro-batches, s = {args.seq}, b = {args.batch}, "
             f"h = {args.hidden}, a = {args.heads}, fp32, recompute {args.recompute} (one [s, b, h] output = "
             f"{sbh:,} bytes); bytes per stage at its peak",
             "",
             "| schedule | layers | stage | in flight | memory.py | outputs kept (before) | outputs freed (after) "
             "| before / memory.py | after / memory.py |",
             "|:--|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['schedule']}{' vpp ' + str(r['vpp']) if r['vpp'] > 1 else ''} | {r['layers']} | "
                     f"{r['stage']} | {r['in_flight']} | {r['predicted']:,} | {r['kept']:,} | {r['freed']:,} | "
                     f"{r['kept'] / r['predicted']:.4f} | {r['freed'] / r['predicted']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--layers", type=int, default=8, help="layers of the model (times vpp when interleaved)")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--recompute", choices=("none", "full"), default="none")
    p.add_argument("--schedules", nargs="+", choices=tuple(SCHEDULES), default=list(SCHEDULES))
    args = p.parse_args(argv)
    per_rank = spawn(_worker, args.pp, args.layers, args.hidden, args.heads, args.seq, args.batch,
                     args.microbatches, args.recompute, args.schedules, timeout_s=900, join_timeout_s=1800,
                     reuse=False)
    rows = sorted((r for rank in per_rank for r in rank), key=lambda r: (args.schedules.index(r["schedule"]),
                                                                          r["stage"]))
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
