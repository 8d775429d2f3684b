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
# Time limits per step add up to 7.5 minutes, leaving the rest of the 8 for start-up and the table.
step() {  # step NAME SECONDS CMD...: run CMD with a limit, keep its log and exit status for the table
    local name="$1" limit="$2"; shift 2
    echo "gpu_check: $name ..." >&2
    local start=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    echo "$? $((SECONDS - start))" >"$WORK/$name.status"
    tail -3 "$WORK/$name.log" >&2
}

step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py
step bench 210 "$PY" tools/bench_kernels.py --json "$WORK/bench.json"
# 30 steps of 16 sequences of 2048 tokens on synthetic data, nothing saved; MFU from the later steps.
step train 120 "$PY" -m megagopher.train --config examples/configs/gopher_417m.toml \
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
    rows = json.load(open(bench))
    cols = ["kernel", "shape", "dtype", "direction", "ms", "TFLOP/s", "GB/s", "baseline_ms", "speedup"]
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    out.append("")
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
