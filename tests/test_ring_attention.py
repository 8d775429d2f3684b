"""Ring attention (megagopher.context_parallel) on gloo CP groups of 2 and 4 ranks against
causal attention over the whole sequence on one process: output and q/k/v gradients (fp32, to rounding),
with GQA and a sequence whose chunks cross several key blocks, with and without documents that cross the
chunks (on the PyTorch path and on the flash kernels' key_bounds path); and the transfer order: each step's
receive is posted before that step's block is computed and waited for after it.

One spawn of 4 ranks covers both CP sizes (the 4 ranks form two CP groups of 2, then one of 4)."""
import torch
import torch.distributed as dist

from megagopher import kernels
from megagopher.context_parallel import ring_attention, split_for_cp_rank, zigzag_positions
from megagopher.testing import spawn

B, S, H, H_KV, D = 2, 48, 4, 2, 16


def _inputs():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, H_KV, D, generator=g)
    v = torch.randn(B, S, H_KV, D, generator=g)
    dout = torch.randn(B, S, H, D, generator=g)
    return q, k, v, dout


def _cu_seqlens():
    """Documents of the two rows laid end to end: row 0 cut at 5, 20 and 31 (across the chunks of cp 2 and 4),
    row 1 whole."""
    return torch.tensor([0, 5, 20, 31, S, 2 * S], dtype=torch.int32)


def _serial(masked=False):
    q, k, v, dout = (t.double().requires_grad_(i < 3) for i, t in enumerate(_inputs()))
    if masked:  # the rows end to end, one packed sequence
        packed = [t.reshape(1, B * S, *t.shape[2:]) for t in (q, k, v)]
        out = kernels.flash_attention(*packed, causal=True, cu_seqlens=_cu_seqlens(), backend="torch").view(q.shape)
    else:
        out = kernels.flash_attention(q, k, v, causal=True, backend="torch")
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _ring(group, cp, cp_rank, log, masked=False):
    q, k, v, dout = (split_for_cp_rank(t, cp, cp_rank) for t in _inputs())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, group, cu_seqlens=_cu_seqlens() if masked else None, ring_log=log)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _run(rank, world):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    everyone = dist.new_group(list(range(world)))
    log = []
    with kernels.use_backend("torch"):
        cp2 = _ring(pairs[rank // 2], 2, rank % 2, None)
        cp4 = _ring(everyone, 4, rank, log)
        cp4_masked = _ring(everyone, 4, rank, None, masked=True)
    with kernels.use_backend("triton"):  # the flash kernels (interpreted): their key_bounds path
        cp2_masked_triton = _ring(pairs[rank // 2], 2, rank % 2, None, masked=True)
    return {"cp2": cp2, "cp4": cp4, "cp4-masked": cp4_masked, "cp2-masked-triton": cp2_masked_triton, "log": log}


def _check(results, cp, key):
    want = _serial(masked="masked" in key)
    for cp_rank in range(cp):
        got = results[cp_rank][key]
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            w = split_for_cp_rank(w, cp, cp_rank).float()
            assert torch.allclose(g, w, atol=1e-5, rtol=1e-5), (cp, cp_rank, name, (g - w).abs().max())


def test_ring_attention_equals_full_causal_attention_and_overlaps():
    results = spawn(_run, 4)
    _check(results, 2, "cp2")
    _check(results, 4, "cp4")
    _check(results, 4, "cp4-masked")
    _check(results, 2, "cp2-masked-triton")
    for r in results:
        fwd = [e[1:] for e in r["log"] if e[0] == "forward"]
        # step i's transfer (the next block) is posted before step i computes and waited for after it
        assert fwd == [e for i in range(3) for e in (("post", i), ("wait", i))], fwd
        bwd = [e[1:] for e in r["log"] if e[0] == "backward"]
        assert bwd.count(("post", 0)) == 2 and bwd[0] == ("post", 0), bwd  # the next block goes out first
        assert bwd[-1] == ("wait", 4), bwd  # every block's gradient returns to its owner at the end


def test_zigzag_chunks_pair_early_with_late():
    assert zigzag_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([zigzag_positions(24, 3, r) for r in range(3)]).sort().values
    assert every.tolist() == list(range(24))
    try:
        zigzag_positions(18, 2, 0)
    except ValueError as e:
        assert "multiple of 2 * parallel.cp" in str(e)
    else:
        raise AssertionError("a length not divisible by 2 * cp must be refused")


def _bounds(b, sq, sk, seed):
    """Random per-row key ranges [lo, hi) that rise with the row (as ring attention's do), some empty, and
    their view from the keys: key j is seen by the rows i with lo[i] <= j < hi[i]."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.sort(torch.randint(0, sk, (b, sq), generator=g), dim=1).values
    hi = torch.minimum(lo + torch.randint(0, sk // 2, (b, sq), generator=g), torch.tensor(sk))
    hi = torch.maximum(torch.cummax(hi, dim=1).values, lo)
    hi[0, :3] = lo[0, :3]  # rows that see no key (a document that starts after this key block)
    j = torch.arange(sk)
    seen = (j[None, None, :] >= lo[..., None]) & (j[None, None, :] < hi[..., None])  # (b, sq, sk)
    rows = torch.arange(sq)[None, :, None]
    q_lo = torch.where(seen, rows, sq).min(dim=1).values
    q_hi = torch.where(seen, rows + 1, 0).max(dim=1).values
    q_lo = torch.minimum(q_lo, q_hi)
    return [t.to(torch.int32) for t in (lo, hi)], [t.to(torch.int32) for t in (q_lo, q_hi)]


def test_key_bounds_triton_equals_reference():
    """The flash kernels' general mask (per-row key ranges, ring attention's blocks under document masking),
    forward and backward under the interpreter, against the float64 reference; rows that see no key give
    lse -inf and zero output."""
    b, sq, sk, h, h_kv, d = 2, 40, 72, 4, 2, 24
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(b, s, n, d, generator=g) for s, n in ((sq, h), (sk, h_kv), (sk, h_kv), (sq, h)))
    key_bounds, query_bounds = _bounds(b, sq, sk, 4)
    want_o, want_lse = kernels.flash_attention_forward(*(t.double() for t in (q, k, v)), False,
                                                       key_bounds=key_bounds, backend="torch")
    o, lse = kernels.flash_attention_forward(q, k, v, False, key_bounds=key_bounds, backend="triton")
    assert torch.isinf(want_lse).any()  # some rows see nothing
    assert torch.allclose(o.double(), want_o, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse.double()[finite], want_lse[finite], atol=1e-5, rtol=1e-5)
    want = kernels.flash_attention_backward(*(t.double() for t in (q, k, v, o, lse, do)), False,
                                            key_bounds=key_bounds, query_bounds=query_bounds, backend="torch")
    got = kernels.flash_attention_backward(q, k, v, o, lse, do, False, key_bounds=key_bounds,
                                           query_bounds=query_bounds, backend="triton")
    for name, g_, w in zip("qkv", got, want):
        assert torch.allclose(g_.double(), w, atol=1e-5, rtol=1e-5), (name, (g_.double() - w).abs().max())
