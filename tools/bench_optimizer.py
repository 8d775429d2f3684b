"""Benchmark (not a timed test): megagopher's optimizer step (gradient norm, clipping, AdamW over the flat
fp32 buffers) through torch's fused AdamW kernel against the same step as separate tensor ops, and
torch.optim.AdamW(fused=True) on the same parameters as the outside baseline, interleaved in one invocation.

    python tools/bench_optimizer.py [--steps 12] [--threads 2]

The model is issue 27's Llama shape (hidden 384, 4 layers, 6 heads in 2 key/value groups, SwiGLU 1024,
vocabulary 4096: 9.44M parameters), fp32, one process; the gradients are random (the step's arithmetic
does not depend on them). Prints each variant's median step time with its min and max over the timed steps
(the first two are warm-up).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import megagopher.optimizer.optimizer as optimizer_module  # noqa: E402
from megagopher.distributed import wrap_data_parallel  # noqa: E402
from megagopher.model import GPTConfig, GPTModel  # noqa: E402
from megagopher.optimizer import build_optimizer  # noqa: E402

CONFIG = dict(num_layers=4, hidden_size=384, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=1024,
              vocab_size=4096, seq_length=256, normalization="rmsnorm", activation="swiglu",
              position_embedding="rope", tie_embeddings=False, bias=False)
OPT = {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "clip_grad": 1.0}


def _ours(fused):
    """A step function of megagopher's Optimizer, the fused kernel on or off."""
    devices = optimizer_module._FUSED_DEVICES if fused else ()
    model = GPTModel(GPTConfig(**CONFIG)).initialize(1)
    opt = build_optimizer(wrap_data_parallel([model], {}), OPT)
    for buffer in opt.buffers:
        buffer.grad_data.normal_()

    def step():
        optimizer_module._FUSED_DEVICES = devices  # read at each step: set per variant, as they interleave
        opt.step()
    return step


def _torch_fused():
    """torch.optim.AdamW(fused=True) with clip_grad_norm_, Megatron's decay groups (no decay on 1-D)."""
    params = list(GPTModel(GPTConfig(**CONFIG)).initialize(1).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": OPT["weight_decay"]},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"], fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(params, OPT["clip_grad"])
        opt.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="steps per variant, the first two untimed")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"megagopher, fused kernel": _ours(True), "megagopher, separate ops": _ours(False),
                "torch.optim.AdamW(fused=True)": _torch_fused()}
    times = {name: [] for name in variants}
    for i in range(args.steps):  # interleaved: the machine's state drifts alike for every variant
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in GPTModel(GPTConfig(**CONFIG)).parameters())
    print(f"optimizer step, {n / 1e6:.2f}M fp32 parameters, {args.threads} threads, {len(times[name])} steps each")
    for name, t in times.items():
        print(f"  {name:32s} median {statistics.median(t) * 1e3:6.1f} ms  "
              f"(min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})")


if __name__ == "__main__":
    main()
