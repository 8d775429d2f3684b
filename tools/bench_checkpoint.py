"""Peak memory and training stall of checkpoint saves and loads (docs/ARCHITECTURE.md 4.7):

    python tools/bench_checkpoint.py [--hidden 768 --layers 12 --vocab 50304 --dp 2 --output DIR]

Runs data parallelism with ZeRO-1 (fp32) on CPU gloo ranks, a model of about 160M parameters by default,
through the library calls the trainer makes, in three fresh sets of processes:
  baseline  build, wrap, optimizer, two steps: the peak resident memory of a run that never checkpoints;
  save      one step, a synchronous save, then two asynchronous saves, each overlapping a step: for each
            save, the peak resident memory during it above the memory just before it (the kernel's
            high-water mark, reset through /proc/self/clear_refs), and the stall: how long the step loop
            waits (the first asynchronous save allocates the host snapshot the later ones reuse);
  load      build, load the weights, wrap, optimizer, load its state, two steps: the peak resident memory
            above the baseline's.
Figures are per rank (the largest over ranks) and relative to the rank's model state (parameters, fp32
gradients, optimizer state). Linux only (/proc).
"""
import argparse
import os
import re
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher import parallel_state as ps  # noqa: E402
from megagopher.config import JobConfig  # noqa: E402
from megagopher.distributed import finalize_model_grads, wrap_data_parallel  # noqa: E402
from megagopher.model import GPTConfig, GPTModel  # noqa: E402
from megagopher.optimizer import build_optimizer  # noqa: E402
from megagopher.testing import spawn  # noqa: E402
from megagopher.training import checkpoint as ckpt  # noqa: E402

SEQ, MBS = 128, 1


def _status(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the resident high-water mark restarts from the current resident size


def _model_cfg(a):
    return GPTConfig(num_layers=a["layers"], hidden_size=a["hidden"], num_attention_heads=a["hidden"] // 64,
                     seq_length=SEQ, vocab_size=a["vocab"], tie_embeddings=False)


def _step(chunks, opt, vocab):
    ids = torch.randint(0, vocab, (MBS, SEQ), generator=torch.Generator().manual_seed(ps.get_dp_rank()))
    opt.zero_grad()
    chunks[0](ids, labels=torch.roll(ids, 1, 1)).mean().backward()
    finalize_model_grads(chunks)
    opt.step()
    # The trainer's per-step agreement (loss, flags) on the world group, so gloo's buffers for that group
    # exist before a save uses it, as in a real run.
    torch.distributed.all_reduce(torch.zeros(3, dtype=torch.float64))


def _build(a, reader=None):
    model = GPTModel(_model_cfg(a)).initialize(1)
    if reader is not None:
        ckpt.load_weights(reader, [model])
    chunks = wrap_data_parallel([model], {"bucket_size_mb": 40}, distributed_optimizer=True)
    opt = build_optimizer(chunks, {"lr": 1e-4, "distributed": True}, {"precision": "fp32"})
    if reader is not None:
        ckpt.load_optimizer(reader, chunks, opt)
    return chunks, opt


def _state_bytes(chunks, opt):
    buffer = chunks[0].buffer
    return (buffer.param_data.numel() * buffer.param_data.element_size() + buffer.grad_data.numel() * 4
            + opt.state_bytes())


def _timed_save(chunks, opt, root, iteration, background, a, pool):
    """(stall s, peak above the start in bytes, s until published) of one save. For an asynchronous save
    the peak is taken over the snapshot (the writer thread then writes from it, adding nothing), not over
    the training step it overlaps, which is measured by the baseline."""
    rss = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    pending = ckpt.begin_save(root, iteration, chunks, opt, {"iteration": iteration}, JobConfig(), background, pool)
    stall, peak = time.perf_counter() - start, _status("VmHWM") - rss
    if background:
        _step(chunks, opt, a["vocab"])  # the step the write overlaps
    ckpt.finish_save(pending)
    if not background:
        stall, peak = time.perf_counter() - start, _status("VmHWM") - rss
    return stall, peak, time.perf_counter() - start


def _rank(rank, world, mode, a, root):
    ps.initialize_model_parallel(tp=1, pp=1)
    out = {}
    if mode == "load":
        reader = ckpt.CheckpointReader(ckpt.iter_dir(root, 1))
        start = time.perf_counter()
        chunks, opt = _build(a, reader)
        out["load_s"] = time.perf_counter() - start
    else:
        chunks, opt = _build(a)
    out["state"] = _state_bytes(chunks, opt)
    out["params"] = sum(p.numel() for p in chunks[0].module.parameters())
    _step(chunks, opt, a["vocab"])
    if mode == "save":
        start = time.perf_counter()
        _step(chunks, opt, a["vocab"])
        out["step_s"] = time.perf_counter() - start
        pool = {}
        out["sync"] = _timed_save(chunks, opt, root, 1, False, a, pool)
        out["async_first"] = _timed_save(chunks, opt, root, 2, True, a, pool)
        out["async"] = _timed_save(chunks, opt, root, 3, True, a, pool)
        out["pool"] = sum(t.numel() * t.element_size() for t in pool.values())
    else:
        _step(chunks, opt, a["vocab"])
    out["peak"] = _status("VmHWM")
    chunks[0].finish_param_gather()  # ZeRO-1's last all-gathers: a group destroyed under them aborts
    ps.destroy_model_parallel()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--output", default=None, help="checkpoint root (default: a temporary directory)")
    args = parser.parse_args(argv)
    a = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.output or tmp
        base = spawn(_rank, args.dp, "baseline", a, root, timeout_s=1800, join_timeout_s=3600, reuse=False)
        save = spawn(_rank, args.dp, "save", a, root, timeout_s=1800, join_timeout_s=3600, reuse=False)
        load = spawn(_rank, args.dp, "load", a, root, timeout_s=1800, join_timeout_s=3600, reuse=False)
        size = sum(os.path.getsize(os.path.join(ckpt.iter_dir(root, 1), f)) for f in os.listdir(ckpt.iter_dir(root, 1)))
    state = max(r["state"] for r in base)
    gib = 2 ** 30
    print(f"model: {base[0]['params'] / 1e6:.1f}M parameters, fp32, dp{args.dp} + ZeRO-1; model state per rank "
          f"{state / gib:.2f} GiB; checkpoint {size / gib:.2f} GiB on disk; one step {save[0]['step_s']:.2f} s\n")
    print("| | peak RSS above the run without checkpoints | % of model state | stall per save |")
    print("|---|---|---|---|")
    for label, key in (("save, synchronous", "sync"), ("save, asynchronous, first (allocates the snapshot)",
                                                       "async_first"), ("save, asynchronous, later", "async")):
        extra = max(r[key][1] for r in save)
        stall = max(r[key][0] for r in save)
        print(f"| {label} | {extra / gib:.3f} GiB | {100 * extra / state:+.1f}% | {stall:.2f} s "
              f"(published after {max(r[key][2] for r in save):.2f} s) |")
    pool = max(r["pool"] for r in save)
    print(f"| asynchronous saves keep their host snapshot | {pool / gib:.3f} GiB | {100 * pool / state:+.1f}% | |")
    extra = max(lr["peak"] - br["peak"] for lr, br in zip(load, base))
    print(f"| load (build, read weights and ZeRO-1 shard, two steps) | {extra / gib:.3f} GiB | "
          f"{100 * extra / state:+.1f}% | load {max(r['load_s'] for r in load):.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
