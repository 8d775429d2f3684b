"""The weight-gradient split of Zero Bubble pipeline parallelism (Qi et al. 2023, section 2).

The backward of a linear layer Y = X W^T is two independent matmuls: the input gradient dX = dY W (the
paper's B, which the previous stage waits for) and the weight gradient dW = dY^T X (the paper's W, which
only the optimizer needs). ZB-H1 runs B on the pipeline's critical path and W later, where 1F1B idles.

``linear(x, weight, bias)`` is plain ``F.linear`` unless ``store.capturing`` (only inside the zb-h1
schedule). Then it is an autograd function whose backward, while ``store.deferring``, computes dX and the
bias gradient (a cheap reduction) and queues (X, dY, weight) instead of computing dW: the W work is really
skipped in B, not relabelled. ``store.flush(key)`` closes the queue of one backward pass as a unit of W
work; ``store.run(key)`` does it later, adding each dW through ``param.accumulate_main_grad`` (the
data-parallel wrapper's entry, so its buckets see the gradient) when present, else into ``param.grad``.

This module depends on torch only: the tensor-parallel layers import it.
"""
import contextlib

import torch
import torch.nn.functional as F


class WeightGradStore:
    def __init__(self):
        self.capturing = False   # forward passes build deferrable linears
        self.deferring = False   # backward passes queue dW instead of computing it
        self._current = []       # dW work of the backward pass that is running: (weight, x, grad_out)
        self._units = {}         # key -> closed unit of W work

    def capture(self):
        """Context: forward passes inside build deferrable linears."""
        return self._switched_on("capturing")

    def defer(self):
        """Context: backward passes inside queue dW instead of computing it."""
        return self._switched_on("deferring")

    @contextlib.contextmanager
    def _switched_on(self, flag):
        # Restores the previous value rather than False, so the contexts nest.
        previous = getattr(self, flag)
        setattr(self, flag, True)
        try:
            yield self
        finally:
            setattr(self, flag, previous)

    def put(self, weight, x, grad_out):
        self._current.append((weight, x, grad_out))

    def flush(self, key):
        """Closes the W work queued since the last flush as the unit ``key`` (e.g. (microbatch, chunk))."""
        if key in self._units:
            raise RuntimeError(f"WeightGradStore: W work for {key} is already pending")
        self._units[key], self._current = self._current, []

    def run(self, key):
        """The W pass of unit ``key``: computes and accumulates every deferred weight gradient."""
        for weight, x, grad_out in self._units.pop(key):
            accumulate_weight_grad(weight, weight_grad(x, grad_out).to(weight.dtype))

    def pending(self):
        """Units of W work waiting (a backward pass whose queue is not flushed yet counts as one)."""
        return len(self._units) + bool(self._current)

    def clear(self):
        self._current, self._units = [], {}


store = WeightGradStore()


def weight_grad(x, grad_out):
    """dW = dY^T X over all leading (token) dimensions."""
    return grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


def accumulate_weight_grad(param, grad):
    if hasattr(param, "accumulate_main_grad"):
        param.accumulate_main_grad(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _DeferrableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.param = weight  # the Parameter itself (its Python attributes), to accumulate into later
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if store.deferring and ctx.param.is_leaf:
                store.put(ctx.param, x, grad_out)  # the W pass, later
            else:
                grad_weight = weight_grad(x, grad_out)
        return grad_x, grad_weight, grad_bias


def linear(x, weight, bias=None):
    """F.linear, with a deferrable weight gradient inside the zb-h1 schedule."""
    if not store.capturing:
        return F.linear(x, weight, bias)
    return _DeferrableLinear.apply(x, weight, bias)
