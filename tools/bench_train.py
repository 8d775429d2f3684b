#!/usr/bin/env python
"""Framework overhead: tokens/s of ``megagopher.train`` at tp = pp = dp = 1 against a plain PyTorch loop
training the same model on the same batches.

    python tools/bench_train.py [--config FILE.toml] [--steps N] [--warmup N] [--section.key=value ...]
    python tools/bench_train.py --mode tp2-sp [--compare REF]   # 2 CPU ranks, the quick start model
    python tools/bench_train.py --device cuda                   # MFU of gopher_1.4b on one GPU (--mode cuda)

Both sides build the same GPTModel from the same config and seed and read the same synthetic batches; the
plain loop is forward, backward, clip, AdamW, with nothing else. The framework adds its schedule entry
point, the data-parallel wrapper's gradient buffer, the loss/flag all-reduce, the global-norm
computation, metrics.jsonl and the console line. Steps after ``--warmup`` are timed; the medians are
compared. Target: ratio >= 0.95.

``--mode tp2-sp`` times ``megagopher.train`` under torchrun on 2 ranks with tensor and sequence
parallelism, the quick start's model on synthetic data (tokens/s, the median step); ``--compare REF``
times commit REF the same way (from a git worktree) and prints both rows. ``--mode cuda`` trains
gopher_1.4b (examples/configs/gopher_1.4b.toml, bf16, ZeRO-1 off, one GPU, synthetic data) and reports
the median TFLOP/s per device and MFU against the card's dense bf16 peak (training/metrics.py).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

DEFAULT_CONFIG = """
[model]
num_layers = 4
hidden_size = 256
num_attention_heads = 8
vocab_size = 4096
seq_length = 256
normalization = "rmsnorm"
activation = "swiglu"
position_embedding = "rope"
[training]
micro_batch_size = 8
global_batch_size = 8
seed = 1
log_interval = 1000
[optimizer]
lr = 1e-3
[data]
source = "synthetic"
[run]
tensorboard = false
"""


def plain_loop(cfg, steps):
    """The baseline: the same model and batches, trained by a minimal PyTorch loop. Returns step times."""
    import torch
    import torch.distributed as dist

    from megagopher import parallel_state as ps
    from megagopher.model import GPTModel
    from megagopher.tensor_parallel import model_parallel_seed
    from megagopher.training.data import SyntheticDataset, global_batch_indices, microbatches

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel()
    t, o = cfg.training, cfg.optimizer
    model_parallel_seed(t.seed, 0)
    mcfg = cfg.model
    model = GPTModel(mcfg).initialize(t.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    data = SyntheticDataset(mcfg.vocab_size, mcfg.seq_length, t.seed)
    gbs = t.global_batch_size
    times = []
    for step in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for mb in microbatches(data, global_batch_indices(step * gbs, gbs, 0, 1), t.micro_batch_size, "cpu"):
            model(mb["tokens"], labels=mb["labels"]).sum().div(gbs * mcfg.seq_length).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        times.append(time.perf_counter() - start)
    ps.destroy_model_parallel()
    return times


def framework(cfg, steps, run_dir):
    from megagopher.training.loop import Trainer
    cfg.stages[0].train_iters = steps
    cfg.run.dir = run_dir
    trainer = Trainer(cfg)
    trainer.run()
    trainer.close()  # ends the process groups in order, as megagopher.train does
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step_time_s"] for line in f if line.strip()]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TP2_SP = ("--parallel.tp=2", "--parallel.pp=1", "--parallel.sp=true", "--data.source=synthetic",
          "--model.vocab_size=4096", "--training.eval_interval=0", "--run.tensorboard=false", "--checkpoint.dir=")
CUDA_1_4B = ("--parallel.tp=1", "--parallel.pp=1", "--parallel.sp=false", "--data.source=synthetic",
             "--model.vocab_size=32000", "--training.device=cuda", "--training.global_batch_size=16",
             "--training.eval_interval=0", "--run.tensorboard=false", "--checkpoint.dir=")


def _train_rows(repo, config, overrides, steps, nproc):
    """metrics.jsonl rows of ``steps`` steps of megagopher.train from the checkout ``repo``."""
    import subprocess
    from megagopher.testing import free_port
    with tempfile.TemporaryDirectory() as run_dir:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                  f"--master-port={free_port()}"] if nproc > 1 else [sys.executable]
        cmd = [*launch, "-m", "megagopher.train", "--config", config, f"--run.dir={run_dir}",
               f"--training.train_iters={steps}", *overrides]
        env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if r.get("event", "train") == "train"]


def tp2_sp(args):
    """Tokens/s of the quick start model at tp2 + SP on 2 CPU ranks, here and (``--compare``) at REF."""
    import subprocess
    config = os.path.join(ROOT, "examples", "configs", "quickstart.toml")
    rows = [("this checkout", _train_rows(ROOT, config, TP2_SP, args.steps, 2))]
    if args.compare:
        with tempfile.TemporaryDirectory() as tmp:
            tree = os.path.join(tmp, "ref")
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, args.compare], check=True,
                           capture_output=True)
            try:
                rows.append((args.compare, _train_rows(tree, os.path.join(tree, "examples", "configs", "quickstart.toml"),
                                                       TP2_SP, args.steps, 2)))
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    print(f"{'tp2 + SP, 2 CPU ranks':<28}{'median step (ms)':>18}{'tokens/s':>12}")
    for name, r in rows:
        step = statistics.median(x["step_time_s"] for x in r[args.warmup:])
        tokens_per_step = r[1]["tokens"] - r[0]["tokens"]
        print(f"{name:<28}{1000 * step:>18.1f}{tokens_per_step / step:>12.0f}")


def cuda_mfu(args):
    """Median TFLOP/s per device and MFU of gopher_1.4b on one GPU."""
    import torch
    from megagopher.training.metrics import peak_tflops
    if not torch.cuda.is_available():
        sys.exit("--mode cuda needs a CUDA device")
    config = os.path.join(ROOT, "examples", "configs", "gopher_1.4b.toml")
    rows = _train_rows(ROOT, config, CUDA_1_4B, args.steps, 1)[args.warmup:]
    name = torch.cuda.get_device_name(0)
    tflops = statistics.median(r["tflops_per_device"] for r in rows)
    peak = peak_tflops(name)
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "unknown peak"
    print(f"gopher_1.4b on one {name}: {tflops:.1f} TFLOP/s per device, MFU {mfu} "
          f"(median of {len(rows)} steps, {rows[0]['global_batch_size']} x 2048 tokens per step)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("overhead", "tp2-sp", "cuda"), default="overhead")
    parser.add_argument("--compare", help="--mode tp2-sp: also time this git commit")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the same as --mode cuda")
    parser.add_argument("--config", help="TOML config (default: a 4-layer, 256-wide model on synthetic data)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the result as JSON")
    args, rest = parser.parse_known_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.device == "cuda":
        args.mode = "cuda"
    if args.mode != "overhead":
        return tp2_sp(args) if args.mode == "tp2-sp" else cuda_mfu(args)
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from megagopher.config import load_config, parse_overrides
    with tempfile.TemporaryDirectory() as tmp:
        path = args.config
        if path is None:
            path = os.path.join(tmp, "bench.toml")
            with open(path, "w") as f:
                f.write(DEFAULT_CONFIG)
        cfg = load_config(path, parse_overrides(rest))
        for key in ("tp", "pp"):
            if getattr(cfg.parallel, key) != 1:
                sys.exit(f"bench_train measures tp = pp = dp = 1; got parallel.{key} = {getattr(cfg.parallel, key)}")
        tokens = cfg.training.global_batch_size * cfg.model.seq_length
        # Interleave the two so that machine noise hits both alike: plain, framework, plain.
        plain_a = plain_loop(load_config(path, parse_overrides(rest)), args.steps)
        ours = framework(cfg, args.steps, os.path.join(tmp, "run"))
        plain_b = plain_loop(load_config(path, parse_overrides(rest)), args.steps)
    plain = plain_a[args.warmup:] + plain_b[args.warmup:]
    ours = ours[args.warmup:]
    result = {"tokens_per_step": tokens, "plain_tokens_per_s": tokens / statistics.median(plain),
              "megagopher_tokens_per_s": tokens / statistics.median(ours)}
    result["ratio"] = result["megagopher_tokens_per_s"] / result["plain_tokens_per_s"]
    print(f"{'loop':<22}{'median step (ms)':>18}{'tokens/s':>12}")
    print(f"{'plain PyTorch':<22}{1000 * statistics.median(plain):>18.1f}{result['plain_tokens_per_s']:>12.0f}")
    print(f"{'megagopher.train':<22}{1000 * statistics.median(ours):>18.1f}{result['megagopher_tokens_per_s']:>12.0f}")
    print(f"ratio megagopher / plain = {result['ratio']:.3f} (target >= 0.95)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
