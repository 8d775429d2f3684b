"""flash_attention with a value head dim different from the query/key head dim (multi-head latent attention,
DeepSeek-V2/V3: 192-channel queries and keys, 128-channel values): the Triton kernels under the interpreter,
forward and backward, against the float64 reference, output (b, s, h, d_v). Covers plain causal and full
attention, GQA (the dK/dV kernel's split partials), values wider than keys, padded head dims, packed documents
with a sliding window, the key_bounds halves that ring attention and the padded KV cache use, and torch's SDPA
fallback. fp32 (the interpreter's tl.dot is exact there; tolerances of tests/test_kernels_attention.py).
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels import Unsupported, reference
from megagopher.kernels._common import poison_outputs
from megagopher.kernels.testing import assert_ok, compare, measure, stable_seed

F32, F16 = torch.float32, torch.float16
TOL = {F32: (1e-5, 1e-5), F16: (5e-3, 5e-3)}


def _qkv(b, sq, sk, h, h_kv, d, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k = torch.randn(b, sk, h_kv, d, generator=g).to(dtype)
    v = torch.randn(b, sk, h_kv, dv, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,dv,causal,dtype", [
    (2, 17, 17, 2, 2, 24, 16, True, F32),     # both padded (32 and 16)
    (1, 45, 45, 4, 2, 48, 32, True, F32),     # GQA: the dK/dV group split over programs, fp32 partials
    (2, 33, 33, 2, 1, 48, 32, False, F32),
    (1, 40, 40, 2, 2, 16, 32, True, F32),     # values wider than keys
    (1, 17, 17, 2, 2, 192, 128, True, F32),   # DeepSeek-V3's widths (queries padded to 256: pointer loads)
    (1, 33, 70, 2, 1, 24, 16, True, F16),     # fewer queries than keys
])
def test_flash_attention_value_head_dim_matches_float64(b, sq, sk, h, h_kv, d, dv, causal, dtype):
    seed = stable_seed((b, sq, sk, h, h_kv, d, dv, causal))
    q, k, v = _qkv(b, sq, sk, h, h_kv, d, dv, dtype, seed)
    checks = compare("flash_attention", (q, k, v), dict(causal=causal), grad_args=(0, 1, 2), names=("q", "k", "v"),
                     tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"d={d} dv={dv} b={b} sq={sq} sk={sk} h={h}/{h_kv} causal={causal} {dtype}")
    out = kernels.flash_attention(q, k, v, causal=causal, backend="triton")
    assert out.shape == (b, sq, h, dv)


def test_packed_documents_with_window_and_value_head_dim():
    lengths, h, h_kv, d, dv, window = [1, 17, 70, 5, 40], 4, 2, 24, 16, (10, 0)
    seed = stable_seed(tuple(lengths), d, dv)
    total = sum(lengths)
    q, k, v = _qkv(1, total, total, h, h_kv, d, dv, F32, seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poison_outputs():
        out = kernels.flash_attention(*leaves, causal=True, cu_seqlens=cu, window_size=window, backend="triton")
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        grads = torch.autograd.grad(out, leaves, upstream)
    # float64 truth one document at a time through the reference (no cu_seqlens)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bounds = cu.tolist()
    want = torch.cat([reference.flash_attention(*(t[:, a:e] for t in ref), causal=True, window_size=window)
                      for a, e in zip(bounds[:-1], bounds[1:])], dim=1)
    want_grads = torch.autograd.grad(want, ref, upstream.double())
    checks = [measure("out", out, want, *TOL[F32])]
    checks += [measure(f"grad {n}", g, w, *TOL[F32]) for n, g, w in zip("qkv", grads, want_grads)]
    assert_ok(checks, f"packed {lengths} d={d} dv={dv} window={window}")


def _bounds(b, sq, sk, seed):
    """key_bounds and the matching query_bounds of a random banded mask (query i sees [lo_i, hi_i), both
    non-decreasing, as ring attention's and the padded cache's are)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, sk // 2, (b, sq), generator=g).sort(dim=1).values
    hi = (lo + torch.randint(1, sk, (b, sq), generator=g)).clamp(max=sk).sort(dim=1).values
    hi = torch.maximum(hi, lo + 1)
    col = torch.arange(sk)
    seen = (col >= lo[..., None]) & (col < hi[..., None])  # (b, sq, sk)
    rows = torch.arange(sq)[None, :, None].expand_as(seen)
    q_lo = torch.where(seen, rows, sq).min(dim=1).values
    q_hi = torch.where(seen, rows + 1, 0).max(dim=1).values
    q_lo = torch.minimum(q_lo, q_hi)
    as32 = lambda *ts: tuple(t.to(torch.int32).contiguous() for t in ts)
    return as32(lo, hi), as32(q_lo, q_hi)


def test_forward_backward_halves_with_key_bounds_and_value_head_dim():
    """flash_attention_forward / _backward (ring attention's blocks, the padded cache's mask) at d != d_v:
    o and the gradients against the reference's, which is checked against float64 autograd."""
    b, sq, sk, h, h_kv, d, dv = 2, 37, 45, 4, 2, 48, 32
    seed = stable_seed("bounds", d, dv)
    q, k, v = _qkv(b, sq, sk, h, h_kv, d, dv, F32, seed)
    key_bounds, query_bounds = _bounds(b, sq, sk, seed)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = reference.flash_attention_forward(*ref, causal=False, key_bounds=key_bounds)
    do = torch.randn(b, sq, h, dv, generator=torch.Generator().manual_seed(seed))
    want_grads = torch.autograd.grad(want, ref, do.double())
    with poison_outputs():
        o, lse = kernels.flash_attention_forward(q, k, v, causal=False, key_bounds=key_bounds, backend="triton")
        grads = kernels.flash_attention_backward(q, k, v, o, lse, do, causal=False, key_bounds=key_bounds,
                                                 query_bounds=query_bounds, backend="triton")
    ref_grads = reference.flash_attention_backward(*ref, want.detach(), want_lse, do.double(), causal=False,
                                                   key_bounds=key_bounds)
    checks = [measure("out", o, want, *TOL[F32]), measure("lse", lse, want_lse, *TOL[F32])]
    checks += [measure(f"grad {n}", g, w, *TOL[F32]) for n, g, w in zip("qkv", grads, want_grads)]
    checks += [measure(f"reference grad {n}", g, w, 1e-10, 1e-10) for n, g, w in zip("qkv", ref_grads, want_grads)]
    assert_ok(checks, f"key_bounds d={d} dv={dv}")


@pytest.mark.parametrize("window,cu", [(None, None), ((5, 0), None), (None, [0, 9, 30])])
def test_sdpa_fallback_takes_value_head_dim(window, cu):
    q, k, v = _qkv(1, 30, 30, 4, 2, 24, 16, F32, 3)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    got = kernels._sdpa_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, window_size=window)
    want = reference.flash_attention(*(t.double() for t in (q, k, v)), causal=True, cu_seqlens=cu_seqlens,
                                     window_size=window)
    assert got.shape == (1, 30, 4, 16)
    assert_ok([measure("out", got, want, *TOL[F32])], f"sdpa window={window} cu={cu}")


def test_value_head_dim_errors():
    q = torch.randn(1, 4, 2, 24)
    with pytest.raises(Unsupported, match="value head dim 12"):
        kernels.flash_attention(q, q, torch.randn(1, 4, 2, 12), backend="triton")
    with pytest.raises(Unsupported, match=r"\(b=1, s_k, h_kv, d_v\)"):
        kernels.flash_attention(q, q, torch.randn(1, 5, 2, 16), backend="triton")
    o = torch.zeros(1, 4, 2, 24)
    with pytest.raises(ValueError, match=r"o and do must be \(1, 4, 2, 16\)"):
        kernels.flash_attention_backward(q, q, torch.randn(1, 4, 2, 16), o, torch.zeros(1, 2, 4), o,
                                         backend="triton")


def test_tiles_picked_at_mla_head_dims():
    """The autotuner's configs at unequal head dims: those of the wider one, less the 4-warp 32 x 32 dQ tile
    that spills at 256/128 on sm_90a (tools/check_kernels.py compiles exactly the configs kept)."""
    from megagopher.kernels.attention_tiles import DQ_TILES, FWD_TILES, prune_by_head_dims
    shapes = lambda configs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}
    mla, square = (dict(HEAD_DIM=256, HEAD_DIM_V=128), dict(HEAD_DIM=256, HEAD_DIM_V=256))
    assert shapes(prune_by_head_dims(DQ_TILES, {}, **square)) - shapes(prune_by_head_dims(DQ_TILES, {}, **mla)) \
        == {(32, 32, 4, 2)}
    assert shapes(prune_by_head_dims(FWD_TILES, {}, **mla)) == shapes(prune_by_head_dims(FWD_TILES, {}, **square))
    assert shapes(prune_by_head_dims(FWD_TILES, {}, HEAD_DIM=32, HEAD_DIM_V=16)) \
        == shapes(prune_by_head_dims(FWD_TILES, {}, HEAD_DIM=32, HEAD_DIM_V=32))
