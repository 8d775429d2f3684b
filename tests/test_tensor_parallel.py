"""Tensor and sequence parallelism equal the serial model (fp32, dropout off), for tp in {1, 2, 4}.

One spawn of 4 gloo ranks checks everything: for each model flavour the serial model's loss and gradients
are computed on every rank, then the same model under tp = 2 and 4 (dp = world / tp replicas compute the
same thing), with and without sequence parallelism; gathered gradient shards must equal the serial ones.
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.distributed import finalize_model_grads
from megagopher.model import GPTModel
from megagopher.tensor_parallel import (checkpoint, gather_from_sp_region, get_rng_tracker, model_parallel_seed,
                                        reduce_scatter_to_sp_region, vocab_parallel_cross_entropy)
from megagopher.tensor_parallel import mappings
from megagopher.testing import spawn
from layouts import FLAVOURS, FP32_ATOL as ATOL, FP32_RTOL as RTOL, gather_full
from layouts import tp_model_config as _cfg


def _run(cfg, tp, sp, ids, labels, seed=1234):
    ps.initialize_model_parallel(tp=tp)
    model = GPTModel(cfg, sequence_parallel=sp).initialize(seed)
    loss = model(ids, labels=labels).mean()
    loss.backward()
    finalize_model_grads([model])
    params, grads = {}, {}
    for name, p in model.named_parameters():
        full_p, full_g = (gather_full(p, t, keep_padding=True) for t in (p.detach(), p.grad))
        if getattr(p, "partition_dim", None) == 0 and full_p.shape[0] > p.full_shape[0]:
            assert torch.all(full_g[p.full_shape[0]:] == 0), f"{name}: vocab padding received a gradient"
            full_p, full_g = full_p[:p.full_shape[0]], full_g[:p.full_shape[0]]
        params[name], grads[name] = full_p, full_g
    ps.destroy_model_parallel()
    return loss.detach(), params, grads


def _tp_equivalence(rank, world):
    checked = []
    for flavour in FLAVOURS:
        cfg = _cfg(flavour)
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length), generator=gen)
        ref_loss, ref_params, ref_grads = _run(cfg, 1, False, ids, labels)
        for tp in (2, 4):
            for sp in (False, True):
                loss, params, grads = _run(cfg, tp, sp, ids, labels)
                where = f"{flavour} tp={tp} sp={sp}"
                torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=where)
                assert params.keys() == ref_params.keys()
                for name in ref_params:
                    assert torch.equal(params[name], ref_params[name]), f"{where}: init of {name} differs"
                    torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=ATOL,
                                               msg=lambda m: f"{where} grad {name}: {m}")
                checked.append(where)
    return checked


def _mappings_and_rng(rank, world):
    """The SP operators against their definitions, vocab-parallel cross entropy with label smoothing, and
    the RNG tracker's streams."""
    ps.initialize_model_parallel(tp=2)
    tp_rank = ps.get_tp_rank()
    # gather_from_sp_region: all-gather forward, reduce-scatter backward.
    x = torch.arange(4.0).view(2, 2).add(10 * tp_rank).requires_grad_()
    y = gather_from_sp_region(x)
    assert y.shape == (4, 2) and torch.equal(y[2 * tp_rank:2 * tp_rank + 2], x.detach())
    (y * (tp_rank + 1)).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 2), 3.0))  # sum over ranks of (rank + 1)
    # reduce_scatter_to_sp_region: reduce-scatter forward, all-gather backward.
    z = torch.ones(4, 2, requires_grad=True)
    w = reduce_scatter_to_sp_region(z)
    assert torch.equal(w, torch.full((2, 2), 2.0))
    (w * (tp_rank + 1)).sum().backward()
    assert torch.equal(z.grad[:2], torch.ones(2, 2)) and torch.equal(z.grad[2:], torch.full((2, 2), 2.0))
    # gather_from_tp_region joins the last dimension; its backward hands each rank its slice.
    c = torch.full((2, 3), float(tp_rank), requires_grad=True)
    joined = mappings.gather_from_tp_region(c)
    assert joined.shape == (2, 6) and torch.equal(joined[:, 3:], torch.ones(2, 3))
    (joined * torch.arange(6.0)).sum().backward()
    assert torch.equal(c.grad, torch.arange(3.0).add(3 * tp_rank).expand(2, 3))
    # f: identity forward, all-reduce backward; g: all-reduce forward, identity backward.
    a = torch.ones(3, requires_grad=True)
    mappings.copy_to_tp_region(a).mul(tp_rank + 1).sum().backward()
    assert torch.equal(a.grad, torch.full((3,), 3.0))
    b = torch.full((3,), float(tp_rank + 1), requires_grad=True)
    out = mappings.reduce_from_tp_region(b)
    assert torch.equal(out, torch.full((3,), 3.0))
    out.sum().backward()
    assert torch.equal(b.grad, torch.ones(3))

    # Vocab-parallel cross entropy with padding and label smoothing vs torch on the full logits.
    gen = torch.Generator().manual_seed(3)
    vocab, padded = 13, 16
    full = torch.randn(5, 4, padded, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (5, 4), generator=gen)
    labels[0, 0] = -100
    for eps in (0.0, 0.1):
        ref_in = full.clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(ref_in[..., :vocab].reshape(-1, vocab), labels.reshape(-1),
                                                reduction="none", label_smoothing=eps).view(5, 4)
        (ref * torch.arange(20.0, dtype=torch.float64).view(5, 4)).sum().backward()
        shard = full.chunk(2, dim=-1)[tp_rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, labels, vocab_size=vocab, label_smoothing=eps)
        (loss * torch.arange(20.0, dtype=torch.float64).view(5, 4)).sum().backward()
        torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(shard.grad, ref_in.grad.chunk(2, dim=-1)[tp_rank], rtol=1e-6, atol=1e-6)

    # The fused (Triton) local part gives the same loss and gradient as the PyTorch one; here it runs under
    # the interpreter on CPU (conftest sets TRITON_INTERPRET=1 before triton is imported).
    from megagopher import kernels
    shard32 = full.float().chunk(2, dim=-1)[tp_rank].contiguous()
    results = {}
    for backend in ("torch", "triton"):
        x = shard32.clone().requires_grad_()
        with kernels.use_backend(backend):
            loss = vocab_parallel_cross_entropy(x, labels, vocab_size=vocab, label_smoothing=0.1)
        (loss * torch.arange(20.0).view(5, 4)).sum().backward()
        results[backend] = (loss.detach(), x.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)

    # RNG streams: the tracker's differ across TP ranks and match across DP; the default one is shared.
    model_parallel_seed(99, tp_rank)
    with get_rng_tracker().fork():
        sharded = torch.rand(8)
    shared = torch.rand(8)
    everyone = [torch.empty(8) for _ in range(world)]
    dist.all_gather(everyone, sharded)
    all_shared = [torch.empty(8) for _ in range(world)]
    dist.all_gather(all_shared, shared)
    assert not torch.equal(everyone[0], everyone[1])  # TP ranks 0 and 1 of DP replica 0
    assert torch.equal(everyone[0], everyone[2]) and torch.equal(everyone[1], everyone[3])  # across DP
    assert all(torch.equal(all_shared[0], t) for t in all_shared)

    # Activation checkpointing replays dropout: gradients equal those without recomputation.
    cfg = _cfg("codegen", dropout=0.2, attention_dropout=0.2)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=gen)
    grads = {}
    for recompute in ("none", "full", "selective"):
        model_parallel_seed(5, tp_rank)
        model = GPTModel(cfg, sequence_parallel=True, recompute=recompute).initialize(1)
        model(ids, labels=ids).mean().backward()
        finalize_model_grads([model])
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for recompute in ("full", "selective"):
        for name, g in grads["none"].items():
            assert torch.equal(grads[recompute][name], g), f"recompute={recompute}: grad {name} differs"
    # Dropout really was active: a different seed changes the gradients.
    model_parallel_seed(6, tp_rank)
    model = GPTModel(cfg, sequence_parallel=True).initialize(1)
    model(ids, labels=ids).mean().backward()
    assert not torch.equal(model.layers["0"].mlp.fc1.weight.grad, grads["none"]["layers.0.mlp.fc1.weight"])
    # checkpoint() on a plain function with a non-tensor argument.
    t = torch.randn(4, requires_grad=True)
    checkpoint(lambda u, k: (u * k).sin(), t, 3.0).sum().backward()
    torch.testing.assert_close(t.grad, 3.0 * torch.cos(3.0 * t.detach()))
    return True


def test_tensor_parallel_matches_serial():
    checked = spawn(_tp_equivalence, 4)
    assert len(checked[0]) == 3 * 4


def test_mappings_cross_entropy_rng_and_recompute():
    assert spawn(_mappings_and_rng, 4) == [True] * 4
