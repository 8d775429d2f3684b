"""Forward-backward schedules over the micro-batches of one global batch.

``forward_backward(model_chunks, microbatches, loss_fn, schedule)`` is the one entry point the trainer
calls. ``loss_fn(per_token_loss) -> scalar`` turns a micro-batch's per-token losses into what is
backpropagated (the trainer divides by the global batch's token count, invariant 3, and applies the loss
scale). The return value is the sum of the per-token losses this rank computed (a tensor; 0 on ranks
without the loss), for logging.

Gradient synchronisation happens only after the last micro-batch: every earlier backward runs under the
data-parallel wrapper's ``no_sync()``.
"""
import contextlib

import torch


def _no_sync(model):
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def forward_backward_no_pipelining(model_chunks, microbatches, loss_fn):
    """pp = 1: plain gradient accumulation over the micro-batches."""
    if len(model_chunks) != 1:
        raise ValueError(f"without pipelining there is one model chunk, got {len(model_chunks)}")
    model = model_chunks[0]
    total = torch.zeros(())
    for i, mb in enumerate(microbatches):
        last = i == len(microbatches) - 1
        with contextlib.nullcontext() if last else _no_sync(model):
            per_token = model(mb["tokens"], labels=mb["labels"])
            loss_fn(per_token).backward()
        total = total + per_token.detach().float().sum().cpu()
    return total


def forward_backward(model_chunks, microbatches, loss_fn, schedule="1f1b", **kwargs):
    from megagopher import parallel_state as ps
    if ps.get_pp_size() == 1:
        return forward_backward_no_pipelining(model_chunks, microbatches, loss_fn)
    raise ValueError(f"parallel.pp = {ps.get_pp_size()}: pipeline schedules are not available yet")


@torch.no_grad()
def forward_only(model_chunks, microbatches):
    """Evaluation: forward passes only; returns the sum of per-token losses on this rank (0 without loss)."""
    from megagopher import parallel_state as ps
    if ps.get_pp_size() != 1:
        raise ValueError("forward_only with pipeline parallelism is not available yet")
    total = torch.zeros(())
    for mb in microbatches:
        total = total + model_chunks[0](mb["tokens"], labels=mb["labels"]).float().sum().cpu()
    return total
