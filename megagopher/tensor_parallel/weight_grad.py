"""Weight gradients of the linear layers: gradient-accumulation fusion and the weight-gradient split of Zero
Bubble pipeline parallelism (Qi et al. 2023, section 2).

The backward of a linear layer Y = X W^T is two independent matmuls: the input gradient dX = dY W (the
paper's B, which the previous stage waits for) and the weight gradient dW = dY^T X (the paper's W, which
only the optimizer needs). ZB-H1 runs B on the pipeline's critical path and W later, where 1F1B idles.

``linear(x, weight, bias)`` is plain ``F.linear`` unless ``store.capturing`` (only inside the zb-h1
schedule). Then it is an autograd function whose backward, while ``store.deferring``, computes dX and the
bias gradient (a cheap reduction) and queues (X, dY, weight) instead of computing dW: the W work is really
skipped in B, not relabelled. ``store.flush(key)`` closes the queue of one backward pass as a unit of W
work; ``store.run(key)`` does it later.

Gradient-accumulation fusion (Megatron's ``gradient_accumulation_fusion``). Under the data-parallel wrapper
every parameter has ``main_grad``, an fp32 view into the flat gradient buffer. ``accumulate_weight_grad``
runs the weight-gradient GEMM with that buffer as its accumulator (main_grad += dY^T X), in every
micro-batch and in ZB-H1's W pass alike: no model-dtype dW is allocated, rounded and then added. The
linear's backward then returns no weight gradient to autograd, so the wrapper's post-accumulate hook sees
``param.grad is None`` and adds nothing; the wrapper still has to learn that the gradient is in (its
bucket may be complete), and its one entry for that is ``param.accumulate_main_grad(grad)``, which adds
``grad`` and marks the parameter ready: it is called with None, which marks it ready and adds nothing
(no extra elementwise pass over main_grad). Without the wrapper (no ``main_grad``) dW goes to
``param.grad`` as autograd would put it there.

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
            accumulate_weight_grad(weight, x, grad_out)

    def pending(self):
        """Units of W work waiting (a backward pass whose queue is not flushed yet counts as one)."""
        return len(self._units) + bool(self._current)

    def clear(self):
        self._current, self._units = [], {}


store = WeightGradStore()

# cuBLAS GEMMs of bf16/fp16 operands into an fp32 accumulator through addmm(out_dtype=float32) take an
# fp32 ``self`` only in recent torch (pytorch#167931); older versions widen the operands instead.
_MIXED_DTYPE_ADDMM = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 11)


def weight_grad(x, grad_out):
    """dW = dY^T X over all leading (token) dimensions."""
    return grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


def weight_grad_into(main_grad, x, grad_out):
    """main_grad += dY^T X, the GEMM accumulating in main_grad's fp32 (Megatron's wgrad_gemm_accum_fp32)."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    acc = main_grad.view(g2.shape[-1], x2.shape[-1])
    if x2.dtype == acc.dtype:
        acc.addmm_(g2.t(), x2)
    elif acc.is_cuda and _MIXED_DTYPE_ADDMM:  # bf16/fp16 operands, fp32 accumulator and output
        torch.addmm(acc, g2.t(), x2, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype GEMM here (CPU, older torch): the operands are widened, transiently
        acc.addmm_(g2.t().to(acc.dtype), x2.to(acc.dtype))


@torch.no_grad()  # the W pass runs outside autograd's backward: no history into the gradient buffers
def accumulate_weight_grad(param, x, grad_out):
    """Adds dW = dY^T X to ``param``'s gradient: into ``main_grad`` by the GEMM itself when the data-parallel
    wrapper gave it one, else through the wrapper's entry or into ``param.grad``."""
    if getattr(param, "main_grad", None) is not None:
        weight_grad_into(param.main_grad, x, grad_out)
        if hasattr(param, "accumulate_main_grad"):
            param.accumulate_main_grad(None)  # the GEMM wrote main_grad: only mark the parameter ready
        return
    grad = weight_grad(x, grad_out).to(param.dtype)
    if hasattr(param, "accumulate_main_grad"):
        param.accumulate_main_grad(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def backward_weight_grad(param, x, grad_out, deferrable, fuse=True):
    """The weight gradient a linear's backward returns to autograd: None when the W work is queued for
    ZB-H1's W pass (``deferrable``: the forward ran under ``store.capture()``) or, with ``fuse``, already
    accumulated into ``main_grad``; dW otherwise. ``fuse`` is off for a weight that another autograd use
    still reaches in the same backward (the tied output head): its gradient must be complete when the
    wrapper's hook marks it ready."""
    if deferrable and store.deferring and param.is_leaf:
        store.put(param, x, grad_out)  # the W pass, later
        return None
    if fuse and param.is_leaf and getattr(param, "main_grad", None) is not None:
        accumulate_weight_grad(param, x, grad_out)
        return None
    return weight_grad(x, grad_out)


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
            grad_weight = backward_weight_grad(ctx.param, x, grad_out, deferrable=True)
        return grad_x, grad_weight, grad_bias


def linear(x, weight, bias=None):
    """F.linear, with a deferrable weight gradient inside the zb-h1 schedule (the tensor-parallel layers
    use their own function, tensor_parallel/layers.py, which also fuses and overlaps)."""
    if not store.capturing:
        return F.linear(x, weight, bias)
    return _DeferrableLinear.apply(x, weight, bias)
