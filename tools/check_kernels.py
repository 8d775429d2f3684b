"""Compile every megagopher Triton kernel for Hopper (sm_90a) and, where the installed Triton can,
Blackwell (sm_100a), with no GPU, and check each autotune configuration's registers, spills and shared memory.

    python tools/check_kernels.py            # full sweep: bf16, fp16; head dims 64, 80, 128, 256 and MLA's
                                             # 192/128 (queries and keys / values); causal or not
    python tools/check_kernels.py --quick    # every kernel once per arch: its largest tile, bf16 (the CI test)
    python tools/check_kernels.py --kernels _grouped_fwd_kernel,norms --arch 100 --dtype bf16   # a narrower sweep

One line per compilation: kernel, arch, dtype, the shape constexprs, the launch config, registers, spill
bytes, shared memory and the matrix instructions the PTX uses (wgmma on Hopper, tcgen05 on Blackwell, mma
for the older warp-level ones). The autotuned kernels are compiled under every configuration in their
``.configs`` that its ``early_config_prune`` (if any) leaves for the shape being compiled, i.e. at every head
dim where the autotuner may pick it, so a configuration added to a list is checked without touching this tool;
the other kernels under the launch parameters their wrappers pick on a GPU, read from the functions that pick
them (norms.gpu_launches, softmax.gpu_launches, attention_bwd.delta_launch), so that this tool and the wrappers
cannot drift apart. --quick keeps, per kernel, the compilation with the largest tile (head dim 128, causal,
bf16: where registers run out first) and compiles it for both archs, so that every kernel, not only attention,
is checked in CI in well under a minute. Exit status 1 when any compilation fails, spills or needs more shared
memory than a block may have (227 KB on H100/H200 and B200), whether the autotuner may pick it or a wrapper
always launches it, or when a kernel of the package has no spec here. Resource figures come from the cubin
(cuobjdump) and, for spills, ptxas -v.
"""
import argparse
import importlib
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 and sm_100
NOT_KERNELS = ("testing", "apex_ops")  # modules of the package that define no Triton kernel (apex_ops needs apex)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Kernel arguments named in upper case are pointers, except these sizes.
_INT_NAMES = {"H", "H_KV", "GROUP", "HEADS_PER_PROGRAM", "SEQ_Q", "SEQ_K", "M", "N", "ROWS", "SEQ", "D", "HALF",
              "N_REAL"}
_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "i64": "*i64", "u8": "*u8", "i32ptr": "*i32"}


def _kernel(module, name):
    return getattr(importlib.import_module(f"megagopher.kernels.{module}"), name)


# Per kernel: its module, the pointer arguments that are not in the data dtype ("fp32", "i64", "u8"; "i32" for
# an upper-case scalar; "desc:BLOCK_M" for a tensor descriptor whose block spans BLOCK_M rows), the float
# scalars, and the constexpr sets to compile (the shape-dependent ones; autotuned kernels add their configs).
# Every other argument is an int32. Sizes are those the wrappers pick on a GPU for training shapes: norms 4096
# to 16384 wide (norms.gpu_launches), softmax rows of 4096 and 8192 keys (softmax.gpu_launches), the delta
# kernel at each head dim (attention_bwd.delta_launch), 4096-logit blocks, head dim 128 RoPE.
def _attention_sets(head_dims):
    """Per head dim, d or (d of queries and keys, d_v of values) (padded to a power of two, as the wrapper
    does): causal and not, and causal packed documents (the document-bound loads of VARLEN; a window is a
    runtime argument and compiles the same)."""
    sets = []
    tma_max = _kernel("attention_tiles", "TMA_MAX_HEAD_DIM")
    for d, dv in (dims if isinstance(dims, tuple) else (dims, dims) for dims in head_dims):
        for causal, varlen in ((True, False), (False, False), (True, True)):
            head_dim, head_dim_v = triton.next_power_of_2(d), triton.next_power_of_2(dv)
            sets.append(dict(HEAD_DIM=head_dim, D=d, HEAD_DIM_V=head_dim_v, DV=dv, CAUSAL=causal, VARLEN=varlen,
                             DOT_FP32=False, PRECISION="tf32", TMA=max(head_dim, head_dim_v) <= tma_max))
    return sets


def specs(head_dims):
    attn_ptr = {"LSE": "fp32", "DELTA": "fp32", "DOC_START": "i32ptr", "DOC_END": "i32ptr", "Q_START": "i32ptr",
                "Q_END": "i32ptr"}
    norm_ptr = {"MEAN": "fp32", "RSTD": "fp32", "DW_PARTIAL": "fp32", "DB_PARTIAL": "fp32", "ROW_C": "fp32"}
    ce_ptr = {n: "fp32" for n in ("LOSS", "LSE", "MAX", "SUMEXP", "TARGET", "SUMX", "DLOSS")}
    ce_ptr.update(LABELS="i64", V="i32")  # V is the vocabulary size here, not a pointer
    # The attention kernels read Q, K, V and dO through tensor descriptors of a config's block rows and the
    # padded head dim of queries and keys (HEAD_DIM) or values (HEAD_DIM_V).
    blocks = _kernel("attention_tiles", "DESCRIPTOR_BLOCKS")
    attn_desc = dict(attn_ptr, **{name: f"desc:{rows}:{width}" for name, (rows, width) in blocks.items()})
    launches = [launch for n in (4096, 8192, 16384) for rms in (True, False) for fused in (False, True)
                for launch in _kernel("norms", "gpu_launches")(n, rms, fused)]
    norm_sets = {}  # plain and residual-fused norms 4096 to 16384 wide, as their wrappers launch them (deduplicated)
    for name, consts in launches:
        norm_sets.setdefault(name, {})[tuple(sorted(consts.items()))] = consts
    softmax_sets = {}  # rows of 4096 keys (one block) and 8192 (the looping passes), as the wrappers launch them
    for name, consts in (launch for sk in (4096, 8192) for launch in _kernel("softmax", "gpu_launches")(sk)):
        softmax_sets.setdefault(name, {})[tuple(sorted(consts.items()))] = consts
    delta_launch = _kernel("attention_bwd", "delta_launch")
    return [
        ("attention", "_fwd_kernel", attn_desc, ("qk_scale",), _attention_sets(head_dims)),
        ("attention_bwd", "_bwd_dkdv_kernel", attn_desc, ("sm_scale", "qk_scale"), _attention_sets(head_dims)),
        ("attention_bwd", "_bwd_dq_kernel", attn_desc, ("sm_scale", "qk_scale"), _attention_sets(head_dims)),
        ("attention_bwd", "_bwd_delta_kernel", attn_ptr, (),
         [dict(HEAD_DIM=p, D=d, **delta_launch(p)) for d, p in  # o and dO have the values' head dim
          ((d, triton.next_power_of_2(d)) for d in dict.fromkeys(h[1] if isinstance(h, tuple) else h
                                                                  for h in head_dims))]),
        ("norms", "_norm_fwd_kernel", norm_ptr, ("eps",), list(norm_sets["_norm_fwd_kernel"].values())),
        ("norms", "_norm_bwd_rows_kernel", norm_ptr, (), list(norm_sets["_norm_bwd_rows_kernel"].values())),
        ("norms", "_norm_bwd_kernel", norm_ptr, (), list(norm_sets["_norm_bwd_kernel"].values())),
        ("softmax", "_softmax_fwd_kernel", {"MASK": "u8"}, ("scale",),
         [dict(HAS_MASK=m, CAUSAL=not m, **launch) for m in (True, False)
          for launch in softmax_sets["_softmax_fwd_kernel"].values()]),
        ("softmax", "_softmax_bwd_kernel", {}, ("scale",), list(softmax_sets["_softmax_bwd_kernel"].values())),
        ("rope", "_rope_kernel", {"COS": "fp32", "SIN": "fp32"}, (),
         [dict(INVERSE=inv, COPY_REST=False, BLOCK_R=32, BLOCK_HALF=64, BLOCK_REST=1) for inv in (False, True)]),
        ("fused_swiglu", "_swiglu_fwd_kernel", {}, (), [dict(BLOCK=_kernel("fused_swiglu", "BLOCK"))]),
        ("fused_swiglu", "_swiglu_bwd_kernel", {}, (), [dict(BLOCK=_kernel("fused_swiglu", "BLOCK"))]),
        ("fused_cross_entropy", "_ce_fwd_kernel", ce_ptr, (),
         [dict(LOCAL_STATS=ls, BLOCK=4096, num_warps=8) for ls in (False, True)]),
        ("fused_cross_entropy", "_ce_bwd_kernel", ce_ptr, ("target_weight", "uniform_weight", "z_coef"),
         [dict(BLOCK=4096, num_warps=8)]),
        ("fused_cross_entropy", "_ce_scale_kernel", ce_ptr, (), [dict(BLOCK=4096, num_warps=8)]),
        # The MoE experts' grouped GEMM (autotuned: every config compiles); OFFS are int32 row offsets.
        ("grouped_gemm", "_grouped_fwd_kernel", {"OFFS": "i32ptr"}, (), [dict(DOT_FP32=False, PRECISION="tf32")]),
        ("grouped_gemm", "_grouped_dw_kernel", {"OFFS": "i32ptr"}, (), [dict(DOT_FP32=False, PRECISION="tf32")]),
    ]


def package_kernels():
    """(module, name) of every kernel a wrapper launches in megagopher.kernels: the triton.autotune'd ones and
    the @triton.jit functions named ``*_kernel`` (the others are device functions, inlined into a kernel)."""
    package = importlib.import_module("megagopher.kernels")
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in NOT_KERNELS:
            continue
        for name, obj in vars(importlib.import_module(f"megagopher.kernels.{info.name}")).items():
            launched = isinstance(obj, triton.runtime.Autotuner) or (
                isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"))
            jit = obj.fn if isinstance(obj, triton.runtime.Autotuner) else obj
            if launched and jit.fn.__module__ == f"megagopher.kernels.{info.name}":  # defined here, not imported
                found.append((info.name, name))
    return found


def archs():
    """Hopper always; Blackwell when this Triton has the ptxas that targets it."""
    return [90, 100] if os.path.exists(os.path.join(_BIN, "ptxas-blackwell")) else [90]


def _resources(cubin, ptx, arch):
    """(registers, spill bytes) of the one kernel in cubin. The stack frame is read from the cubin; only when
    there is one (in Triton code it holds spills alone) ptxas -v is run again to count the spilled bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        stack = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
        if not stack:
            return regs, 0
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(ptx)
        ptxas = os.path.join(_BIN, "ptxas" if arch < 100 else "ptxas-blackwell")
        log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", os.path.join(tmp, "k.ptx"),
                              "-o", os.path.join(tmp, "v.cubin")], capture_output=True, text=True).stderr
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
        return regs, spills or stack


def _mma(ptx):
    kinds = [k for k, pattern in (("wgmma", "wgmma."), ("tcgen05", "tcgen05.mma"), ("mma", "mma.sync"))
             if pattern in ptx]
    return "+".join(kinds) or "none"


def compile_one(job):
    """Compile one (kernel, arch, dtype, constexprs + config); returns the result row."""
    module, name, ptr, floats, consts, config, arch, dtype = job
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    kernel = _kernel(module, name)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    values = dict(consts, **config)
    options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
    signature, constexprs = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", values[p.name]
        elif ptr.get(p.name) == "i32":
            signature[p.name] = "i32"
        elif ptr.get(p.name, "").startswith("desc:") and values["TMA"]:  # (b, s, h, d), block [1, rows, 1, d]
            rows, width = (values[n] for n in ptr[p.name].split(":")[1:])
            signature[p.name] = f"tensordesc<{dtype}[1, {rows}, 1, {width}]>"
        elif p.name in ptr and ptr[p.name].startswith("desc:"):  # the same argument as a pointer, without TMA
            signature[p.name] = _PTR[dtype]
        elif p.name in ptr or (p.name.isupper() and p.name not in _INT_NAMES):
            signature[p.name] = _PTR[ptr.get(p.name, dtype)]
        else:
            signature[p.name] = "fp32" if p.name in floats else "i32"
    shown = {k: v for k, v in values.items() if k not in ("DOT_FP32", "PRECISION")}
    config_text = " ".join(f"{k}={v}" for k, v in shown.items()) + "".join(f" {k}={v}" for k, v in options.items())
    row = dict(kernel=name, arch=f"sm_{arch}a", dtype=dtype, config=config_text)
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        regs, spills = _resources(compiled.asm["cubin"], compiled.asm["ptx"], arch)
        row.update(regs=regs, spills=spills, smem=compiled.metadata.shared, mma=_mma(compiled.asm["ptx"]))
    except Exception as e:  # a failed compilation is a finding: report it and go on
        cause = e
        while cause.__cause__ is not None:  # Triton wraps the failing line of each inlined call: show the innermost
            cause = cause.__cause__
        row.update(regs="-", spills="-", smem="-", mma="-", error=f"{type(cause).__name__}: {str(cause).strip()}")
    return row


def jobs(quick=False, only=None, arch=None, dtype=None):
    """Every compilation of the sweep, as (module, kernel, pointer types, float args, constexprs, config, arch,
    dtype). ``only``: kernel or module names to keep; ``arch`` / ``dtype``: lists overriding the sweep's. --quick:
    per kernel the one compilation with the largest tile at head dim 128, causal (bf16), for every arch."""
    head_dims, dtypes = ((128,), ("bf16",)) if quick else ((64, 80, 128, 256, (192, 128)), ("bf16", "fp16"))
    targets, dtypes = arch or archs(), dtype or dtypes
    out = []
    for module, name, ptr, floats, const_sets in specs(head_dims):
        if only and name not in only and module not in only:
            continue
        kernel = _kernel(module, name)
        pairs = [(consts, config) for consts in const_sets for config in pickable_configs(kernel, consts)]
        if quick:
            pairs = [max((p for p in pairs if p[0].get("CAUSAL") is not False and not p[0].get("VARLEN")),
                         key=_tile_size)]
        out += [(module, name, ptr, floats, consts, config, a, d)
                for consts, config in pairs for a in targets for d in dtypes]
    return out


def _tile_size(pair):
    """Elements in a launch's blocks (the product of its BLOCK_* sizes), then its stages and warps: the largest
    tile holds the most in registers and shared memory, so it is where a kernel spills first."""
    values = dict(pair[0], **pair[1])
    blocks = math.prod(v for k, v in values.items() if k.startswith("BLOCK") and isinstance(v, int))
    return blocks, values.get("num_stages", 0), values.get("num_warps", 0)


def pickable_configs(kernel, consts):
    """The launch configs to compile a kernel under for these constexprs: an autotuned kernel's configs that its
    early_config_prune keeps for them (all, without one), or the wrapper's fixed launch ({})."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [{}]
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, {}, **consts)
    return [dict(c.all_kwargs()) for c in configs]


def verdict(row):
    if "error" in row:
        return "FAIL compile: " + row["error"].splitlines()[0]
    if row["spills"]:  # a config the autotuner may pick, or a wrapper's fixed launch: either runs on a GPU
        return f"FAIL spills {row['spills']} bytes"
    if row["smem"] > SMEM_LIMIT:
        return f"FAIL shared memory {row['smem']} > {SMEM_LIMIT}"
    return "ok"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every kernel once per arch: its largest tile, bf16")
    p.add_argument("--kernels", default="", help="comma-separated kernel or module names to compile (default all)")
    p.add_argument("--arch", default="", help="comma-separated archs, e.g. 90,100 (default: all this Triton has)")
    p.add_argument("--dtype", default="", help="comma-separated dtypes, e.g. bf16 (default: the sweep's)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    covered = {name for _, name, *_ in specs((128,))}
    missing = [f"{m}.{n}" for m, n in package_kernels() if n not in covered]
    if missing:  # a kernel this tool does not know how to compile must not pass unchecked
        print(f"check_kernels: no spec for kernel(s) {', '.join(missing)}; add them to specs()")
        return 1
    split = lambda text: [t for t in text.split(",") if t]
    work = jobs(args.quick, set(split(args.kernels)), [int(a) for a in split(args.arch)], split(args.dtype))
    if not work:
        print(f"check_kernels: nothing to compile for --kernels={args.kernels!r} --arch={args.arch!r} "
              f"--dtype={args.dtype!r}; kernels: {', '.join(sorted(covered))}; archs: {archs()}; dtypes: bf16, fp16")
        return 1
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        rows = list(pool.map(compile_one, work))
    failed = 0
    for row in rows:
        result = verdict(row)
        failed += result.startswith("FAIL")
        print(f"{row['kernel']:<20} {row['arch']:<8} {row['dtype']:<5} {row['config']:<80} regs={row['regs']:<4} "
              f"spills={row['spills']:<5} smem={row['smem']:<7} mma={row['mma']:<10} {result}", flush=True)
    print(f"check_kernels: {len(rows)} compilations ({', '.join(sorted({r['arch'] for r in rows}))}), "
          f"{failed} fail")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
