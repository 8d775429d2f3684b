"""The contiguous parameter and gradient buffers of data parallelism, after Megatron-Core's
ParamAndGradBuffer.

Every parameter of a model chunk lives in one flat tensor of the model's dtype (``param_data``) and its
gradient in one flat fp32 tensor (``grad_data``); ``param.data`` and ``param.main_grad`` are views into
them. Gradients are accumulated there in fp32 whatever the model's precision, so bf16/fp16 micro-batch
gradients do not lose bits when summed.

Layout. Parameters are placed in *reverse* order of ``module.parameters()``, which is roughly the order in
which the backward pass produces their gradients, and cut into buckets of about ``bucket_numel`` elements
(a parameter never straddles two buckets). The first bucket therefore fills up early in the backward pass
and its reduction runs while the rest of the backward computes.

Sharding (the distributed optimizer, ZeRO-1, Rajbhandari et al. 2020). Each bucket is padded to a multiple
of the data-parallel size and split into ``dp`` equal contiguous shards; rank r owns shard r of every
bucket. A bucket's gradients are reduce-scattered, so each rank receives the full sum for the shard it
owns only, and after the optimizer has updated its shards the parameters are all-gathered back. Sharding
bucket by bucket (rather than cutting the whole buffer into dp ranges) is what lets each bucket's
reduce-scatter start as soon as that bucket is ready; with a single bucket the two coincide.

The parameter all-gather is asynchronous too (Megatron's overlap_param_gather): ``start_param_sync``
launches every bucket's all-gather right after the optimizer step, and each bucket is waited on
(``finish_bucket_param_sync``) only where the next forward pass first uses one of its parameters (the
data-parallel wrapper's forward pre-hooks, distributed/ddp.py). The launch order is the order of first
use, i.e. the *reverse* of the layout: the last bucket holds the embedding and the first layers. NCCL runs
one communicator's collectives on one stream, gloo from a FIFO work queue, so the bucket the forward pass
needs first is also the first to arrive, and the later ones keep transferring while the earlier layers
compute. Anything that reads or writes the parameters outside a forward pass calls ``finish_param_sync``
first.

Parameters in ``isolate`` get a bucket of their own, starting at offset 0 of that bucket. The tied
embedding of a pipelined model needs this: its gradient is summed between the first and the last stage
after the DP reduction, and with sharding both stages must own the *same* elements of it, which holds when
the parameter sits at the same place in a bucket of the same size on both.

The reduction is a SUM, not an average: the trainer normalises each rank's loss by the token count of the
whole global batch (docs/ARCHITECTURE.md invariant 3), so summing over the data-parallel (x context-parallel)
group gives exactly the serial gradient.
"""
import math

import torch
import torch.distributed as dist

from megagopher.common import all_gather_single, reduce_scatter_single


class Bucket:
    """A contiguous range [start, end) of the buffers (end includes padding) and its parameters."""

    def __init__(self, index, params, start, end, buffer):
        self.index, self.params, self.start, self.end = index, params, start, end
        self.owner = buffer       # the ParamAndGradBuffer it is a range of
        self.param_data = buffer.param_data[start:end]
        self.grad_data = buffer.grad_data[start:end]
        self.ready = set()        # parameters whose last-micro-batch gradient has arrived
        self.launched = False     # the reduction of this step has been started
        self.work = None          # the asynchronous collective's handle, until waited on
        self.param_gather = None  # ZeRO-1: the pending all-gather of the updated parameters, until waited on

    @property
    def numel(self):
        return self.end - self.start

    def shard_range(self, rank, size):
        """The local [lo, hi) of this bucket that data-parallel rank ``rank`` of ``size`` owns."""
        per_rank = self.numel // size
        return rank * per_rank, (rank + 1) * per_rank


def _round_up(n, multiple):
    return int(math.ceil(n / multiple) * multiple)


class ParamAndGradBuffer:
    """Flat parameter and fp32 gradient storage for ``params`` (one dtype), cut into buckets.

    ``data_parallel_group`` None means no communication (a single replica: the serial reference, or a
    model the optimizer wraps without data parallelism). ``expose_main_grad`` False leaves ``main_grad``
    unset (a model without the wrapper keeps using ``.grad``)."""

    def __init__(self, params, bucket_numel=None, data_parallel_group=None, shard=False, isolate=(),
                 param_names=None, expose_main_grad=True, expert=False):
        if not params:
            raise ValueError("ParamAndGradBuffer: the model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"ParamAndGradBuffer: parameters of one model chunk must share a dtype, got "
                             f"{sorted(map(str, dtypes))}; cast the whole chunk (chunk.to(dtype))")
        if bucket_numel is not None and bucket_numel < 1:
            raise ValueError(f"bucket size {bucket_numel} elements must be >= 1 (or None for one bucket)")
        self.dtype, self.device = params[0].dtype, params[0].device
        self.group = data_parallel_group
        self.dp_size = dist.get_world_size(data_parallel_group) if data_parallel_group is not None else 1
        self.dp_rank = dist.get_rank(data_parallel_group) if data_parallel_group is not None else 0
        self.shard = shard
        self.expert = expert  # the experts of expert parallelism, reduced over expert DP (distributed/ddp.py)
        self.names = param_names or {}
        isolate = {id(p) for p in isolate}

        # Layout: reverse order of use, buckets closed once they reach bucket_numel.
        self.param_range, layout = {}, []   # id(param) -> (start, end); layout: (params, start, end)
        offset, bucket_start, bucket_params = 0, 0, []

        def close_bucket():
            nonlocal offset, bucket_start, bucket_params
            if not bucket_params:
                return
            if shard:  # every rank gets an equal shard of the bucket
                offset = _round_up(offset, self.dp_size)
            layout.append((bucket_params, bucket_start, offset))
            bucket_start, bucket_params = offset, []

        for p in reversed(params):
            if id(p) in isolate:
                close_bucket()
            self.param_range[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            bucket_params.append(p)
            if id(p) in isolate or (bucket_numel is not None and offset - bucket_start >= bucket_numel):
                close_bucket()
        close_bucket()
        self.numel = offset
        self.num_params = sum(p.numel() for p in params)

        # Move the parameters into param_data and point main_grad into grad_data.
        self.param_data = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        self.params = list(params)
        for p in params:
            lo, hi = self.param_range[id(p)]
            self.param_data[lo:hi].copy_(p.detach().reshape(-1))
            p.data = self.param_data[lo:hi].view(p.shape)
            if expose_main_grad:
                p.main_grad = self.grad_data[lo:hi].view(p.shape)
        self.buckets = [Bucket(i, ps, lo, hi, self) for i, (ps, lo, hi) in enumerate(layout)]
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}

    def name(self, param):
        return self.names.get(id(param), f"parameter of shape {tuple(param.shape)}")

    # -- gradient reduction ------------------------------------------------------------------------

    def start_bucket_sync(self, bucket):
        """Launches the bucket's all-reduce (or reduce-scatter when sharded) asynchronously."""
        if bucket.launched:
            raise RuntimeError(f"bucket {bucket.index}: its gradient reduction was already started this step")
        bucket.launched = True
        if self.dp_size == 1:
            return
        if self.shard:
            lo, hi = bucket.shard_range(self.dp_rank, self.dp_size)
            # In place: this rank's shard of the bucket receives the sum of everyone's copy of that shard.
            bucket.work = reduce_scatter_single(bucket.grad_data[lo:hi], bucket.grad_data, group=self.group,
                                                 async_op=True)
        else:
            bucket.work = dist.all_reduce(bucket.grad_data, group=self.group, async_op=True)

    def finish_grad_sync(self):
        """Starts any bucket not started yet, waits for every reduction, and resets the per-step state."""
        for bucket in self.buckets:
            if not bucket.launched:
                self.start_bucket_sync(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work, bucket.launched = None, False
            bucket.ready.clear()

    def reset(self):
        """Zeros the gradients and forgets any half-finished step (called before each step's backward)."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work, bucket.launched = None, False
            bucket.ready.clear()
        self.grad_data.zero_()

    # -- distributed optimizer ---------------------------------------------------------------------

    def owned_ranges(self):
        """The [start, end) ranges of the buffer this rank's optimizer updates, one per bucket when
        sharded, the whole buffer otherwise."""
        if not self.shard:
            return [(0, self.numel)]
        out = []
        for b in self.buckets:
            lo, hi = b.shard_range(self.dp_rank, self.dp_size)
            out.append((b.start + lo, b.start + hi))
        return out

    def start_bucket_param_sync(self, bucket):
        """Launches the all-gather of the bucket's parameters from every rank's updated shard."""
        if bucket.param_gather is not None:
            raise RuntimeError(f"bucket {bucket.index}: its parameter all-gather is already in flight")
        lo, hi = bucket.shard_range(self.dp_rank, self.dp_size)
        # In place: this rank's shard is the input and stays where it is in the output.
        bucket.param_gather = all_gather_single(bucket.param_data, bucket.param_data[lo:hi], group=self.group,
                                                async_op=True)

    def finish_bucket_param_sync(self, bucket):
        """Waits for the bucket's parameter all-gather, if one is in flight."""
        if bucket.param_gather is not None:
            bucket.param_gather.wait()
            bucket.param_gather = None

    def start_param_sync(self):
        """After the optimizer updated this rank's shards: launches every bucket's all-gather, in the order
        the forward pass first uses them (the reverse of the layout, see the module docstring)."""
        if not self.shard or self.dp_size == 1:
            return
        for b in reversed(self.buckets):
            self.start_bucket_param_sync(b)

    def finish_param_sync(self):
        """Waits for every parameter all-gather in flight: ``param_data`` is then complete on every rank."""
        for b in reversed(self.buckets):
            self.finish_bucket_param_sync(b)

    def all_gather_params(self):
        """The synchronous form: every rank has every bucket's updated parameters when it returns."""
        self.start_param_sync()
        self.finish_param_sync()
