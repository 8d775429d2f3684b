"""Tensor-parallel layers (Shoeybi et al. 2019): column- and row-parallel linears and a vocab-parallel
embedding. They return tensors (not Megatron's ``(output, bias)`` tuples) and work in any PyTorch model.

Initialisation is layout-independent (invariant 1): every parameter records its full, unsharded shape,
which dimension is split over TP, and how to initialise it. ``init_parameters(module, seed)`` then draws
each full tensor from a generator seeded by (seed, parameter name) and copies this rank's shard into the
parameter, so every layout starts from exactly the serial model's weights.

Parameter attributes used by the rest of megagopher:
    tensor_model_parallel  True when the tensor is a shard (counted on every TP rank in norms)
    partition_dim          the split dimension, or None
    sequence_parallel      a replicated parameter that sees only this rank's sequence chunk: its gradient
                           must be summed over TP after the backward (distributed/finalize.py)

Every linear here runs one autograd function, ``LinearWithGradAccumulationAndAsyncCommunication``
(Megatron's name), for one weight or for several that read the same input (``column_parallel_linears``:
the attention and MLP of a parallel-residual layer). It owns the input's TP communication, so that input is
communicated once whatever the number of its consumers:

- forward: under sequence parallelism the input is all-gathered along the sequence and the gathered copy
  is kept for the weight gradients (no second all-gather in the backward); without it the input is used
  as it is (*f*'s identity);
- backward: dX = sum_i dY_i W_i is computed first and its all-reduce (reduce-scatter under sequence
  parallelism) launched with ``async_op=True``; the weight gradients dW_i = dY_i^T X run while it is in
  flight (accumulated straight into the fp32 ``main_grad`` under the data-parallel wrapper, or queued for
  ZB-H1's W pass: tensor_parallel/weight_grad.py); the handle is waited on last.

On CUDA the overlap needs ``CUDA_DEVICE_MAX_CONNECTIONS=1`` in the environment before the CUDA context is
created (Megatron's requirement): with one hardware work queue the GPU schedules the kernels of every
stream in the order they were issued, so the collective (on the communicator's stream), issued first,
gets its SMs before the weight-gradient GEMM fills the device, instead of waiting behind it. The layers
warn once when it is not set.
"""
import functools
import hashlib
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagopher import parallel_state as ps
from megagopher.tensor_parallel import mappings
from megagopher.tensor_parallel.weight_grad import backward_weight_grad, store


def _tp(group):
    group = group if group is not None else (ps.get_tp_group() if ps.is_initialized() else None)
    if group is None:
        return None, 1, 0
    import torch.distributed as dist
    return group, dist.get_world_size(group), dist.get_rank(group)


def set_init(param, full_shape, partition_dim=None, std=0.02, fill=None, init_name=None, init_parts=None):
    """Records how ``param`` is initialised: normal(0, std) over ``full_shape`` (or constant ``fill``),
    split along ``partition_dim``. ``init_name`` makes a copy start from another parameter's values
    (the output head of a tied embedding on the last pipeline stage). ``init_parts`` (names such as
    "fc_up.weight", relative to the parameter's module's parent): the rows interleave that many parts,
    row i of part j at row i * len(init_parts) + j, each drawn as a parameter of that name would be (the
    fused SwiGLU projection starts from the values of the separate gate and up projections)."""
    param.full_shape = tuple(full_shape)
    param.partition_dim = partition_dim
    param.tensor_model_parallel = partition_dim is not None
    param.init_std, param.init_fill, param.init_name = std, fill, init_name
    param.init_parts = tuple(init_parts) if init_parts else None
    return param


def seed_for(seed, name):
    """A 63-bit generator seed from (seed, parameter name): independent of layout and process."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_tensor(param, name, seed):
    """The full, unsharded initial value of ``param`` (fp32, CPU)."""
    if param.init_fill is not None:
        return torch.full(param.full_shape, float(param.init_fill))
    parts = getattr(param, "init_parts", None)
    if parts:
        k, shape = len(parts), param.full_shape
        base = name.split(".")
        drawn = [_normal((shape[0] // k,) + shape[1:], param.init_std,
                         seed_for(seed, ".".join(base[:len(base) - len(p.split("."))] + [p]))) for p in parts]
        return torch.stack(drawn, dim=1).reshape(shape)
    return _normal(param.full_shape, param.init_std, seed_for(seed, param.init_name or name))


def _normal(shape, std, generator_seed):
    return torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(generator_seed))


@torch.no_grad()
def init_parameters(module, seed, tp_rank=None, tp_size=None):
    """Initialises every parameter of ``module`` that carries ``set_init`` metadata from its full tensor."""
    tp_rank = ps.get_tp_rank() if tp_rank is None else tp_rank
    tp_size = ps.get_tp_size() if tp_size is None else tp_size
    for name, param in module.named_parameters():
        if not hasattr(param, "full_shape"):
            continue
        param.copy_(take_shard(param, full_init_tensor(param, name, seed), tp_rank, tp_size).to(param.dtype))


def take_shard(param, full, tp_rank, tp_size):
    """This TP rank's slice of ``full`` (the unpadded whole of ``param``) along its split dimension, after
    padding the vocabulary with zero rows that no token ever uses. Used for initialisation and for loading
    a checkpoint saved under any layout. An expert parameter (model/moe_experts.py) first keeps its
    experts' block of dimension 0 (expert parallelism)."""
    first = getattr(param, "expert_first", None)
    if first is not None:
        full = full.narrow(0, first, param.shape[0])
    dim = getattr(param, "partition_dim", None)
    if dim is None:
        return full
    padded = param.shape[dim] * tp_size
    if padded > full.shape[dim]:
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, torch.zeros(pad_shape, dtype=full.dtype)], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def pad_vocab_size(vocab_size, tp_size, divisible_by=128):
    """Megatron's padding: a multiple of divisible_by * tp, so every TP shard has the same whole rows."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


class Comm(NamedTuple):
    """How a linear's input crosses the TP group. ``kind``: None (no communication: a row-parallel input,
    or one rank), "f" (identity forward, all-reduce of dX backward) or "sp" (all-gather along the sequence
    forward, reduce-scatter of dX backward). ``fuse``: gradient-accumulation fusion into main_grad."""
    kind: object
    group: object
    fuse: bool = True


@functools.lru_cache(maxsize=None)
def _warn_multiple_connections():
    warnings.warn("CUDA_DEVICE_MAX_CONNECTIONS is not 1: the tensor-parallel input-gradient collective may "
                  "queue behind the weight-gradient GEMM instead of overlapping it; set "
                  "CUDA_DEVICE_MAX_CONNECTIONS=1 before CUDA is initialised", RuntimeWarning)


def _start_input_grad(grads, weights, shape, comm):
    """dX = sum_i dY_i W_i (one accumulating GEMM per weight) and the asynchronous launch of its reduction
    over TP: (dX or this rank's chunk of it, handle or None)."""
    grad_x = None
    for g, w in zip(grads, weights):
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = g2.mm(w) if grad_x is None else grad_x.addmm_(g2, w)
    grad_x = grad_x.view(shape)
    if comm.kind is None:
        return grad_x, None
    if grad_x.is_cuda and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        _warn_multiple_connections()
    if comm.kind == "sp":
        return mappings.start_reduce_scatter_sequence(grad_x, comm.group)
    return mappings.start_all_reduce(grad_x, comm.group)


class LinearWithGradAccumulationAndAsyncCommunication(torch.autograd.Function):
    """Y_i = X W_i^T + b_i for the weights ``params = (W_0, b_0, W_1, b_1, ...)`` (b_i may be None), all
    reading X, whose TP communication (``comm``) runs once. See the module docstring for the order of the
    backward: dX, its collective launched, the weight gradients, the wait."""

    @staticmethod
    def forward(ctx, x, comm, *params):
        weights, biases = params[0::2], params[1::2]
        total = mappings.gather_sequence(x, comm.group) if comm.kind == "sp" else x
        ctx.save_for_backward(total, *weights)
        ctx.comm, ctx.params = comm, weights  # the Parameters themselves: main_grad and the wrapper's entry
        ctx.has_bias = [b is not None for b in biases]
        ctx.deferrable = store.capturing
        out = tuple(F.linear(total, w, b) for w, b in zip(weights, biases))
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx, *grads):
        total, *weights = ctx.saved_tensors
        grad_x, handle = None, None
        if ctx.needs_input_grad[0]:
            grad_x, handle = _start_input_grad(grads, weights, total.shape, ctx.comm)
        param_grads = []
        for i, (g, param) in enumerate(zip(grads, ctx.params)):
            dw = db = None
            if ctx.needs_input_grad[2 + 2 * i]:
                dw = backward_weight_grad(param, total, g, ctx.deferrable, ctx.comm.fuse)
            if ctx.has_bias[i] and ctx.needs_input_grad[3 + 2 * i]:
                db = g.reshape(-1, g.shape[-1]).sum(0)
            param_grads += [dw, db]
        if handle is not None:
            handle.wait()  # only now: the weight-gradient GEMMs above ran while the collective was in flight
        return (grad_x, None, *param_grads)


def parallel_linear(x, params, kind=None, group=None, fuse=True):
    """The outputs X W^T + b of every (W, b) in ``params`` (b may be None), their input communicated by
    ``kind`` (see ``Comm``) once for all: a tensor for one pair, a tuple for several."""
    flat = [t for pair in params for t in pair]
    return LinearWithGradAccumulationAndAsyncCommunication.apply(x, Comm(kind, group, fuse), *flat)


class _ParallelLinear(nn.Module):
    """What the column- and row-parallel linears share: the TP group, the divisibility check of the split
    dimension and the weight [out, in] sharded along the class's ``split_dim`` (0: output rows, 1: input
    columns)."""
    split_dim = None

    def __init__(self, in_features, out_features, sequence_parallel, group):
        super().__init__()
        self.group, self.tp_size, _ = _tp(group)
        size, what = (out_features, "out_features") if self.split_dim == 0 else (in_features, "in_features")
        if size % self.tp_size:
            raise ValueError(f"{type(self).__name__}: {what} {size} not divisible by tp {self.tp_size}")
        self.sequence_parallel = sequence_parallel and self.tp_size > 1

    def _make_parameters(self, in_features, out_features, bias, init_std, dtype, device):
        """The weight, and the zero-initialised bias (or None): split with the output rows under column
        parallelism, replicated under row parallelism (added once, after the sum)."""
        shape = [out_features, in_features]
        shape[self.split_dim] //= self.tp_size
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))
        set_init(self.weight, (out_features, in_features), partition_dim=self.split_dim, std=init_std)
        if not bias:
            self.register_parameter("bias", None)
            return
        self.bias = nn.Parameter(torch.empty(shape[0], dtype=dtype, device=device))
        set_init(self.bias, (out_features,), partition_dim=0 if self.split_dim == 0 else None, fill=0.0)


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split along its output dimension (columns of A^T): each rank computes its
    slice of Y. The input passes through *f* (or, with sequence parallelism, is all-gathered along the
    sequence). ``gather_output`` joins the slices for a consumer that wants the whole Y."""
    split_dim = 0

    def __init__(self, in_features, out_features, bias=True, gather_output=False, sequence_parallel=False,
                 init_std=0.02, group=None, dtype=None, device=None):
        super().__init__(in_features, out_features, sequence_parallel, group)
        self.gather_output = gather_output
        self._make_parameters(in_features, out_features, bias, init_std, dtype, device)

    @property
    def input_comm(self):
        """How this linear's input crosses the TP group (``Comm.kind``)."""
        if self.tp_size == 1:
            return None
        return "sp" if self.sequence_parallel else "f"

    def forward(self, x):
        y = parallel_linear(x, [(self.weight, self.bias)], self.input_comm, self.group)
        return mappings.gather_from_tp_region(y, self.group) if self.gather_output and self.tp_size > 1 else y


def column_parallel_linears(x, *linears):
    """The outputs of several ColumnParallelLinears that read the same input ``x`` (a parallel-residual
    layer's attention and MLP), with ``x`` gathered (or its gradient all-reduced) once for all of them."""
    first = linears[0]
    for lin in linears:
        if lin.group is not first.group or lin.sequence_parallel != first.sequence_parallel or lin.gather_output:
            raise ValueError("column_parallel_linears: the linears must share their TP group and sequence "
                             "parallelism, and none may gather its output")
    return parallel_linear(x, [(lin.weight, lin.bias) for lin in linears], first.input_comm, first.group)


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split along its input dimension: each rank multiplies its slice of X and the
    partial products are summed by *g* (or reduce-scattered along the sequence with sequence parallelism).
    The bias is replicated and added once, after the sum."""
    split_dim = 1

    def __init__(self, in_features, out_features, bias=True, input_is_parallel=True, sequence_parallel=False,
                 init_std=0.02, group=None, dtype=None, device=None):
        super().__init__(in_features, out_features, sequence_parallel, group)
        self.input_is_parallel = input_is_parallel
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self._make_parameters(in_features, out_features, bias, init_std, dtype, device)
        if bias:
            self.bias.sequence_parallel = self.sequence_parallel

    def forward(self, x):
        if self.tp_size == 1:
            return parallel_linear(x, [(self.weight, self.bias)])
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp_region(x, self.group)
        y = parallel_linear(x, [(self.weight, None)], group=self.group)
        y = mappings.reduce_scatter_to_sp_region(y, self.group) if self.sequence_parallel \
            else mappings.reduce_from_tp_region(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary, padded to a multiple of ``divisible_by * tp``) are split
    over TP. Each rank looks up the ids in its range, zeros the rest, and the partial results are summed
    (all-reduce; or reduce-scatter along the sequence with sequence parallelism, in which case the input
    is [s, b] and the output this rank's [s/tp, b, h] chunk). Padding rows start at zero and never
    receive a gradient."""

    def __init__(self, num_embeddings, embedding_dim, divisible_by=128, sequence_parallel=False, init_std=0.02,
                 group=None, dtype=None, device=None):
        super().__init__()
        self.group, self.tp_size, tp_rank = _tp(group)
        self.num_embeddings = num_embeddings
        self.padded_vocab_size = pad_vocab_size(num_embeddings, self.tp_size, divisible_by)
        rows = self.padded_vocab_size // self.tp_size
        self.vocab_start, self.vocab_end = tp_rank * rows, (tp_rank + 1) * rows
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, dtype=dtype, device=device))
        set_init(self.weight, (num_embeddings, embedding_dim), partition_dim=0, std=init_std)

    def forward(self, ids):
        # Checked on CPU only: on CUDA the check would synchronise the device every micro-batch.
        if not ids.is_cuda and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"VocabParallelEmbedding: token id out of range [0, {self.num_embeddings})")
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sp_region(out, self.group)
        return mappings.reduce_from_tp_region(out, self.group)
