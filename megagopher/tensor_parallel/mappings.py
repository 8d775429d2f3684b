"""The communication operators of tensor and sequence parallelism, as autograd functions.

Names follow Megatron-LM (Shoeybi et al. 2019, section 3) and its sequence-parallel extension
(Korthikanti et al. 2022):

- copy_to_tp_region is the paper's *f*: identity forward, all-reduce backward. It sits before a
  column-parallel layer, whose input every TP rank needs whole, and whose input gradient is a sum of
  every rank's partial gradient.
- reduce_from_tp_region is *g*: all-reduce forward, identity backward. It sits after a row-parallel
  layer, whose outputs are partial sums.
- scatter/gather along the last dimension split or join a hidden dimension that is sharded over TP.
- With sequence parallelism the activations between the TP regions are split along the sequence (dim 0 of
  our [s, b, h] layout): *f* becomes gather_from_sp_region (all-gather forward, reduce-scatter backward)
  and *g* becomes reduce_scatter_to_sp_region (reduce-scatter forward, all-gather backward). The same
  bytes move as with one all-reduce, but the norms and dropouts between run on 1/tp of the tokens.

Every function takes the group to work on (default: the TP group of parallel_state), so the operators
are usable outside megagopher's own model.

The column-parallel linears do not use *f* or the sequence-parallel all-gather as separate operators:
their autograd function (tensor_parallel/layers.py) gathers its input with ``gather_sequence`` and
launches the input gradient's all-reduce or reduce-scatter with ``start_all_reduce`` /
``start_reduce_scatter_sequence`` (``async_op=True``), so one collective serves every linear that reads the
same input and it is in flight while the weight gradients are computed.
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import all_gather_single, reduce_scatter_single


def _tp_group(group):
    return group if group is not None else ps.get_tp_group()


def _size(group):
    return dist.get_world_size(group)


def _all_reduce(x, group):
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x, group):
    n = _size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"cannot split last dimension {x.shape[-1]} over {n} tensor-parallel ranks")
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x, group):
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    # The single-tensor all-gather joins along dim 0 (gloo wants exactly that shape); re-cut and join on -1.
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x, group=group)
    return torch.cat(out.chunk(n, dim=0), dim=-1)


def _split_first(x, group):
    n = _size(group)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ValueError(f"cannot split sequence dimension {x.shape[0]} over {n} sequence-parallel ranks")
    return x.chunk(n, dim=0)[dist.get_rank(group)].contiguous()


def _gather_first(x, group):
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_first(x, group):
    out, handle = start_reduce_scatter_sequence(x, group)
    handle.wait()
    return out


def gather_sequence(x, group):
    """The all-gather along the sequence (dim 0) that a sequence-parallel column-parallel linear runs on
    its input (tensor_parallel/layers.py runs it inside the linear's own autograd function)."""
    return _gather_first(x, group)


class _Done:
    """The handle of a collective that did not run (one rank): nothing to wait for."""

    @staticmethod
    def wait():
        return True


def start_all_reduce(x, group):
    """Launches the in-place all-reduce of ``x`` with ``async_op=True``: returns (x, handle); ``x`` holds
    the sum once ``handle.wait()`` returns. Megatron's asynchronous input-gradient all-reduce: the caller
    computes the weight gradient while it is in flight."""
    if _size(group) == 1:
        return x, _Done()
    x = x.contiguous()
    return x, dist.all_reduce(x, group=group, async_op=True)


def start_reduce_scatter_sequence(x, group):
    """Launches the reduce-scatter of ``x`` along the sequence (dim 0) with ``async_op=True``: returns
    (this rank's chunk, handle); the chunk holds the sum once ``handle.wait()`` returns."""
    n = _size(group)
    if n == 1:
        return x, _Done()
    if x.shape[0] % n:
        raise ValueError(f"cannot reduce-scatter dimension {x.shape[0]} over {n} sequence-parallel ranks")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return out, reduce_scatter_single(out, x, group=group, async_op=True)


class _CopyToTPRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToSPRegion(torch.autograd.Function):
    """Split the sequence forward (each rank keeps its chunk), all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


class _GatherFromSPRegion(torch.autograd.Function):
    """All-gather the sequence forward. Backward: reduce-scatter when the consumer is tensor-parallel
    (every rank holds a partial gradient of the whole sequence), plain split when it is replicated."""

    @staticmethod
    def forward(ctx, x, group, tp_output_grad):
        ctx.group, ctx.tp_output_grad = group, tp_output_grad
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tp_output_grad:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split_first(grad, ctx.group), None, None


class _ReduceScatterToSPRegion(torch.autograd.Function):
    """Reduce-scatter along the sequence forward (the SP form of g), all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


def copy_to_tp_region(x, group=None):
    return _CopyToTPRegion.apply(x, _tp_group(group))


def reduce_from_tp_region(x, group=None):
    return _ReduceFromTPRegion.apply(x, _tp_group(group))


def scatter_to_tp_region(x, group=None):
    return _ScatterToTPRegion.apply(x, _tp_group(group))


def gather_from_tp_region(x, group=None):
    return _GatherFromTPRegion.apply(x, _tp_group(group))


def scatter_to_sp_region(x, group=None):
    return _ScatterToSPRegion.apply(x, _tp_group(group))


def gather_from_sp_region(x, group=None, tensor_parallel_output_grad=True):
    return _GatherFromSPRegion.apply(x, _tp_group(group), tensor_parallel_output_grad)


def reduce_scatter_to_sp_region(x, group=None):
    return _ReduceScatterToSPRegion.apply(x, _tp_group(group))
