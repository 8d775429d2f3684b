"""Cross-entropy Triton kernel, forward (per-token fp32 loss) and backward (softmax - onehot, recomputed
blockwise from the saved logsumexp), under the interpreter on CPU, against the float64 reference:
vocabularies spanning several blocks (the interpreter's block is 128 ids), ignore_index, large logits,
fp32 / fp16 / bf16 logits, int32 labels, a sum-reduced loss (stride-0 upstream gradient); and the local
part of a vocab-parallel cross entropy (shards with padding, label smoothing, z-loss, the gradient written
over the logits) combined as the TP ranks would. Outputs are allocated poisoned (NaN).

Tolerances (atol, rtol) per dtype of the logits, |got - want| <= atol + rtol |want| elementwise against
float64; the loss is fp32 whatever the logits' dtype, the gradient is rounded to the logits' dtype.
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels import reference
from megagopher.kernels._common import poison_outputs
from megagopher.kernels.fused_cross_entropy import vocab_parallel_local_grad, vocab_parallel_local_stats
from megagopher.kernels.testing import assert_ok, compare, measure, stable_seed

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (logits shape, dtype, logit scale)
CASES = [
    ((3, 17, 300), F32, 3.0),
    ((3, 17, 300), F16, 3.0),
    ((2, 5, 1000), BF16, 5.0),
    ((7, 1), F32, 1.0),          # a one-word vocabulary
    ((4, 257), F32, 60.0),       # large logits: the online max must keep exp in range
    ((3, 129), F16, 1.0),
]


def _inputs(shape, dtype, scale, seed, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=g)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < 0.2] = -100
    return logits, labels.to(label_dtype)


@pytest.mark.parametrize("shape,dtype,scale", CASES)
def test_cross_entropy_matches_reference(shape, dtype, scale):
    seed = stable_seed(("ce", shape))
    logits, labels = _inputs(shape, dtype, scale, seed)
    checks = compare("cross_entropy", (logits, labels), grad_args=(0,), names=("logits",), tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"cross_entropy {shape} {dtype} scale {scale}")


def test_cross_entropy_sum_reduced_int32_labels_and_ignored_rows():
    logits, labels = _inputs((3, 6, 200), F32, 2.0, seed=5, label_dtype=torch.int32)
    labels[1] = -100  # a whole sequence ignored
    x = logits.clone().requires_grad_()
    loss = kernels.cross_entropy(x, labels, backend="triton")
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    loss.sum().backward()  # the upstream gradient is an expanded (stride 0) tensor
    ref_x = logits.double().requires_grad_()
    ref = reference.cross_entropy(ref_x, labels.long())
    ref.sum().backward()
    assert_ok([measure("out", loss, ref, *TOL[F32]), measure("grad logits", x.grad, ref_x.grad, *TOL[F32])], "sum")
    assert torch.equal(loss[1], torch.zeros(6)) and torch.equal(x.grad[1], torch.zeros(6, 200))


@pytest.mark.parametrize("label_smoothing,dtype,z_loss,inplace", [(0.0, F32, 0.0, False), (0.1, F16, 0.0, False),
                                                                 (0.1, BF16, 1e-2, True)])
def test_vocab_parallel_local_part_matches_full_cross_entropy(label_smoothing, dtype, z_loss, inplace):
    # Three "TP ranks" hold 84 columns each of a vocabulary of 250 padded to 252; combining their local
    # stats as tensor_parallel/cross_entropy.py does must give the full cross entropy and its gradient
    # (with PaLM's z-loss, z_loss * logsumexp^2 per token, in the objective; written over the logits).
    vocab, tp, local = 250, 3, 84
    g = torch.Generator().manual_seed(21)
    logits = (3 * torch.randn(2, 7, tp * local, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[0, :2] = -100
    shards = logits.split(local, dim=-1)
    n_real = [min(local, max(0, vocab - r * local)) for r in range(tp)]
    with poison_outputs():
        stats = [vocab_parallel_local_stats(z, labels, r * local, n) for r, (z, n) in enumerate(zip(shards, n_real))]
        gmax = torch.stack([s.max for s in stats]).max(0).values
        lse = gmax + torch.stack([s.sum_exp * torch.exp(s.max - gmax) for s in stats]).sum(0).log()
        target = sum(s.target for s in stats)
        mean_z = sum(s.sum_logits for s in stats) / vocab
        loss = ((1 - label_smoothing) * (lse - target) + label_smoothing * (lse - mean_z)).masked_fill(labels == -100, 0)
        upstream = torch.randn(2, 7, generator=g)
        shards = [z.clone() for z in shards] if inplace else shards
        grads = [vocab_parallel_local_grad(z, labels, r * local, lse, upstream, n, label_smoothing=label_smoothing,
                                           vocab_size=vocab, z_loss=z_loss, out=z if inplace else None)
                 for r, (z, n) in enumerate(zip(shards, n_real))]
    assert not inplace or all(g.data_ptr() == z.data_ptr() for g, z in zip(grads, shards))
    grad = torch.cat(grads, -1)
    ref_x = logits[..., :vocab].double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_x.reshape(-1, vocab), labels.reshape(-1), reduction="none",
                                            label_smoothing=label_smoothing).view(2, 7)
    z_term = z_loss * torch.logsumexp(ref_x, -1) ** 2 * (labels != -100)
    (ref_grad,) = torch.autograd.grad(ref + z_term, ref_x, upstream.double())
    assert_ok([measure("loss", loss, ref, *TOL[F32]), measure("grad logits", grad[..., :vocab], ref_grad, *TOL[dtype])],
              f"vocab-parallel local part, smoothing {label_smoothing}")
    assert torch.equal(grad[..., vocab:], torch.zeros_like(grad[..., vocab:]))  # padding columns
