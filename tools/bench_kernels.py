#!/usr/bin/env python
"""Microbenchmarks of megagopher's Triton kernels against their PyTorch baselines.

On a CUDA GPU: times forward, backward and forward+backward of each kernel and of its baseline
(F.scaled_dot_product_attention, torch.softmax, F.rms_norm / F.layer_norm, plain torch for RoPE and
SwiGLU, F.cross_entropy) with triton.testing.do_bench (median), and prints one table with TFLOP/s for
attention and GB/s for the memory-bound kernels.

Without a GPU: says so, re-runs itself under the Triton interpreter (TRITON_INTERPRET=1 must be set before
triton is imported) and instead checks every kernel's forward and backward on small shapes against the
float64 reference, printing a pass/fail table. --compile-check then also compiles every kernel launch
it saw (with each GPU autotune config) for sm_80 and sm_90, which needs no GPU.

    python tools/bench_kernels.py [--kernel NAME] [--dtype bf16|fp16|fp32] [--json FILE]
                                  [--interpreter-check] [--compile-check]
"""
import argparse
import json
import os
import sys
import warnings

KERNELS = ("attention", "softmax", "rms_norm", "layer_norm", "rope", "swiglu", "cross_entropy")
DTYPES = ("bf16", "fp16", "fp32")
# Tolerances of the CPU check, as in the tests: |got - want| <= atol + rtol |want| against float64.
TOL = {"fp32": (1e-5, 1e-5), "fp16": (5e-3, 5e-3), "bf16": (4e-2, 2e-2)}
ARG_NAMES = {"flash_attention": ("q", "k", "v"), "scaled_masked_softmax": ("x",), "rms_norm": ("x", "weight"),
             "layer_norm": ("x", "weight", "bias"), "apply_rope": ("x", "cos", "sin"), "swiglu": ("gate", "up"),
             "cross_entropy": ("logits", "labels")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=KERNELS, help="only this kernel (default: all)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="input dtype (default bf16)")
    p.add_argument("--json", metavar="FILE", help="also write the table as a JSON list of rows")
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


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _attention_cases(kernel, small, rnd, g, device):
    import torch.nn.functional as F
    shapes = [(1, 129, 4, 2, 32, True), (1, 70, 2, 2, 64, False)] if small else \
        [(4, 2048, 16, 16, 128, True), (4, 2048, 16, 16, 128, False), (4, 2048, 32, 8, 128, True),
         (2, 4096, 16, 16, 64, True)]
    out = []
    for b, s, h, hkv, d, causal in shapes:
        q, k, v = rnd(b, s, h, d), rnd(b, s, hkv, d), rnd(b, s, hkv, d)
        base = lambda q, k, v, causal=causal, gqa=h != hkv: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            enable_gqa=gqa).transpose(1, 2)
        flops = 4 * b * h * s * s * d // (2 if causal else 1)
        out.append((f"b{b} s{s} h{h}/{hkv} d{d}{' causal' if causal else ''}", "flash_attention", (q, k, v),
                    dict(causal=causal), (0, 1, 2), base, ("flops", flops)))
    return out


def _softmax_cases(kernel, small, rnd, g, device):
    import torch
    shapes = [((1, 2, 5, 257), True), ((2, 2, 33, 33), False)] if small else \
        [((4, 16, 2048, 2048), True), ((4, 16, 2048, 2048), False), ((2, 8, 1024, 8192), False)]
    out = []
    for shape, causal in shapes:
        x = rnd(*shape, scale=3.0)
        mask = None if causal else (torch.rand(shape[0], 1, *shape[2:], generator=g) < 0.2).to(device)
        tri = torch.ones(shape[-2:], dtype=torch.bool, device=device).triu(1)
        base = lambda x, mask=mask, causal=causal, tri=tri: torch.softmax(
            (x * 0.125).masked_fill(tri if causal else mask, float("-inf")), -1, dtype=torch.float32).to(x.dtype)
        byt = _nbytes(x) * 2 + (0 if mask is None else mask.numel())
        out.append((f"{shape}{' causal' if causal else ' mask'}", "scaled_masked_softmax", (x,),
                    dict(mask=mask, scale=0.125, causal=causal), (0,), base, ("bytes", byt, _nbytes(x) * 3)))
    return out


def _norm_cases(kernel, small, rnd, g, device):
    import torch.nn.functional as F
    out = []
    for m, n in ([(51, 96), (3, 1000)] if small else [(8192, 4096), (16384, 8192), (4096, 16384)]):
        x, w, bias = rnd(m, n), rnd(n, scale=0.1) + 1, rnd(n)
        if kernel == "rms_norm":
            args, base = (x, w), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-5)
        else:
            args, base = (x, w, bias), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
        fwd = _nbytes(x) * 2 + _nbytes(*args[1:])
        out.append((f"{m}x{n}", kernel, args, dict(eps=1e-5), tuple(range(len(args))), base,
                    ("bytes", fwd, _nbytes(x) * 3 + 2 * _nbytes(*args[1:]))))
    return out


def _rope_cases(kernel, small, rnd, g, device):
    import torch
    from megagopher.kernels import reference
    out = []
    for b, s, h, d, half in ([(2, 17, 4, 64, 16)] if small else [(4, 2048, 32, 128, 64), (4, 2048, 32, 128, 16)]):
        x = rnd(b, s, h, d)
        ang = torch.rand(s, half, generator=g).to(device) * s
        out.append((f"b{b} s{s} h{h} d{d} rot{2 * half}", "apply_rope", (x, ang.cos(), ang.sin()), {}, (0,),
                    reference.apply_rope, ("bytes", _nbytes(x) * 2, _nbytes(x) * 2)))
    return out


def _swiglu_cases(kernel, small, rnd, g, device):
    import torch.nn.functional as F
    out = []
    for shape in ([(3, 17, 100)] if small else [(8192, 11008), (16384, 14336)]):
        gate, up = rnd(*shape, scale=3.0), rnd(*shape)
        out.append(("x".join(map(str, shape)), "swiglu", (gate, up), {}, (0, 1), lambda a, b: F.silu(a) * b,
                    ("bytes", _nbytes(gate) * 3, _nbytes(gate) * 5)))
    return out


def _cross_entropy_cases(kernel, small, rnd, g, device):
    import torch
    import torch.nn.functional as F
    out = []
    for m, v in ([(17, 300), (3, 1000)] if small else [(8192, 50304), (4096, 128256)]):
        logits = rnd(m, v, scale=3.0)
        labels = torch.randint(0, v, (m,), generator=g).to(device)
        base = lambda x, y: F.cross_entropy(x.float(), y, reduction="none")
        out.append((f"{m}x{v}", "cross_entropy", (logits, labels), {}, (0,), base,
                    ("bytes", _nbytes(logits), _nbytes(logits) * 2)))
    return out


_CASES = {"attention": _attention_cases, "softmax": _softmax_cases, "rms_norm": _norm_cases,
          "layer_norm": _norm_cases, "rope": _rope_cases, "swiglu": _swiglu_cases,
          "cross_entropy": _cross_entropy_cases}


def cases(kernel, dtype, device, small):
    """(label, op, args, kwargs, grad arg indices, baseline fn or None, work) for one kernel; work is
    ("flops", forward FLOPs) or ("bytes", forward bytes, backward bytes). Inputs are drawn from one
    generator seeded 0 per kernel, in the order the kernel's case builder asks for them."""
    import torch
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(dt).to(device)

    return _CASES[kernel](kernel, small, rnd, g, device)


def selected_cases(args, device, small):
    """(kernel, case) for every case of --kernel (default: all kernels) at --dtype."""
    from megagopher.common import PRECISION_DTYPES
    dtype = PRECISION_DTYPES[args.dtype]
    for kernel in ([args.kernel] if args.kernel else KERNELS):
        for case in cases(kernel, dtype, device, small):
            yield kernel, case


def cpu_check(args):
    from megagopher.kernels.testing import compare
    rows = []
    for kernel, (label, op, inputs, kwargs, grad_args, _, _) in selected_cases(args, "cpu", small=True):
        for c in compare(op, inputs, kwargs, grad_args, names=ARG_NAMES[op], tol=TOL[args.dtype]):
            rows.append(dict(kernel=kernel, shape=label, dtype=args.dtype,
                             check="fwd " + c.name if c.name == "out" else "bwd " + c.name.split()[-1],
                             max_abs_err=f"{c.max_abs_err:.2e}", worst_over_tol=f"{c.worst:.3f}",
                             result="pass" if c.ok else "FAIL"))
    return rows


def gpu_bench(args):
    import torch
    from triton.testing import do_bench
    from megagopher import kernels
    rows = []
    for kernel, (label, op, inputs, kwargs, grad_args, base, work) in selected_cases(args, "cuda", small=False):
        ours = lambda *a: getattr(kernels, op)(*a, **kwargs, backend="triton")
        for name, fn in (("triton", ours), ("torch", base)):
            leaves = [t.detach().requires_grad_(i in grad_args) if torch.is_tensor(t) else t
                      for i, t in enumerate(inputs)]
            params = [leaves[i] for i in grad_args]
            out = fn(*leaves)
            dy = torch.randn_like(out)
            times = {"fwd": do_bench(lambda: fn(*leaves), return_mode="median"),
                     "bwd": do_bench(lambda: out.backward(dy, retain_graph=True), grad_to_none=params,
                                     return_mode="median"),
                     "fwd+bwd": do_bench(lambda: fn(*leaves).backward(dy), grad_to_none=params,
                                         return_mode="median")}
            if name == "triton":
                ours_times = times
        for direction in ("fwd", "bwd", "fwd+bwd"):
            ms = ours_times[direction]
            row = dict(kernel=kernel, shape=label, dtype=args.dtype, direction=direction, ms=f"{ms:.3f}")
            if work[0] == "flops":  # FlashAttention-2's convention: backward = 2.5 x forward FLOPs
                flops = work[1] * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[direction]
                row["TFLOP/s"] = f"{flops / ms / 1e9:.1f}"
            else:
                byt = {"fwd": work[1], "bwd": work[2], "fwd+bwd": work[1] + work[2]}[direction]
                row["GB/s"] = f"{byt / ms / 1e6:.0f}"
            row["baseline_ms"] = f"{times[direction]:.3f}"
            row["speedup"] = f"{times[direction] / ms:.2f}x"
            rows.append(row)
    return rows


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
        values = dict(zip(arg_names, args), **kwargs)
        desc = {k: ["tensor", str(v.dtype).replace("torch.", "")] if torch.is_tensor(v) else [type(v).__name__, v]
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
                wide["BLOCK_M"] = 8192 // 256  # as attention._backward sizes it
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
    if torch.cuda.is_available() and not args.interpreter_check:
        rows = gpu_bench(args)
        columns = ["kernel", "shape", "dtype", "direction", "ms", "TFLOP/s", "GB/s", "baseline_ms", "speedup"]
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(("No CUDA GPU here: no timings. " if not torch.cuda.is_available() else "") +
                  "Re-running under the Triton interpreter (TRITON_INTERPRET=1) to check each kernel's forward "
                  "and backward against the float64 reference.", flush=True)
            env = dict(os.environ, TRITON_INTERPRET="1")
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)
        recorder = Recorder() if args.compile_check else None
        rows = cpu_check(args)
        columns = ["kernel", "shape", "dtype", "check", "max_abs_err", "worst_over_tol", "result"]
    print_table(rows, columns)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = sum(r.get("result") == "FAIL" for r in rows)
    if "result" in columns:
        print(f"{len(rows) - failed} passed, {failed} failed (tolerance per dtype: atol, rtol = {TOL[args.dtype]})")
    if recorder is not None:
        failed += recorder.compile_all()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
