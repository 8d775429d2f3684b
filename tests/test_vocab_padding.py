"""Tensor-parallel ranks whose vocabulary shard holds no real id (issue 24, item 2).

The vocabulary is padded to a multiple of make_vocab_size_divisible_by * tp (Megatron-LM's rule): 256 ids
at the default 128 become 512 columns at tp 4 (ranks 2, 3: 128 padding columns each) and 1024 at tp 8
(ranks 2-7). Such a rank must add nothing to the loss (max = -inf, sum of exp = 0) and receive a zero
gradient; the PyTorch path once took the max of an empty slice of its shard and raised IndexError.

Checked, in one spawn of 8 gloo ranks:
- the loss alone, every path (PyTorch, the fused Triton kernels under the interpreter, label smoothing,
  z-loss, the in-place gradient and a new buffer, evaluation, a shard of zero rows) at tp 4 and 8, against
  float64 formulas on the real vocabulary;
- a Llama-flavoured model (RMSNorm, SwiGLU, RoPE, GQA) with label smoothing, z-loss and sequence
  parallelism at tp 4 (x dp 2) and tp 8: per-step losses, first-step per-parameter gradients and the
  parameters after three AdamW steps equal the serial run's (tests/layouts.py's harness and fp32 bounds),
  and the padding rows of the vocabulary-parallel weights receive no gradient.
And through the trainer (torchrun, 8 ranks): the tp 4 x dp 2 run logs the serial run's losses and saves
its weights and Adam moments, and its checkpoint of iteration 2 resumes and continues exactly as the
uninterrupted run.
"""
import pytest
import torch

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.tensor_parallel import cross_entropy as ce, pad_vocab_size
from megagopher.testing import spawn
from layouts import FP32_ATOL as ATOL, FP32_RTOL as RTOL, check_equal, model_config, train
from train_utils import (GOLDEN, GRAD_RTOL, STATE_RTOL, TINY, assert_same_training_state, read_metrics, run_train,
                         write_config)

VOCAB, MULTIPLE = 256, 128  # padded to 512 at tp 4 and 1024 at tp 8: ranks from 2 on hold padding only
LOSS_RTOL = 1e-5  # the trainer's logged losses, as tests/test_train.py's golden check
# (backend, label smoothing, z-loss, in place) of the loss checks: every combination on PyTorch; the
# interpreter runs each row's kernel program in Python (about a second a call), so Triton takes three.
CASES = [("torch", eps, z, inplace) for eps in (0.0, 0.1) for z in (0.0, 1e-2) for inplace in (True, False)] + [
    ("triton", 0.0, 0.0, True), ("triton", 0.1, 1e-2, True), ("triton", 0.1, 1e-2, False)]
# The Llama flavour (RMSNorm, SwiGLU, RoPE, GQA), with 8 key/value groups of 2 heads so tp 8 splits them.
MODEL = dict(vocab_size=VOCAB, make_vocab_size_divisible_by=MULTIPLE, hidden_size=64, num_attention_heads=16,
             num_query_groups=8, label_smoothing=0.1)
Z_LOSS = 1e-2


def _reference(full, labels, eps, z_coef, upstream):
    """float64 (loss, d (upstream . (loss + z_coef lse^2)) / d logits over the padded columns)."""
    x = full.double().requires_grad_()
    real = x[..., :VOCAB]
    keep = labels != -100
    lse = torch.logsumexp(real, dim=-1)
    log_p = real - lse.unsqueeze(-1)
    nll = -log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = torch.where(keep, (1 - eps) * nll + eps * -log_p.mean(dim=-1), 0.0)
    objective = loss + torch.where(keep, z_coef * lse ** 2, 0.0)
    (grad,) = torch.autograd.grad(objective, x, upstream.double())
    return loss.detach(), grad


def _shard_loss(full, labels, upstream, eps, z_coef, backend, inplace):
    """This rank's (loss, gradient of its shard) of ``full`` under the current TP group."""
    tp, rank = ps.get_tp_size(), ps.get_tp_rank()
    source = full.chunk(tp, dim=-1)[rank].clone().requires_grad_()
    logits = source.clone()  # a non-leaf, as the model's logits are: the in-place scheme applies
    with kernels.use_backend(backend):
        loss = ce.vocab_parallel_cross_entropy(logits, labels, VOCAB, eps, z_loss=z_coef, inplace_backward=inplace)
        with torch.no_grad():
            evaluated = ce.vocab_parallel_cross_entropy(source, labels, VOCAB, eps, z_loss=z_coef)
    (grad,) = torch.autograd.grad(loss, source, upstream)
    torch.testing.assert_close(evaluated, loss.detach(), rtol=0, atol=0)
    return loss.detach(), grad


def _check_loss_paths(tp):
    """Every path of the loss at this TP size against the float64 reference; returns the cases checked."""
    gen = torch.Generator().manual_seed(tp)
    width = pad_vocab_size(VOCAB, tp, MULTIPLE)
    assert width == {4: 512, 8: 1024}[tp]  # the layout this file is about: ranks from 2 on hold padding only
    full = 3.0 * torch.randn(2, 3, width, generator=gen)
    labels = torch.randint(0, VOCAB, (2, 3), generator=gen)
    labels[0, 0], labels[1, 0], labels[1, 1] = -100, 0, VOCAB - 1  # the real vocabulary's first and last ids
    upstream = torch.randn(2, 3, generator=gen)
    padding_only = ps.get_tp_rank() * width // tp >= VOCAB
    checked = []
    for backend, eps, z_coef, inplace in CASES:
        where = f"tp {tp} rank {ps.get_tp_rank()} {backend} eps {eps} z {z_coef} inplace {inplace}"
        loss, grad = _shard_loss(full, labels, upstream, eps, z_coef, backend, inplace)
        ref_loss, ref_grad = _reference(full, labels, eps, z_coef, upstream)
        torch.testing.assert_close(loss, ref_loss.float(), rtol=RTOL, atol=ATOL, msg=where)
        shard_ref = ref_grad.chunk(tp, dim=-1)[ps.get_tp_rank()].float()
        torch.testing.assert_close(grad, shard_ref, rtol=RTOL, atol=ATOL, msg=where)
        assert not padding_only or torch.count_nonzero(grad) == 0, f"{where}: padding got a gradient"
        checked.append(where)
    for backend in ("torch", "triton"):
        # A shard of zero rows (no tokens) gives an empty loss and an empty gradient on every path.
        with kernels.use_backend(backend):
            empty = full[:0].chunk(tp, dim=-1)[ps.get_tp_rank()].clone().requires_grad_()
            loss = ce.vocab_parallel_cross_entropy(empty.clone(), labels[:0], VOCAB, 0.1, z_loss=1e-2,
                                                   inplace_backward=True)
            loss.sum().backward()
        assert loss.shape == (0, 3) and empty.grad.shape == empty.shape, f"tp {tp} {backend}: zero rows"
    return checked


def _padding_rows(param, tensor):
    """The rows of this rank's shard of a vocabulary-parallel ``param`` that lie past the real vocabulary."""
    if getattr(param, "partition_dim", None) != 0 or ps.get_tp_size() == 1:
        return tensor[:0]
    start = ps.get_tp_rank() * tensor.shape[0]
    return tensor[max(0, param.full_shape[0] - start):]


def _with_z_loss(step, microbatch, last, chunk):
    chunk.module.z_loss = Z_LOSS  # what the trainer's loop sets from training.z_loss


def _padding_gets_no_gradient(step, chunks, optimizer):
    for name, p in chunks[0].module.named_parameters():
        assert torch.count_nonzero(_padding_rows(p, p.main_grad)) == 0, f"step {step}: padding of {name} got a gradient"


def _padding_only_ranks(rank, world):
    checked = []
    for tp in (4, 8):
        ps.initialize_model_parallel(tp=tp)
        checked += _check_loss_paths(tp)
        ps.destroy_model_parallel()
    cfg = model_config("llama", **MODEL)
    hooks = dict(on_microbatch=_with_z_loss, before_step=_padding_gets_no_gradient)
    serial, _ = train(cfg, **hooks)
    for tp in (4, 8):  # tp 4 runs as tp 4 x dp 2
        check_equal(f"vocab {VOCAB} at tp {tp} with SP", train(cfg, tp=tp, sp=True, **hooks)[0], serial)
        checked.append(f"model tp {tp}")
    return checked


def test_padding_only_shards_match_serial():
    checked = spawn(_padding_only_ranks, 8)
    assert len(checked[0]) == 2 * len(CASES) + 2, checked[0]


# The trainer's tiny Llama (tests/train_utils.py) with the 256-id vocabulary at the default multiple, and 8
# heads in 4 key/value groups so that tp 4 splits them.
PADDED_CHANGES = (("vocab_size = 90", f"vocab_size = {VOCAB}"), ("train_iters = 4", "train_iters = 5"),
                  ("make_vocab_size_divisible_by = 8", f"make_vocab_size_divisible_by = {MULTIPLE}"),
                  ("num_attention_heads = 4", "num_attention_heads = 8"),
                  ("num_query_groups = 2", "num_query_groups = 4"))
LOSS_ARGS = ("--model.label_smoothing=0.1", f"--training.z_loss={Z_LOSS}", *GOLDEN)
TP4_DP2 = ("--parallel.tp=4", "--parallel.sp=true")


def test_padding_only_checkpoint_resumes_at_tp4_dp2(tmp_path):
    """The reported crash: resuming a tp 4 x dp 2 checkpoint of this model raised the loss's IndexError."""
    text = TINY
    for old, new in PADDED_CHANGES:
        assert old in text, f"tests/train_utils.py TINY no longer has {old!r}"
        text = text.replace(old, new)
    cfg = write_config(tmp_path, text)
    runs = {}
    for name, nproc, extra in (("serial", 1, ()), ("whole", 8, TP4_DP2),
                               ("stopped", 8, (*TP4_DP2, "--training.exit_after_iters=2")),
                               ("resumed", 8, (*TP4_DP2, "--checkpoint.load=auto"))):
        run_dir = str(tmp_path / ("resumed" if name == "stopped" else name))
        run_train(cfg, run_dir, *LOSS_ARGS, *extra, f"--checkpoint.dir={run_dir}_ckpt", "--checkpoint.save_interval=1",
                  nproc=nproc)
        runs[name] = [(r["iteration"], r["loss"]) for r in read_metrics(run_dir)]
    serial, whole, resumed = runs["serial"], runs["whole"], runs["resumed"]
    assert [it for it, _ in runs["stopped"]] == [1, 2], runs  # else "resumed" would have nothing to resume
    assert [it for it, _ in whole] == [1, 2, 3, 4, 5] and [it for it, _ in resumed] == [1, 2, 3, 4, 5], runs
    assert [loss for _, loss in whole] == pytest.approx([loss for _, loss in serial], rel=LOSS_RTOL)
    assert_same_training_state(tmp_path / "whole_ckpt", tmp_path / "serial_ckpt", 1, GRAD_RTOL, kinds=("exp_avg",),
                               what="tp4 x dp2 vs serial")
    assert_same_training_state(tmp_path / "whole_ckpt", tmp_path / "serial_ckpt", 5, STATE_RTOL,
                               kinds=("param", "exp_avg", "exp_avg_sq"), what="tp4 x dp2 vs serial")
    assert resumed == whole  # same layout, same order of sums: the resumed run continues to the bit
    assert_same_training_state(tmp_path / "resumed_ckpt", tmp_path / "whole_ckpt", 5, 0.0,
                               kinds=("param", "exp_avg", "exp_avg_sq"), what="resumed vs uninterrupted")
