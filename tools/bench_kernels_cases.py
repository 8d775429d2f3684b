"""The cases of tools/bench_kernels.py: for each kernel its inputs (small ones for the interpreter check,
training-sized ones on a GPU), the work they stand for (FLOPs, or the bytes the op must move) and the
baselines the Triton kernel is timed against:

- attention: torch's scaled_dot_product_attention with its backend pinned (torch.nn.attention.sdpa_kernel):
  flash, cuDNN and memory-efficient, each a row of its own (one that refuses the input says so). Not
  torch.compile: inductor lowers attention to these same SDPA kernels, and the reference's s x s fp32
  scores would be a baseline nobody trains with;
- the memory-bound ops: PyTorch eager in the input dtype (no extra upcast: F.cross_entropy takes the bf16
  logits), torch.compile of the PyTorch reference (kernels/reference.py), and Liger-Kernel and NVIDIA apex
  (through kernels' "apex" backend) where importable.

Attention runs the FlashAttention-2 paper's grid: 16k tokens per batch, hidden size 2048 (heads = 2048 / d),
d = 64, 128, 256, sequence 1k to 16k. ``priority`` orders the work when time is short (0 first): the
issue's targets (d = 128 at 4k and 16k, one shape of each memory-bound op) come before the rest, and
torch.compile, which compiles for a while, comes one step after its case.
"""
from collections import namedtuple

import torch
import torch.nn.functional as F

# ours: None for kernels.<op>(*args, **kwargs, backend="triton"); baselines: [(name, fn, priority offset)]
Case = namedtuple("Case", "kernel label op args kwargs grad_args baselines work priority ours", defaults=(None,))


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _liger():
    """Liger-Kernel's functional API, or None where it is not installed."""
    try:
        from liger_kernel.transformers import functional
        return functional
    except ImportError:
        return None


def _compiled(fn):
    """torch.compile of ``fn``. Without donated buffers: a backward compiled with them runs once per graph,
    and the benchmark times the backward alone by repeating it (donation saves memory, not time)."""
    import torch._functorch.config as functorch_config
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def _apex(op, kwargs):
    """kernels' "apex" backend for the ops apex has (norms, softmax), where apex is importable."""
    from megagopher import kernels
    from megagopher.kernels import dispatch
    if op not in dispatch.APEX_OPS or not dispatch.apex_available():
        return []
    return [("apex", lambda *a: getattr(kernels, op)(*a, **kwargs, backend="apex"), 0)]


def _memory_bound(op, kwargs, eager, liger=None):
    """Baselines of a memory-bound op: eager PyTorch, torch.compile of the reference, Liger, apex."""
    from megagopher.kernels import reference
    ref = getattr(reference, op, None)
    out = [("torch", eager, 0)]
    if ref is not None:
        out.append(("torch.compile", _compiled(lambda *a: ref(*a, **kwargs)), 1))
    if liger is not None:
        out.append(("liger", liger, 0))
    return out + _apex(op, kwargs)


def _sdpa(backend, causal):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal, enable_gqa=q.shape[2] != k.shape[2]
                                                  ).transpose(1, 2)
    return fn


def sdpa_baselines(causal):
    from torch.nn.attention import SDPBackend
    return [(f"sdpa[{name}]", _sdpa(getattr(SDPBackend, member), causal), 0) for name, member in
            (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"))]


def _attention_shapes(small):
    """(b, s, h, h_kv, d, causal, priority)."""
    if small:
        return [(1, 129, 4, 2, 32, True, 0), (1, 70, 2, 2, 64, False, 0)]
    shapes = []
    for d, s, priority in [(128, 4096, 0), (128, 16384, 0), (128, 1024, 1), (64, 4096, 1), (256, 4096, 1),
                           (64, 16384, 2), (256, 16384, 2), (64, 1024, 2), (256, 1024, 2)]:
        shapes.append((16384 // s, s, 2048 // d, 2048 // d, d, True, priority))
    return shapes + [(4, 4096, 16, 4, 128, True, 1), (4, 4096, 16, 16, 128, False, 2)]  # GQA; non-causal


def _attention_cases(kernel, small, rnd, g, device):
    out = []
    for b, s, h, hkv, d, causal, priority in _attention_shapes(small):
        q, k, v = rnd(b, s, h, d), rnd(b, s, hkv, d), rnd(b, s, hkv, d)
        flops = 4 * b * h * s * s * d // (2 if causal else 1)
        out.append(Case(kernel, f"b{b} s{s} h{h}/{hkv} d{d}{' causal' if causal else ''}", "flash_attention",
                        (q, k, v), dict(causal=causal), (0, 1, 2), sdpa_baselines(causal), ("flops", flops),
                        priority))
    return out


def _softmax_cases(kernel, small, rnd, g, device):
    shapes = [((1, 2, 5, 257), True, 0), ((2, 2, 33, 33), False, 0)] if small else \
        [((4, 16, 2048, 2048), True, 0), ((4, 16, 2048, 2048), False, 2), ((2, 8, 1024, 8192), False, 2)]
    out = []
    for shape, causal, priority in shapes:
        x = rnd(*shape, scale=3.0)
        mask = None if causal else (torch.rand(shape[0], 1, *shape[2:], generator=g) < 0.2).to(device)
        tri = torch.ones(shape[-2:], dtype=torch.bool, device=device).triu(1)
        eager = lambda x, mask=mask, causal=causal, tri=tri: torch.softmax(
            (x * 0.125).masked_fill(tri if causal else mask, float("-inf")), -1)
        kwargs = dict(mask=mask, scale=0.125, causal=causal)
        byt = nbytes(x) * 2 + (0 if mask is None else mask.numel())
        out.append(Case(kernel, f"{shape}{' causal' if causal else ' mask'}", "scaled_masked_softmax", (x,), kwargs,
                        (0,), _memory_bound("scaled_masked_softmax", kwargs, eager), ("bytes", byt, nbytes(x) * 3),
                        priority))
    return out


def _norm_cases(kernel, small, rnd, g, device):
    liger = _liger()
    out = []
    for m, n, priority in ([(51, 96, 0), (3, 1000, 0)] if small else
                           [(8192, 4096, 0), (16384, 8192, 2), (4096, 16384, 2)]):
        x, w, bias = rnd(m, n), rnd(n, scale=0.1) + 1, rnd(n)
        if kernel == "rms_norm":
            args, eager = (x, w), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-5)
            theirs = liger and (lambda x, w: liger.liger_rms_norm(x, w, 1e-5, in_place=False))
        else:
            args, eager = (x, w, bias), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
            theirs = liger and (lambda x, w, b: liger.liger_layer_norm(x, w, b, 1e-5))
        fwd = nbytes(x) * 2 + nbytes(*args[1:])
        out.append(Case(kernel, f"{m}x{n}", kernel, args, dict(eps=1e-5), tuple(range(len(args))),
                        _memory_bound(kernel, dict(eps=1e-5), eager, theirs),
                        ("bytes", fwd, nbytes(x) * 3 + 2 * nbytes(*args[1:])), priority))
    return out


def _add_norm_cases(kernel, small, rnd, g, device):
    """x + residual feeding a norm: one kernel reads both and writes the sum and the normalised output."""
    from megagopher.kernels import reference
    norm = kernel[len("add_"):]
    out = []
    for m, n, priority in ([(51, 96, 0)] if small else [(8192, 4096, 0), (4096, 16384, 2)]):
        x, res, w, bias = rnd(m, n), rnd(m, n), rnd(n, scale=0.1) + 1, rnd(n)
        args = (x, res, w) if norm == "rms_norm" else (x, res, w, bias)
        functional = F.rms_norm if norm == "rms_norm" else F.layer_norm
        eager = lambda x, r, *p, f=functional: (f(x + r, (x.shape[-1],), *p, 1e-5), x + r)
        ref = lambda x, r, *p, f=getattr(reference, norm): (f(x + r, *p, eps=1e-5), x + r)
        params = nbytes(*args[2:])
        out.append(Case(kernel, f"{m}x{n}", kernel, args, dict(eps=1e-5), tuple(range(len(args))),
                        [("torch", eager, 0), ("torch.compile", _compiled(ref), 1)],
                        ("bytes", nbytes(x) * 4 + params, nbytes(x) * 4 + 2 * params), priority))
    return out


def _rope_eager(x, cos, sin):
    """Rotate-half RoPE as models write it, in the input's dtype (the reference computes in fp32)."""
    half = cos.shape[-1]
    c, s = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def _rope_cases(kernel, small, rnd, g, device):
    out = []
    for b, s, h, d, half, priority in ([(2, 17, 4, 64, 16, 0)] if small else
                                       [(4, 2048, 32, 128, 64, 0), (4, 2048, 32, 128, 16, 2)]):
        x = rnd(b, s, h, d)
        ang = torch.rand(s, half, generator=g).to(device) * s
        out.append(Case(kernel, f"b{b} s{s} h{h} d{d} rot{2 * half}", "apply_rope", (x, ang.cos(), ang.sin()), {},
                        (0,), _memory_bound("apply_rope", {}, _rope_eager),
                        ("bytes", nbytes(x) * 2, nbytes(x) * 2), priority))
    return out


def _swiglu_cases(kernel, small, rnd, g, device):
    liger = _liger()
    out = []
    for shape, priority in ([((3, 17, 100), 0)] if small else [((8192, 11008), 0), ((16384, 14336), 2)]):
        gate, up = rnd(*shape, scale=3.0), rnd(*shape)
        out.append(Case(kernel, "x".join(map(str, shape)), "swiglu", (gate, up), {}, (0, 1),
                        _memory_bound("swiglu", {}, lambda a, b: F.silu(a) * b, liger and liger.liger_swiglu),
                        ("bytes", nbytes(gate) * 3, nbytes(gate) * 5), priority))
    return out


def _cross_entropy_cases(kernel, small, rnd, g, device):
    liger = _liger()
    out = []
    for m, v, priority in ([(17, 300, 0), (3, 1000, 0)] if small else [(8192, 50304, 0), (4096, 128256, 2)]):
        logits = rnd(m, v, scale=3.0)
        labels = torch.randint(0, v, (m,), generator=g).to(device)
        eager = lambda x, y: F.cross_entropy(x, y, reduction="none")  # on the bf16 logits, as a model calls it
        theirs = liger and (lambda x, y: liger.liger_cross_entropy(x, y, reduction="none"))
        out.append(Case(kernel, f"{m}x{v}", "cross_entropy", (logits, labels), {}, (0,),
                        _memory_bound("cross_entropy", {}, eager, theirs),
                        ("bytes", nbytes(logits), nbytes(logits) * 2), priority))
    if not small:
        out.append(_vocab_parallel_case(kernel, rnd, g, device))
    return out


def _vocab_parallel_case(kernel, rnd, g, device, m=8192, vocab=50257, padded=50304):
    """The loss the model computes (tp = 1, GPT-2's vocabulary padded to 50304): the forward reads the logits
    and writes their gradient, the backward scales it in place, one read and one write each. Timed without
    inplace_backward (the model's setting), which needs logits that are an intermediate, not a leaf; the
    gradient then goes to a new buffer, the same traffic."""
    from megagopher.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    logits, labels = rnd(m, padded, scale=3.0), torch.randint(0, vocab, (m,), generator=g).to(device)
    ours = lambda x, y: vocab_parallel_cross_entropy(x, y, vocab)
    eager = lambda x, y: F.cross_entropy(x[:, :vocab], y, reduction="none")
    return Case(kernel, f"{m}x{padded} vocab-parallel (model)", "cross_entropy", (logits, labels), {}, (0,),
                [("torch", eager, 0)], ("bytes", nbytes(logits) * 2, nbytes(logits) * 2), 0, ours)


BUILDERS = {"attention": _attention_cases, "softmax": _softmax_cases, "rms_norm": _norm_cases,
            "layer_norm": _norm_cases, "add_rms_norm": _add_norm_cases, "add_layer_norm": _add_norm_cases,
            "rope": _rope_cases, "swiglu": _swiglu_cases, "cross_entropy": _cross_entropy_cases}


def cases(kernel, dtype, device, small):
    """The Cases of one kernel. Inputs are drawn from one generator seeded 0 per kernel, in the order the
    kernel's case builder asks for them."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(dt).to(device)

    return BUILDERS[kernel](kernel, small, rnd, g, device)
