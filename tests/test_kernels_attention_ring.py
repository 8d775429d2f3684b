"""The two halves of attention that ring attention builds on: flash_attention_forward -> (o, lse) and
flash_attention_backward(q, k, v, o, lse, do) with o and lse of a larger attention. The Triton twins (under the
interpreter) agree with the PyTorch twins; splitting the keys into two blocks and merging by lse gives the full
attention, and each block's backward with the merged o and lse gives the full gradients (float64 truth).
Also the dK/dV split over query heads (few kv heads): both sides of the switch against the reference.
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels import attention_bwd, reference
from megagopher.kernels.testing import assert_ok, compare, measure

TOL = (1e-5, 1e-5)  # fp32 against float64


def _qkvdo(b, sq, sk, h, h_kv, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, sq, h, d), (b, sk, h_kv, d), (b, sk, h_kv, d), (b, sq, h, d)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _full(q, k, v, do, causal, **kwargs):
    """float64 output and gradients of the whole attention, by autograd through the reference."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o = reference.flash_attention(*leaves, causal=causal, **kwargs)
    return o, torch.autograd.grad(o, leaves, do.double())


@pytest.mark.parametrize("causal,kwargs", [(True, {}), (False, {}), (True, dict(window_size=(9, 0))),
                                           (True, dict(cu_seqlens=torch.tensor([0, 7, 30, 41], dtype=torch.int32)))])
def test_triton_and_torch_twins_agree(causal, kwargs):
    q, k, v, do = _qkvdo(1, 41, 41, 4, 2, 16, seed=3)
    o_t, lse_t = kernels.flash_attention_forward(q, k, v, causal, 0.3, backend="triton", **kwargs)
    o_r, lse_r = kernels.flash_attention_forward(q, k, v, causal, 0.3, backend="torch", **kwargs)
    want, want_grads = _full(q, k, v, do, causal, softmax_scale=0.3, **kwargs)
    checks = [measure("o triton", o_t, want, *TOL), measure("o torch", o_r, want, *TOL),
              measure("lse", lse_t, lse_r, *TOL)]
    assert lse_t.dtype == torch.float32 and lse_t.shape == (1, 4, 41)
    for backend in ("triton", "torch"):
        grads = kernels.flash_attention_backward(q, k, v, o_r, lse_r, do, causal, 0.3, backend=backend, **kwargs)
        checks += [measure(f"{backend} d{n}", g, w, *TOL) for n, g, w in zip("qkv", grads, want_grads)]
    assert_ok(checks, f"twins causal={causal} {kwargs}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_two_key_blocks_merged_by_lse_give_the_full_attention_and_gradients(backend):
    # Non-causal, as between two ring ranks' blocks: the first block holds keys 0..22, the second 23..49.
    q, k, v, do = _qkvdo(2, 37, 50, 4, 1, 32, seed=11)
    cut = 23
    halves = [(k[:, :cut], v[:, :cut]), (k[:, cut:], v[:, cut:])]
    parts = [kernels.flash_attention_forward(q, kb, vb, False, None, backend=backend) for kb, vb in halves]
    (o1, lse1), (o2, lse2) = parts
    lse = torch.logaddexp(lse1, lse2)
    weight = lambda part_lse: torch.exp(part_lse - lse).transpose(1, 2)[..., None]  # (b, s, h, 1)
    o = o1 * weight(lse1) + o2 * weight(lse2)
    want, (dq_w, dk_w, dv_w) = _full(q, k, v, do, causal=False)
    grads = [kernels.flash_attention_backward(q, kb, vb, o, lse, do, False, None, backend=backend)
             for kb, vb in halves]
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([grads[0][1], grads[1][1]], dim=1)
    dv = torch.cat([grads[0][2], grads[1][2]], dim=1)
    checks = [measure("merged o", o, want, *TOL), measure("dq", dq, dq_w, *TOL), measure("dk", dk, dk_w, *TOL),
              measure("dv", dv, dv_w, *TOL)]
    assert_ok(checks, f"two key blocks, {backend}")


def test_backward_rejects_mismatched_o_and_lse():
    q, k, v, do = _qkvdo(1, 9, 9, 2, 1, 16, seed=0)
    o, lse = kernels.flash_attention_forward(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="lse"):
        kernels.flash_attention_backward(q, k, v, o, lse[:, :1], do, backend="triton")


@pytest.mark.parametrize("min_programs,split", [(0, 1), (8, 2), (10 ** 6, 4)])
def test_dkdv_split_over_query_heads(monkeypatch, min_programs, split):
    monkeypatch.setattr(attention_bwd, "DKDV_MIN_PROGRAMS", min_programs)
    # 1 x 2 kv heads x 2 key blocks of 64 (the widest GPU block: the split is planned for it) = 4 programs
    # unsplit; the interpreter runs 32-key blocks, so each part visits 3 key blocks of 2 heads in its flat loop
    assert attention_bwd.dkdv_split(1, 2, 4, 70) == split
    q, k, v, _ = _qkvdo(1, 70, 70, 8, 2, 16, seed=4)
    checks = compare("flash_attention", (q, k, v), dict(causal=True), grad_args=(0, 1, 2), names=("q", "k", "v"),
                     tol=TOL, seed=4)
    assert_ok(checks, f"dK/dV split {split}")


def test_dkdv_split_reaches_the_program_target_with_the_smallest_divisor(monkeypatch):
    monkeypatch.setattr(attention_bwd, "DKDV_MIN_PROGRAMS", 264)
    block_n = attention_bwd._DKDV_WIDEST_BLOCK_N
    keys = 4 * block_n  # 4 key blocks: b * h_kv * 4 programs before splitting
    assert attention_bwd.dkdv_split(1, 2, 8, keys) == 8        # 8 programs: even 8 x falls short, all of it
    assert attention_bwd.dkdv_split(4, 8, 6, keys) == 3        # 128 programs: x 2 = 256 short, x 3 = 384
    assert attention_bwd.dkdv_split(40, 8, 4, keys) == 1       # 1280 programs: enough already
