"""Packed documents (cu_seqlens) and sliding windows (window_size=(left, 0)) in flash_attention: the Triton
kernel under the interpreter, forward and backward, against float64 ground truth computed document by
document (each document run on its own through the reference, no cu_seqlens), so the reference's own packed
path is checked too. Awkward documents: length 1, 17, one spanning several 32-row blocks, none aligned to a
block; GQA; windows smaller and larger than a block; rows that see no key at all. Also the SDPA fallback's
packed and windowed paths, and the errors for bad arguments. Tolerances as in test_kernels_attention.py.
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels import reference
from megagopher.kernels._common import poison_outputs
from megagopher.kernels.testing import assert_ok, compare, measure, stable_seed

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
DOCS = [1, 17, 70, 5, 40]  # 133 tokens; the 70-token document spans three blocks, no boundary is aligned


def _packed(lengths, h, h_kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, total, h, d, generator=g).to(dtype)
    k = torch.randn(1, total, h_kv, d, generator=g).to(dtype)
    v = torch.randn(1, total, h_kv, d, generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


def _per_document(q, k, v, cu, causal, window, upstream):
    """float64 output and gradients, each document through the reference on its own."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bounds = cu.tolist()
    out = torch.cat([reference.flash_attention(*(t[:, a:e] for t in leaves), causal=causal, window_size=window)
                     for a, e in zip(bounds[:-1], bounds[1:])], dim=1)
    return out, torch.autograd.grad(out, leaves, upstream.double())


def _check_packed(lengths, h, h_kv, d, causal, window, dtype):
    seed = stable_seed(tuple(lengths), h, h_kv, d, causal, window)
    q, k, v, cu = _packed(lengths, h, h_kv, d, dtype, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poison_outputs():
        out = kernels.flash_attention(*leaves, causal=causal, cu_seqlens=cu, window_size=window, backend="triton")
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        grads = torch.autograd.grad(out, leaves, upstream)
    want, want_grads = _per_document(q, k, v, cu, causal, window, upstream)
    atol, rtol = TOL[dtype]
    checks = [measure("out", out, want, atol, rtol)]
    checks += [measure(f"grad {n}", g, w, atol, rtol) for n, g, w in zip("qkv", grads, want_grads)]
    assert_ok(checks, f"packed {lengths} h={h}/{h_kv} d={d} causal={causal} window={window} {dtype}")


@pytest.mark.parametrize("h,h_kv,d,causal,window,dtype", [
    (4, 2, 16, True, None, torch.float32),
    (2, 1, 32, False, None, torch.float32),
    (2, 2, 16, True, (10, 0), torch.float32),   # window smaller than a block
    (4, 1, 16, True, (45, 0), torch.float16),   # window larger than a block, within a document
    (2, 1, 80, True, None, torch.bfloat16),     # padded head dim
])
def test_packed_documents_match_each_document_alone(h, h_kv, d, causal, window, dtype):
    _check_packed(DOCS, h, h_kv, d, causal, window, dtype)


def test_one_document_and_many_single_tokens():
    _check_packed([33], 2, 1, 16, True, None, torch.float32)
    _check_packed([1] * 9 + [30], 2, 2, 16, True, (3, 0), torch.float32)


@pytest.mark.parametrize("window", [None, (70, 0)])
def test_long_document_takes_the_unmasked_blocks(window):
    # Inside the 130-token document whole 32 x 32 blocks see each other (below the diagonal, inside the
    # window): the loops without the mask run, forward and backward.
    _check_packed([3, 130, 20], 2, 1, 16, True, window, torch.float32)


@pytest.mark.parametrize("sq,sk,h,h_kv,window", [
    (100, 100, 2, 1, (5, 0)),
    (100, 100, 4, 2, (40, 0)),
    (70, 33, 2, 1, (5, 0)),     # queries 39.. see no key at all: zeros out, zero gradients
    (40, 40, 2, 2, (-1, 0)),    # unbounded left: plain causal
])
def test_sliding_window_matches_reference(sq, sk, h, h_kv, window):
    seed = stable_seed(sq, sk, h, h_kv, window)
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, sq, h, 16, generator=g), torch.randn(1, sk, h_kv, 16, generator=g), \
        torch.randn(1, sk, h_kv, 16, generator=g)
    checks = compare("flash_attention", (q, k, v), dict(causal=True, window_size=window), grad_args=(0, 1, 2),
                     names=("q", "k", "v"), tol=TOL[torch.float32], seed=seed)
    assert_ok(checks, f"window {window} sq={sq} sk={sk}")


def test_window_is_a_band_in_the_reference():
    q, k, v = (torch.randn(1, 12, 2, 8, dtype=torch.float64) for _ in range(3))
    got = reference.flash_attention(q, k, v, causal=True, window_size=(2, 0))
    for i in (0, 5, 11):  # query i attends to keys max(0, i - 2) .. i only
        lo = max(0, i - 2)
        want = reference.flash_attention(q[:, i:i + 1], k[:, lo:i + 1], v[:, lo:i + 1], causal=False)
        torch.testing.assert_close(got[:, i:i + 1], want)
    wide = reference.flash_attention(q, k, v, causal=True, window_size=(12, 0))
    torch.testing.assert_close(wide, reference.flash_attention(q, k, v, causal=True))


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (6, 0))])
def test_sdpa_fallback_runs_documents_and_windows(causal, window):
    q, k, v, cu = _packed([3, 20, 9], 4, 2, 16, torch.float32, seed=5)
    got = kernels._sdpa_attention(q, k, v, causal=causal, cu_seqlens=cu, window_size=window)
    want = reference.flash_attention(q, k, v, causal=causal, cu_seqlens=cu, window_size=window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_packing_and_windows_are_clear_errors(backend):
    q, k, v, cu = _packed([3, 5], 2, 1, 16, torch.float32, seed=1)
    bad = [
        (dict(cu_seqlens=cu.long()), "int32"),
        (dict(cu_seqlens=cu[None]), "1-D"),
        (dict(cu_seqlens=cu[:1]), "n \\+ 1 >= 2"),
        (dict(window_size=(4, 2)), "right window"),
        (dict(window_size=(4, 0), causal=False), "causal=True"),
        (dict(window_size=(-3, 0)), "left must be"),
        (dict(window_size=4), "window_size must be"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            kernels.flash_attention(q, k, v, **{"causal": True, **kwargs}, backend=backend)
    with pytest.raises(ValueError, match="\\(1, total"):
        kernels.flash_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                                cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="same length"):
        kernels.flash_attention(q[:, :7], k, v, cu_seqlens=cu, backend=backend)
