"""tools/check_kernels.py: every autotuned kernel, under every one of its configurations, compiles for sm_90a
without spills and within shared memory (no GPU needed). The test runs the tool's --quick sweep (bf16, head
dims 128 and 256, causal, sm_90a: the largest tiles, where spills appear first), each attention config at the
head dims its early_config_prune lets the autotuner pick it for; the full sweep is the tool's default and CI's
job."""
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_kernels.py")


def _tool():
    spec = importlib.util.spec_from_file_location("check_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_configs():
    """{kernel name: [(min, max) head dim of each GPU autotune config]}, read in a process without the
    interpreter (which replaces the configs by its single small one); (0, 999) for a config without limits."""
    code = ("import triton\nfrom megagopher.kernels import attention, attention_bwd, norms, softmax, rope, "
            "fused_swiglu, fused_cross_entropy as ce\n"
            "for m in (attention, attention_bwd, norms, softmax, rope, fused_swiglu, ce):\n"
            "    for n, o in vars(m).items():\n"
            "        if isinstance(o, triton.runtime.Autotuner):\n"
            "            print(n, *(f\"{getattr(c, 'min_head_dim', 0)}-{getattr(c, 'max_head_dim', 999)}\" "
            "for c in o.configs))\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return {name: [tuple(map(int, r.split("-"))) for r in ranges]
            for name, *ranges in (line.split() for line in out.splitlines())}


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compilation, not interpreted


def test_every_autotuned_config_compiles_clean_for_sm90():
    out = subprocess.run([sys.executable, TOOL, "--quick"], env=_env(), capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = [l for l in out.stdout.splitlines() if re.search(r" regs=\d+ ", l)]
    configs = _gpu_configs()
    assert set(configs) >= {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    for name, ranges in configs.items():
        # --quick: head dims 128 and 256, causal (dense and packed documents), one dtype and arch. A config is
        # compiled at each of those head dims inside its range, where the autotuner may pick it (a config for
        # small head dims only is the full sweep's to check).
        picked = sum(lo <= head_dim <= hi for lo, hi in ranges for head_dim in (128, 256))
        mine = [l for l in lines if l.split()[0] == name]
        assert picked and len(mine) == 2 * picked, (name, ranges, mine)
        assert all(l.endswith(" ok") and " spills=0 " in l for l in mine), mine
        assert all("mma=" in l and "mma=none" not in l for l in mine), mine  # attention uses tensor cores
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        # At head dim 128 each attention kernel has a tile the autotuner may pick that reads its operands through
        # tensor descriptors (TMA) and issues Hopper's warpgroup MMA, spill-free (checked above); at 256, pointers.
        mine = [l for l in lines if l.split()[0] == name]
        assert any("HEAD_DIM=128 " in l and " TMA=True " in l and "mma=wgmma" in l for l in mine), (name, mine)
        assert all(" TMA=False " in l for l in mine if "HEAD_DIM=256 " in l), (name, mine)
    assert re.search(r"check_kernels: \d+ compilations \(sm_90a\), 0 fail", out.stdout), out.stdout[-2000:]


def test_spills_and_shared_memory_overflows_fail():
    tool = _tool()
    clean = dict(autotuned=True, regs=200, spills=0, smem=98304, mma="wgmma")
    assert tool.verdict(clean) == "ok"
    assert tool.verdict(dict(clean, spills=16)).startswith("FAIL spills 16")
    assert tool.verdict(dict(clean, autotuned=False, spills=16)).startswith("WARN spills 16")
    assert tool.verdict(dict(clean, smem=tool.SMEM_LIMIT + 1)).startswith("FAIL shared memory")
    assert tool.verdict(dict(clean, error="CompilationError: x")).startswith("FAIL compile")
