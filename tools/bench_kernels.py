#!/usr/bin/env python
"""Microbenchmarks of megagopher's Triton kernels against their PyTorch (and other) baselines.

On a CUDA GPU: measures the card's copy bandwidth, then times forward, backward and forward+backward of
each kernel and of each baseline (tools/bench_kernels_cases.py: SDPA with each backend pinned, eager
PyTorch, torch.compile, Liger-Kernel and apex where importable) with triton.testing.do_bench (median), in
priority order within --budget seconds, and prints one table: TFLOP/s for attention and GB/s for the
memory-bound kernels, each with its fraction of the card's peak FLOP/s or of the measured copy bandwidth
(tools/bench_kernels_timing.py). --json writes the rows as they come, so a run cut short keeps them.

Without a GPU: says so, re-runs itself under the Triton interpreter (TRITON_INTERPRET=1 must be set before
triton is imported) and instead checks every kernel's forward and backward on small shapes against the
float64 reference, printing a pass/fail table. --compile-check then also compiles every kernel launch
it saw (with each GPU autotune config) for sm_80 and sm_90, which needs no GPU.

    python tools/bench_kernels.py [--kernel NAME] [--dtype bf16|fp16|fp32] [--json FILE] [--budget SECONDS]
                                  [--interpreter-check] [--compile-check]
"""
import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling bench_kernels_* modules

# the keys of bench_kernels_cases.BUILDERS, here so that --help needs no torch import
KERNELS = ("attention", "softmax", "rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "rope", "swiglu",
           "cross_entropy")
DTYPES = ("bf16", "fp16", "fp32")
# Tolerances of the CPU check, as in the tests: |got - want| <= atol + rtol |want| against float64.
TOL = {"fp32": (1e-5, 1e-5), "fp16": (5e-3, 5e-3), "bf16": (4e-2, 2e-2)}
ARG_NAMES = {"flash_attention": ("q", "k", "v"), "scaled_masked_softmax": ("x",), "rms_norm": ("x", "weight"),
             "layer_norm": ("x", "weight", "bias"), "add_rms_norm": ("x", "residual", "weight"),
             "add_layer_norm": ("x", "residual", "weight", "bias"), "apply_rope": ("x", "cos", "sin"),
             "swiglu": ("gate", "up"), "cross_entropy": ("logits", "labels")}
GPU_COLUMNS = ["kernel", "shape", "dtype", "impl", "direction", "ms", "TFLOP/s", "GB/s", "of_peak", "triton_speedup",
               "note"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=KERNELS, help="only this kernel (default: all)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="input dtype (default bf16)")
    p.add_argument("--json", metavar="FILE", help="also write the table as a JSON list of rows")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="on a GPU: start no new measurement after this many seconds (highest priority first)")
    p.add_argument("--interpreter-check", action="store_true",
                   help="run the CPU correctness check under the interpreter even where there is a GPU")
    p.add_argument("--compile-check", action="store_true",
                   help="without a GPU: also compile each kernel for sm_80/sm_90 with every autotune config")
    p.add_argument("--compile-from", metavar="FILE", help=argparse.SUPPRESS)  # internal: the compile step
    return p.parse_args(argv)


def print_table(rows, columns):
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def selected_cases(args, device, small):
    """(kernel, Case) for every case of --kernel (default: all kernels) at --dtype."""
    import bench_kernels_cases
    from megagopher.common import PRECISION_DTYPES
    dtype = PRECISION_DTYPES[args.dtype]
    for kernel in ([args.kernel] if args.kernel else KERNELS):
        for case in bench_kernels_cases.cases(kernel, dtype, device, small):
            yield kernel, case


def cpu_check(args):
    from megagopher.kernels.testing import compare
    rows = []
    for kernel, case in selected_cases(args, "cpu", small=True):
        for c in compare(case.op, case.args, case.kwargs, case.grad_args, names=ARG_NAMES[case.op],
                         tol=TOL[args.dtype]):
            rows.append(dict(kernel=kernel, shape=case.label, dtype=args.dtype,
                             check="fwd " + c.name if c.name.startswith("out") else "bwd " + c.name.split()[-1],
                             max_abs_err=f"{c.max_abs_err:.2e}", worst_over_tol=f"{c.worst:.3f}",
                             result="pass" if c.ok else "FAIL"))
    return rows


def gpu_bench(args, device="cuda"):
    """The timing table: the copy-bandwidth row first, then every (case, implementation, direction)."""
    import torch
    import bench_kernels_timing as timing
    from megagopher.training.metrics import peak_tflops
    card = torch.cuda.get_device_name(0)
    copy_gbps, copy_ms, copy_bytes = timing.copy_bandwidth(device)
    peak = peak_tflops(card)
    print(f"{card}: copy bandwidth {copy_gbps:.0f} GB/s (measured: the memory-bound kernels' 100%), peak "
          f"{peak if peak else 'unknown'} TFLOP/s dense bf16 (attention's 100%)", flush=True)
    copy_row = dict(kernel="copy", shape=f"{copy_bytes / 2**30:g} GiB", dtype="-", impl="torch copy_", direction="fwd",
                    ms=round(copy_ms, 4), of_peak=1.0, card=card, peak_tflops=peak,
                    note="device-to-device copy: the memory-bound ceiling", **{"GB/s": round(copy_gbps, 1)})
    cases = [case for _, case in selected_cases(args, device, small=False)]

    def table(results):
        return [copy_row] + timing.rows(cases, results, args.dtype, peak, copy_gbps)

    def write(results):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(table(results), f, indent=1)
    results, skipped = timing.run_units(cases, args.budget, write)
    write(results)
    if skipped:
        print(f"--budget {args.budget:g} s spent: {skipped} measurements (the lowest priority) not taken", flush=True)
    return table(results)


class Recorder:
    """Records every kernel launch the interpreter runs (kernel, argument types, constexprs, launch
    options) so that compile_recorded can compile the same launches for real GPUs."""

    def __init__(self):
        from triton.runtime.interpreter import InterpretedFunction
        self.launches = {}
        real_run = InterpretedFunction.run

        def run(fn_self, *args, grid, warmup, **kwargs):
            self.record(fn_self.fn, fn_self.arg_names, args, kwargs)
            return real_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
        InterpretedFunction.run = run

    def record(self, fn, arg_names, args, kwargs):
        import torch
        from megagopher.common import dtype_name
        values = dict(zip(arg_names, args), **kwargs)
        desc = {k: ["tensor", dtype_name(v.dtype)] if torch.is_tensor(v) else [type(v).__name__, v]
                for k, v in values.items()}
        entry = dict(module=fn.__module__, name=fn.__name__, args=desc)
        self.launches[json.dumps(entry, sort_keys=True, default=str)] = entry

    def compile_all(self):
        import subprocess
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(list(self.launches.values()), f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print(f"\nCompiling the {len(self.launches)} distinct launches (and attention at head dim 256, softmax "
              "and cross entropy at the GPU's block, the vocab-parallel statistics) for sm_80 and sm_90, autotuned kernels with every GPU config "
              "...", flush=True)
        return subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-from", f.name], env=env).returncode


_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "uint8": "*u8", "int64": "*i64",
        "int32": "*i32", "bool": "*i1"}
_SMEM = {80: 166912, 90: 232448}  # bytes of shared memory a block may use on A100 / H100


def _compile_one(job):
    """Compile one launch for one arch and config; returns (shared memory bytes, None) or (None, error)."""
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    entry, values, arch = job
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
    jit_fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature, constexprs = {}, {}
    try:
        for p in jit_fn.params:
            kind, value = entry["args"][p.name][0], values.get(p.name)
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif kind == "tensor":
                signature[p.name] = _PTR[entry["args"][p.name][1]]
            else:
                signature[p.name] = {"float": "fp32", "bool": "i1"}.get(kind, "i32" if abs(value) < 2**31 else "i64")
        options = {k: values[k] for k in ("num_warps", "num_stages") if values.get(k) is not None}
        compiled = triton.compile(triton.compiler.ASTSource(jit_fn, signature, constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        return compiled.metadata.shared, None
    except Exception as e:  # a compile error is a finding: report it, go on
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"


def compile_recorded(path):
    """Compile (to PTX and cubin, no GPU needed) each recorded launch for sm_80 and sm_90, every autotune
    config of the autotuned kernels, and check the shared memory each needs. The attention launches are
    also compiled at head dim 256, the largest (and most memory-hungry) the kernels take."""
    import importlib
    from concurrent.futures import ProcessPoolExecutor
    import triton
    entries = []
    for entry in json.load(open(path)):
        recorded = {k: v[1] for k, v in entry["args"].items() if v[0] != "tensor"}
        if recorded.get("DOT_FP32"):  # the interpreter's bf16 workaround; a GPU takes bf16 in tl.dot
            recorded.update(DOT_FP32=False, PRECISION="tf32")
        entries.append((entry, recorded))
        if "HEAD_DIM" in recorded and recorded["HEAD_DIM"] != 256:
            wide = dict(recorded, HEAD_DIM=256)
            if entry["name"] == "_bwd_delta_kernel":
                from megagopher.kernels.attention_bwd import delta_launch
                wide.update(delta_launch(256))  # as the backward launches it at d = 256
            entries.append((entry, wide))
        if entry["name"] in ("_softmax_fwd_kernel", "_softmax_bwd_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel"):
            entries.append((entry, dict(recorded, BLOCK=4096, num_warps=8)))  # the GPU's block, not the interpreter's
        if entry["name"] == "_ce_fwd_kernel":  # the vocab-parallel local statistics
            entries.append((entry, dict(recorded, LOCAL_STATS=True, BLOCK=4096, num_warps=8)))
    unique = {}
    for entry, recorded in entries:  # launches that differ only in runtime integers compile the same
        kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
        params = (kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel).params
        key = [entry["name"], [(p.name, recorded[p.name] if p.is_constexpr else entry["args"][p.name][0])
                               for p in params], recorded.get("num_warps"),
               [v for v in entry["args"].values() if v[0] == "tensor"]]
        unique.setdefault(json.dumps(key, default=str), (entry, recorded))
    entries = list(unique.values())
    jobs, owners, constexpr_names = [], [], []
    for i, (entry, recorded) in enumerate(entries):
        kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
        autotuned = isinstance(kernel, triton.runtime.Autotuner)
        configs = [dict(c.all_kwargs()) for c in kernel.configs] if autotuned else [{}]
        constexpr_names.append([p.name for p in (kernel.fn if autotuned else kernel).params if p.is_constexpr
                                and p.name not in ("DOT_FP32", "PRECISION") and p.name not in configs[0]])
        for arch in _SMEM:
            for config in configs:
                jobs.append((entry, dict(recorded, **config), arch))
                owners.append((i, arch, bool(config)))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(_compile_one, jobs))
    rows, failed = [], 0
    for i, (entry, recorded) in enumerate(entries):
        mine = [(arch, autotuned, res) for (j, arch, autotuned), res in zip(owners, results) if j == i]
        errors = [f"sm_{arch}: {err}" for arch, _, (_, err) in mine if err]
        fits = {arch: sum(1 for a, _, (smem, _) in mine if a == arch and smem is not None and smem <= _SMEM[arch])
                for arch in _SMEM}
        if not errors and not all(fits.values()):
            errors.append("no config fits in shared memory on " + ", ".join(f"sm_{a}" for a, n in fits.items() if not n))
        consts = " ".join(f"{k}={recorded[k]}" for k in constexpr_names[i])
        rows.append(dict(kernel=entry["name"], constexprs=consts, configs=len(mine) // len(_SMEM),
                         fit_sm80=fits[80], fit_sm90=fits[90], result="ok" if not errors else "FAIL: " + errors[0]))
        failed += bool(errors)
    print_table(rows, ["kernel", "constexprs", "configs", "fit_sm80", "fit_sm90", "result"])
    print(f"{len(rows) - failed} launches compile for sm_80 and sm_90 (PTX and cubin), {failed} fail")
    return 1 if failed else 0


def main():
    args = parse_args()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice, not ours
    if args.compile_from:
        return compile_recorded(args.compile_from)
    import torch
    recorder = None
    timed = torch.cuda.is_available() and not args.interpreter_check
    if timed:
        import bench_kernels_timing as timing
        rows = gpu_bench(args)
        print_table([timing.display(r) for r in rows], GPU_COLUMNS)
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(("No CUDA GPU here: no timings. " if not torch.cuda.is_available() else "") +
                  "Re-running under the Triton interpreter (TRITON_INTERPRET=1) to check each kernel's forward "
                  "and backward against the float64 reference.", flush=True)
            env = dict(os.environ, TRITON_INTERPRET="1")
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)
        recorder = Recorder() if args.compile_check else None
        rows = cpu_check(args)
        print_table(rows, ["kernel", "shape", "dtype", "check", "max_abs_err", "worst_over_tol", "result"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    failed = sum(r.get("result") == "FAIL" for r in rows)
    if timed:
        print(f"{len(rows)} rows; {failed} Triton kernel launches failed")
    else:
        print(f"{len(rows) - failed} passed, {failed} failed (tolerance per dtype: atol, rtol = {TOL[args.dtype]})")
    if recorder is not None:
        failed += recorder.compile_all()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
