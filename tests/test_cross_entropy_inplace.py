"""The model's loss: vocab-parallel cross entropy whose gradient is written over the logits in the forward
(Liger-Kernel's scheme), with PaLM's z-loss, on the PyTorch path (row chunks) and the Triton kernels (under
the interpreter), against float64 formulas written from the definitions:
    loss_t = (1 - eps) (lse_t - z_t[label]) + eps (lse_t - mean_j z_tj),  z-loss_t = c * lse_t^2,
over the real vocabulary (padding columns excluded), 0 on ignored tokens, and the gradient of their sum.

Also: the gradient handed on is the logits' own storage and no logits-sized tensor is allocated in the
forward or the backward (torch's CPU memory profiler, with a control that allocates one); the default
leaves the logits untouched, evaluation writes nothing; autograd refuses a later use of the overwritten
logits; tp = 2 equals tp = 1; a short training with z_loss > 0 logs ``z_loss`` and the same step-1 loss.

Tolerances (atol, rtol) per dtype of the logits are those of tests/test_kernels_cross_entropy.py.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megagopher import kernels
from megagopher.kernels.testing import assert_ok, measure
from megagopher.tensor_parallel import cross_entropy as ce
from megagopher.testing import spawn
from train_utils import read_metrics, run_train, write_config

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BACKENDS = ["torch", "triton"]

# (token shape, columns, real vocabulary, dtype, label smoothing, z-loss coefficient, logit scale). The
# interpreter's block is 128 columns and the torch path's chunk 7 rows (set below): neither divides.
CASES = [
    ((3, 17), 300, 300, F32, 0.0, 0.0, 3.0),
    ((3, 17), 300, 291, F16, 0.1, 1e-3, 3.0),
    ((2, 5), 1000, 997, BF16, 0.0, 1e-2, 5.0),
    ((4,), 257, 250, F32, 0.1, 1e-4, 30.0),   # large logits: lse ~ 100, a z-term gradient comparable to CE's
    ((3, 7), 129, 129, F32, 0.0, 0.05, 1.0),
]


def _inputs(shape, columns, vocab, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, columns, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.2] = -100
    return logits, labels, torch.randn(shape, generator=g)


def _reference(logits, labels, vocab, eps, z_coef, upstream):
    """float64 (loss, z-loss terms, d (upstream . (loss + z-loss)) / d logits over the real columns)."""
    x = logits[..., :vocab].double().requires_grad_()
    keep = labels != -100
    lse = torch.logsumexp(x, dim=-1)
    log_p = x - lse.unsqueeze(-1)
    nll = -log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = torch.where(keep, (1 - eps) * nll + eps * -log_p.mean(dim=-1), 0.0)
    z_term = torch.where(keep, z_coef * lse ** 2, 0.0)  # PaLM: z_loss * log(Z)^2, Z the softmax normaliser
    (grad,) = torch.autograd.grad(loss + z_term, x, upstream.double())
    return loss.detach(), z_term.detach(), grad


def _run(values, labels, upstream, vocab, eps, z_coef, backend, inplace=True):
    """(loss, gradient of the source, data_ptr of the gradient the logits received, logits, ZLoss)."""
    source = values.clone().requires_grad_()
    logits = source.clone()  # a non-leaf, as the model's are; CloneBackward hands the gradient on as it is
    seen = {}
    logits.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    recorder = ce.ZLoss(z_coef)
    with kernels.use_backend(backend):
        loss = ce.vocab_parallel_cross_entropy(logits, labels, vocab, eps, z_loss=recorder, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, source, upstream)
    return loss.detach(), grad, seen["ptr"], logits, recorder


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,columns,vocab,dtype,eps,z_coef,scale", CASES)
def test_inplace_loss_and_gradient_match_float64(backend, shape, columns, vocab, dtype, eps, z_coef, scale,
                                                 monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 7 * columns)
    values, labels, upstream = _inputs(shape, columns, vocab, dtype, scale, seed=columns + len(shape))
    loss, grad, grad_ptr, logits, recorder = _run(values, labels, upstream, vocab, eps, z_coef, backend)
    ref_loss, ref_z, ref_grad = _reference(values, labels, vocab, eps, z_coef, upstream)
    where = f"{backend} {shape}x{columns} (vocab {vocab}) {dtype} eps {eps} z {z_coef}"
    assert loss.dtype == F32 and loss.shape == labels.shape
    assert_ok([measure("loss", loss, ref_loss, *TOL[F32]),
               measure("grad logits", grad[..., :vocab], ref_grad, *TOL[dtype])], where)
    assert torch.equal(grad[..., vocab:], torch.zeros_like(grad[..., vocab:])), f"{where}: padding columns"
    assert torch.equal(grad[labels == -100], torch.zeros_like(grad[labels == -100])), f"{where}: ignored rows"
    assert grad_ptr == logits.data_ptr() == grad.data_ptr(), f"{where}: the gradient is not the logits' buffer"
    assert recorder.pop() == pytest.approx(ref_z.sum().item(), rel=1e-5, abs=1e-9), f"{where}: z-loss term"


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_leaves_logits_alone_and_evaluation_writes_nothing(backend):
    values, labels, upstream = _inputs((4, 9), 300, 290, BF16, 3.0, seed=2)
    loss, grad, _, logits, _ = _run(values, labels, upstream, 290, 0.1, 1e-3, backend, inplace=False)
    assert torch.equal(logits.detach(), values) and logits._version == 0
    loss_inplace, grad_inplace, *_ = _run(values, labels, upstream, 290, 0.1, 1e-3, backend)
    assert torch.equal(loss, loss_inplace) and torch.equal(grad, grad_inplace)
    recorder = ce.ZLoss(1e-3)
    logits = values.clone().requires_grad_()
    with torch.no_grad(), kernels.use_backend(backend):
        loss_eval = ce.vocab_parallel_cross_entropy(logits, labels, 290, 0.1, z_loss=recorder, inplace_backward=True)
    assert torch.equal(logits.detach(), values) and torch.equal(loss_eval, loss) and recorder.pop() == 0.0
    transposed = values.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    for untouchable in (values.clone().requires_grad_(), values.clone().requires_grad_().clone()[:],
                        transposed.clone()):  # clone keeps the strides: rows not one (rows, V) view
        # a leaf, a view, an intermediate of another layout: each gets a new buffer
        before = untouchable.detach().clone()
        with kernels.use_backend(backend):
            loss_kept = ce.vocab_parallel_cross_entropy(untouchable, labels, 290, 0.1, z_loss=1e-3,
                                                        inplace_backward=True)
        (grad_kept,) = torch.autograd.grad(loss_kept, untouchable, upstream)
        assert torch.equal(untouchable.detach(), before) and torch.equal(grad_kept, grad)


def _allocations(values, labels, backend, inplace):
    """Bytes of the largest tensor any op allocated in the forward and backward, and the logits' bytes."""
    source = values.clone().requires_grad_()
    logits = source.clone()
    with kernels.use_backend(backend), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = ce.vocab_parallel_cross_entropy(logits, labels, 290, 0.1, z_loss=1e-3, inplace_backward=inplace)
        torch.autograd.grad(loss.sum(), source)
    return max(e.cpu_memory_usage for e in prof.events()), values.numel() * values.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_no_logits_sized_allocation(backend, dtype, monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 7 * 300)  # fp32 chunks of 8400 bytes
    values, labels, _ = _inputs((64,), 300, 290, dtype, 3.0, seed=4)
    largest, logits_bytes = _allocations(values, labels, backend, inplace=True)
    assert largest <= 7 * 300 * 4 < logits_bytes / 4, f"{backend} {dtype}: a {largest}-byte allocation"
    largest, _ = _allocations(values, labels, backend, inplace=False)  # the probe sees a gradient buffer
    assert largest >= logits_bytes, f"{backend} {dtype}: the control allocated at most {largest} bytes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_refuses_a_use_of_the_overwritten_logits(backend):
    values, labels, _ = _inputs((5,), 300, 300, F32, 3.0, seed=6)
    with kernels.use_backend(backend):
        logits = values.clone().requires_grad_().clone()
        loss = ce.vocab_parallel_cross_entropy(logits, labels, inplace_backward=True)
        with pytest.raises(RuntimeError, match="overwrote the logits"):
            (loss.sum() + logits.sum()).backward()
        logits = values.clone().requires_grad_().clone()
        saved_by_sin = logits.sin()
        loss = ce.vocab_parallel_cross_entropy(logits, labels, inplace_backward=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (loss.sum() + saved_by_sin.sum()).backward()
        logits = values.clone().requires_grad_().clone()
        loss = ce.vocab_parallel_cross_entropy(logits, labels, inplace_backward=True).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()


def _tp2_equals_tp1(rank, world):
    import torch.distributed as dist
    values, labels, upstream = _inputs((3, 5), 300, 291, F32, 3.0, seed=8)
    for backend in BACKENDS:
        for eps, z_coef in ((0.0, 0.0), (0.1, 1e-2)):
            serial_loss, serial_grad, *_ = _run(values, labels, upstream, 291, eps, z_coef, backend)
            shard = values.chunk(world, dim=-1)[rank].clone().requires_grad_()
            logits = shard.clone()
            recorder = ce.ZLoss(z_coef)
            with kernels.use_backend(backend):
                loss = ce.vocab_parallel_cross_entropy(logits, labels, 291, eps, group=dist.group.WORLD,
                                                       z_loss=recorder, inplace_backward=True)
            (grad,) = torch.autograd.grad(loss, shard, upstream)
            torch.testing.assert_close(loss, serial_loss, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(grad, serial_grad.chunk(world, dim=-1)[rank], rtol=1e-5, atol=1e-6)
            _, ref_z, _ = _reference(values, labels, 291, eps, z_coef, upstream)
            assert recorder.pop() == pytest.approx(ref_z.sum().item(), rel=1e-5, abs=1e-9)
    return True


def test_tp2_equals_tp1():
    assert spawn(_tp2_equals_tp1, 2) == [True, True]


def test_training_with_z_loss_logs_it_and_the_same_first_loss(tmp_path):
    cfg = write_config(tmp_path)
    runs = {}
    for name, nproc, extra in (("plain", 1, ()), ("z", 1, ("--training.z_loss=0.1",)),
                               ("z_pp2", 2, ("--training.z_loss=0.1", "--parallel.pp=2"))):
        run_dir = str(tmp_path / name)
        run_train(cfg, run_dir, "--training.train_iters=2", *extra, nproc=nproc)
        runs[name] = read_metrics(run_dir)
    plain, z, z_pp2 = runs["plain"], runs["z"], runs["z_pp2"]
    assert all("z_loss" not in row for row in plain)
    assert z[0]["loss"] == plain[0]["loss"]  # same weights, and the logged loss is the LM cross entropy alone
    assert z[1]["loss"] != plain[1]["loss"]  # the z-loss's gradient moved the first update
    # At initialisation the logits are near 0, so lse ~ log(90 real ids) and the term ~ 0.1 * log(90)^2.
    assert z[0]["z_loss"] == pytest.approx(0.1 * torch.log(torch.tensor(90.0)).item() ** 2, rel=0.05)
    for a, b in zip(z, z_pp2):  # only the last pipeline stage computes it: reduced as the loss is
        assert b["z_loss"] == pytest.approx(a["z_loss"], rel=1e-5) and b["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_small_gradients_keep_their_precision(backend):
    # A loss-scaled upstream gradient (512) makes p * 512 a normal fp16 number even where the probability
    # p itself is subnormal in fp16 (< 6e-5): stored before that scale is known, it would lose its digits.
    values, labels, _ = _inputs((6,), 1000, 1000, F16, 3.0, seed=9)
    upstream = torch.full((6,), 512.0)
    _, grad, *_ = _run(values, labels, upstream, 1000, 0.0, 0.0, backend)
    _, _, ref = _reference(values, labels, 1000, 0.0, 0.0, upstream)
    normal = ref.abs() > 1e-3
    assert (ref.abs() / 512 < 6e-5)[normal].sum() > 100  # entries whose probability is subnormal in fp16
    rel = ((grad.double() - ref).abs() / ref.abs())[normal]
    assert rel.max() < 2 ** -9, f"{backend}: relative error {rel.max():.2e} on normal fp16 gradients"
