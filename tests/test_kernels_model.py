"""The Triton kernels inside the model: a tiny GPT trained for 3 steps on CPU in fp32 with
kernels.use_backend("triton") (the kernels under the interpreter) gives the losses and parameters of the
same training with "torch" (the references).

Tolerance: fp32 "to rounding": the kernels reorder fp32 sums (online softmax, blockwise reductions), so
losses and parameters may differ by a few ulps per step, never more than rtol 1e-5 / atol 1e-6.
Plain SGD keeps that rounding from being amplified (Adam's first step is a sign function of the gradient).
"""
import pytest
import torch

from megagopher import kernels
from megagopher.model import GPTModel
from layouts import FP32_ATOL as ATOL, FP32_RTOL as RTOL, model_config

# fused attention with GQA (one key/value group), RoPE, RMSNorm, SwiGLU; scaled-masked softmax (unfused
# attention), partial RoPE, LayerNorm, parallel residual, here with tied embeddings
FLAVOURS = {"llama": dict(num_query_groups=1), "codegen": dict(tie_embeddings=True)}


def _train(cfg, backend, steps=3):
    model = GPTModel(cfg).initialize(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=data)
    ids, labels = ids[:, :-1], ids[:, 1:]  # one batch, seen every step: the loss must go down
    losses = []
    with kernels.use_backend(backend):
        for _ in range(steps):
            loss = model(ids, labels=labels).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return torch.stack(losses), dict(model.named_parameters())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_triton_backend_trains_like_torch(flavour):
    # head dim 16: the smallest the fused attention kernel takes, so "triton" never falls back
    cfg = model_config(flavour, num_attention_heads=2, vocab_size=50, **FLAVOURS[flavour])
    ref_losses, ref_params = _train(cfg, "torch")
    losses, params = _train(cfg, "triton")
    assert ref_losses[-1] < ref_losses[0]  # it trains
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
