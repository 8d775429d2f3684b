#!/usr/bin/env bash
# One-GPU check of megagopher (issue 13): the CUDA kernel tests, the kernel benchmark and a short bf16
# training of gopher_417m reporting MFU, in under 8 minutes on one H100/H200. Writes its table to
# BENCHMARKS.md between the gpu_check markers (a rerun replaces the section) with the card's name.
#
#   bash tools/gpu_check.sh            # PYTHON=... to pick the interpreter (default: .venv/bin/python or python)
#
# Exit status: 0 when every step passed, 1 when one failed (the table says which), 2 without a CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on an H100/H200" >&2
    exit 2
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# A compiled session: the gpu tests run in it directly. (Under README's `python -m pytest tests` the session
# interprets, for the CPU tests, and tests/conftest.py runs the same gpu tests in a compiled child pytest.)
export TRITON_INTERPRET=0
# Time limits per step add up to 7.5 minutes, leaving the rest of the 8 for start-up and the table. The tests
# run first: they compile (and autotune) the kernels at the shapes the benchmark and the training reuse from
# triton's cache. The benchmark stops starting measurements 25 s before its limit (lowest priority last) and
# writes its JSON as it goes, so a slow card shortens its table rather than losing it.
step() {  # step NAME SECONDS CMD...: run CMD with a limit, keep its log and exit status for the table
    local name="$1" limit="$2"; shift 2
    echo "gpu_check: $name ..." >&2
    local start=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    echo "$? $((SECONDS - start))" >"$WORK/$name.status"
    tail -3 "$WORK/$name.log" >&2
}

step tests 190 "$PY" -m pytest -q -n 0 -p no:cacheprovider --durations=5 tests/test_kernels_cuda.py
step bench 170 "$PY" tools/bench_kernels.py --budget 145 --json "$WORK/bench.json"
# 30 steps of 16 sequences of 2048 tokens on synthetic data, nothing saved; MFU from the later steps.
step train 90 "$PY" -m megagopher.train --config examples/configs/gopher_417m.toml \
    --parallel.tp=1 --parallel.pp=1 --parallel.sp=false --data.source=synthetic --model.vocab_size=32000 \
    --training.device=cuda --training.precision=bf16 --training.train_iters=30 --training.global_batch_size=16 \
    --training.eval_interval=0 --run.tensorboard=false --checkpoint.dir= --run.dir="$WORK/run"

"$PY" - "$WORK" BENCHMARKS.md <<'EOF'
import json, os, statistics, sys, time
import torch, triton
from megagopher.training.metrics import peak_tflops

work, path = sys.argv[1], sys.argv[2]
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
card = torch.cuda.get_device_name(0)
status = {n: open(os.path.join(work, f"{n}.status")).read().split() for n in ("tests", "bench", "train")}
failed = [n for n, (rc, _) in status.items() if rc != "0"]


def bench_table(rows, card):
    """tools/bench_kernels.py's rows pivoted: one line per (kernel, shape, direction) with the Triton kernel's
    time, rate and fraction of the ceiling, then every baseline (SDPA's backend named) and Triton's speedup."""
    copy = next((r for r in rows if r["kernel"] == "copy"), {})
    lines = [f"Ceilings on {card}: measured copy bandwidth {copy.get('GB/s', '?')} GB/s (the memory-bound "
             f"kernels' %), peak {copy.get('peak_tflops') or '?'} TFLOP/s dense bf16 (attention's %). "
             "Speedup > 1: Triton is faster.", "",
             "| kernel | shape | dtype | dir | triton ms | TFLOP/s or GB/s | % of peak | baselines: ms (Triton's speedup) |",
             "|---|---|---|---|---|---|---|---|"]
    groups, notes = {}, []
    for r in rows:
        if r["kernel"] == "copy":
            continue
        if r["direction"] == "-":
            notes.append(f"{r['impl']} on {r['kernel']} {r['shape']}: {r.get('note', '')}")
            continue
        g = groups.setdefault((r["kernel"], r["shape"], r["dtype"], r["direction"]), {"triton": None, "base": []})
        g["triton"] = r if r["impl"] == "triton" else g["triton"]
        g["base"] += [] if r["impl"] == "triton" else [r]
    hits = {"attention": [0, 0], "memory-bound": [0, 0]}
    for (kernel, shape, dtype, direction), g in groups.items():
        t = g["triton"] or {}
        rate = t.get("TFLOP/s", t.get("GB/s", ""))
        frac = f"{100 * t['of_peak']:.0f}%" if t.get("of_peak") is not None else ""
        base = ", ".join(f"{b['impl']} {b['ms']:.3f} ({b['triton_speedup']:.2f}x)" if b.get("triton_speedup") is not None
                         else f"{b['impl']} {b['ms']:.3f}" for b in g["base"])
        lines.append(f"| {kernel} | {shape} | {dtype} | {direction} | {t.get('ms', '')} | {rate} | {frac} | {base} |")
        flash = [b for b in g["base"] if b["impl"] == "sdpa[flash]" and b.get("triton_speedup") is not None]
        if kernel == "attention" and direction == "fwd+bwd" and flash:  # target: at least SDPA flash's speed
            hits["attention"] = [hits["attention"][0] + (flash[0]["triton_speedup"] >= 1), hits["attention"][1] + 1]
        elif kernel != "attention" and t.get("of_peak") is not None:  # target: 85% of the copy bandwidth
            hits["memory-bound"] = [hits["memory-bound"][0] + (t["of_peak"] >= 0.85), hits["memory-bound"][1] + 1]
    lines += ["", f"Targets: attention fwd+bwd at least SDPA flash's speed in {hits['attention'][0]} of "
              f"{hits['attention'][1]} shapes; memory-bound kernels at 85% or more of the copy bandwidth in "
              f"{hits['memory-bound'][0]} of {hits['memory-bound'][1]} rows."]
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def last_line(name):
    lines = [l for l in open(os.path.join(work, f"{name}.log")).read().splitlines() if l.strip()]
    return lines[-1] if lines else "(no output)"


out = [BEGIN, f"## GPU check: {card}", "",
       f"`bash tools/gpu_check.sh`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
       f"triton {triton.__version__}. Steps: " + ", ".join(f"{n} {'ok' if rc == '0' else 'FAILED (exit ' + rc + ')'} "
                                                           f"in {s} s" for n, (rc, s) in status.items()) + ".", "",
       f"CUDA tests: `{last_line('tests')}`", ""]
bench = os.path.join(work, "bench.json")
if os.path.exists(bench):
    out += bench_table(json.load(open(bench)), card) + [""]
metrics = os.path.join(work, "run", "metrics.jsonl")
steps = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
tflops = [r["tflops_per_device"] for r in steps[5:] if r.get("tflops_per_device")]  # after warm-up/autotuning
if tflops:
    median, peak = statistics.median(tflops), peak_tflops(card)
    mfu = f"{100 * median / peak:.1f}% of {peak:g} TFLOP/s" if peak else "unknown (card not in the peak table)"
    out.append(f"gopher_417m, bf16, 16 x 2048 tokens per step, {len(steps)} steps: median "
               f"{median:.1f} TFLOP/s per device over steps 6-{len(steps)}, MFU {mfu}.")
else:
    out.append(f"gopher_417m training gave no throughput: `{last_line('train')}`")
out.append(END)

text = open(path).read()
if BEGIN in text and END in text:
    text = text[:text.index(BEGIN)] + "\n".join(out) + text[text.index(END) + len(END):]
else:
    text = text.rstrip("\n") + "\n\n" + "\n".join(out) + "\n"
open(path, "w").write(text)
print("\n".join(out))
sys.exit(1 if failed else 0)
EOF
