"""Data parallelism with overlapped, bucketed gradient reduction, after Megatron-Core's
DistributedDataParallel (and PyTorch DDP, Li et al. 2020).

The wrapper moves the chunk's parameters into a ParamAndGradBuffer (contiguous parameters, fp32
``main_grad``) and hooks every parameter's gradient accumulation:

- each hook adds the fresh ``param.grad`` (model dtype) into ``param.main_grad`` (fp32) and frees it;
- on the last micro-batch of a step it also marks the parameter ready in its bucket, and when a bucket's
  last parameter is ready the bucket's all-reduce (reduce-scatter with the distributed optimizer) is
  launched asynchronously, so it runs while the backward pass carries on with earlier layers;
- every earlier micro-batch runs under ``no_sync()`` and only accumulates.

Under expert parallelism (MoE, parallel.ep > 1) a chunk has two buffers (``grad_buffers``, not ``buffers``,
which is nn.Module's method): ``buffer`` for the parameters every data-parallel rank holds, reduced over
the data-parallel (x context-parallel) group, and ``expert_buffer`` for the experts, which differ between the ranks of an expert-parallel group and are
reduced over the expert-data-parallel group (parallel_state.get_expert_dp_group), sharded over it under
ZeRO-1. Both reductions are sums, so the expert gradients need no rescaling (invariant 3: each rank's
loss is already normalised by the global batch's tokens).

``finish_grad_sync()`` (called by finalize_model_grads after the schedule) launches whatever is left and
waits for everything. ``param.accumulate_main_grad(grad)`` is the same entry point for gradients computed
outside autograd's accumulation (the zero-bubble schedule's deferred weight-gradient GEMMs), so bucket
readiness does not rely on autograd hooks alone.

With the distributed optimizer the updated parameters come back by an all-gather per bucket, which the
optimizer launches through ``start_param_gather()`` after its step. With ``overlap_param_gather`` (the
default) it is not waited on there: a forward pre-hook on every module that owns parameters waits for the
buckets of that module's own parameters, so bucket k's all-gather is waited on at the first use of one of
its parameters in the next forward pass and the later buckets keep arriving while the first layers
compute (Megatron-Core's overlap_param_gather). Code that reads or writes the parameters outside a forward
pass (checkpoint saving, weight copies, the end of training) calls ``finish_param_gather()`` first;
``state_dict`` and ``load_state_dict`` do it themselves.
"""
import contextlib
import functools
import weakref

import torch.nn as nn

from megagopher import parallel_state as ps
from megagopher.config.schema import check_value, coerce
from megagopher.distributed.finalize import tied_embedding_params
from megagopher.distributed.param_and_grad_buffer import ParamAndGradBuffer


def _grad_hook(wrapper_ref, param):
    wrapper = wrapper_ref()
    if wrapper is not None:  # a dropped wrapper leaves plain autograd accumulation behind
        wrapper._grad_hook(param)


class DistributedDataParallel(nn.Module):
    """Wraps one model chunk. ``forward`` is the chunk's; ``state_dict`` is the chunk's (no ``module.``
    prefix, so checkpoints do not depend on the wrapping); other attributes fall through to the chunk."""

    def __init__(self, module, bucket_size_mb=25.0, overlap_grad_reduce=True, use_distributed_optimizer=False,
                 data_parallel_group=None, isolate_params=(), overlap_param_gather=True, expert_group=None):
        super().__init__()
        bucket_size_mb = check_value("parallel", "bucket_size_mb", bucket_size_mb)
        self.module = module
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_param_gather = overlap_param_gather
        # The buffer sizes buckets in elements of the fp32 gradient.
        bucket_numel = max(1, int(bucket_size_mb * 2 ** 20) // 4) if bucket_size_mb > 0 else None
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for n, p in named:  # a second wrapper would hook the same parameters and count gradients twice
            if hasattr(p, "accumulate_main_grad"):
                raise ValueError(f"parameter {n} already belongs to a DistributedDataParallel wrapper")
        names = {id(p): n for n, p in named}
        # expert_group given (expert parallelism): the experts get a buffer of their own over it.
        is_expert = [expert_group is not None and hasattr(p, "expert_first") for _, p in named]
        self.buffer = ParamAndGradBuffer([p for (_, p), e in zip(named, is_expert) if not e], bucket_numel,
                                         data_parallel_group, shard=use_distributed_optimizer,
                                         isolate=isolate_params, param_names=names)
        self.expert_buffer = None
        if any(is_expert):
            self.expert_buffer = ParamAndGradBuffer([p for (_, p), e in zip(named, is_expert) if e], bucket_numel,
                                                    expert_group, shard=use_distributed_optimizer, param_names=names,
                                                    expert=True)
        self.grad_buffers = [b for b in (self.buffer, self.expert_buffer) if b is not None]
        self.bucket_of = {k: v for b in self.grad_buffers for k, v in b.bucket_of.items()}
        self.sync_enabled = True  # False inside no_sync(): micro-batches before the last only accumulate
        self._hooks = []
        # The hook reaches the wrapper through a weak reference: autograd keeps a tensor's hooks in C++, out
        # of the cycle collector's sight, so a strong one (hook -> wrapper -> chunk -> parameter -> hook) would
        # keep every dropped wrapper alive with its buffers and groups (a staged run rebuilds its chunks).
        grad_hook = functools.partial(_grad_hook, weakref.ref(self))
        for _, p in named:
            self._hooks.append(p.register_post_accumulate_grad_hook(grad_hook))
            p.accumulate_main_grad = functools.partial(self._accumulate_main_grad, p)
        if use_distributed_optimizer and any(b.dp_size > 1 for b in self.grad_buffers):
            self._register_param_gather_hooks()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "module" not in modules:
                raise
            return getattr(modules["module"], name)

    # -- gradient arrival --------------------------------------------------------------------------

    def _grad_hook(self, param):
        """Autograd has accumulated ``param.grad``: move it into the fp32 buffer. (The hook also fires with
        no gradient for every weight whose layer fuses its gradient into main_grad, and for zero-bubble's
        deferred B pass; those arrive through accumulate_main_grad, tensor_parallel/weight_grad.py.)"""
        grad, param.grad = param.grad, None
        if grad is not None:
            self._accumulate_main_grad(param, grad)

    def _accumulate_main_grad(self, param, grad):
        bucket = self.bucket_of[id(param)]
        if bucket.launched:
            raise RuntimeError(f"gradient of {bucket.owner.name(param)} arrived after bucket {bucket.index}'s "
                               "reduction started: a parameter used again after its gradient was final?")
        if grad is not None:  # None: a fused layer wrote main_grad itself (weight_grad.py); only mark it ready
            param.main_grad.add_(grad.detach())  # no autograd history into the buffer
        if not self.sync_enabled:
            return
        bucket.ready.add(id(param))
        if self.overlap_grad_reduce and len(bucket.ready) == len(bucket.params):
            self._start_bucket_sync(bucket)

    def _start_bucket_sync(self, bucket):
        bucket.owner.start_bucket_sync(bucket)

    # -- parameter all-gather (distributed optimizer) -----------------------------------------------

    def _register_param_gather_hooks(self):
        """A forward pre-hook on each module that owns parameters: it waits for the buckets holding that
        module's own parameters (not its children's, whose hooks wait for theirs when they run)."""
        bucket_of = self.bucket_of
        for module in self.module.modules():
            buckets = {id(bucket_of[id(p)]): bucket_of[id(p)] for p in module.parameters(recurse=False)
                       if id(p) in bucket_of}
            if buckets:
                hook = functools.partial(self._wait_for_params, sorted(buckets.values(), key=lambda b: -b.index))
                self._hooks.append(module.register_forward_pre_hook(hook))

    def _wait_for_params(self, buckets, module, args):
        for bucket in buckets:
            bucket.owner.finish_bucket_param_sync(bucket)

    def start_param_gather(self):
        """After the optimizer updated this rank's shards: all-gathers every bucket's parameters,
        asynchronously under overlap_param_gather (waited on at first use), else before returning."""
        for buffer in self.grad_buffers:
            buffer.start_param_sync()
        if not self.overlap_param_gather:
            self.finish_param_gather()

    def finish_param_gather(self):
        """Waits for every parameter all-gather in flight; call before reading or writing the parameters
        outside a forward pass, and before destroying the process groups (a gloo or NCCL group destroyed
        under a pending all-gather aborts the process; Trainer.close does it)."""
        for buffer in self.grad_buffers:
            buffer.finish_param_sync()

    # -- the step's protocol -----------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate into main_grad (micro-batches before the last)."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def start_grad_sync(self):
        """Launches every bucket not launched yet (all of them when overlap_grad_reduce is off)."""
        for buffer in self.grad_buffers:
            for bucket in buffer.buckets:
                if not bucket.launched:
                    self._start_bucket_sync(bucket)

    def finish_grad_sync(self):
        """Waits until every bucket is reduced; main_grad then holds the data-parallel sum (or, with the
        distributed optimizer, this rank's shards of it)."""
        self.start_grad_sync()
        for buffer in self.grad_buffers:
            buffer.finish_grad_sync()

    def zero_grad_buffer(self):
        """Zeros main_grad before a step's first micro-batch."""
        for buffer in self.grad_buffers:
            for p in buffer.params:
                p.grad = None
            buffer.reset()

    def state_dict(self, *args, **kwargs):
        self.finish_param_gather()  # the tensors returned are the parameters themselves
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        self.finish_param_gather()  # a gather still in flight would overwrite what is loaded
        return self.module.load_state_dict(state_dict, strict=strict, **kwargs)


def wrap_data_parallel(model_chunks, parallel_cfg=None, distributed_optimizer=False, overlap_param_gather=True):
    """Wraps each chunk in DistributedDataParallel over the data-parallel (x context-parallel) group.

    ``parallel_cfg``: the ``[parallel]`` section (a ParallelConfig, or a dict of some of its keys); uses
    ``bucket_size_mb`` (0 = one bucket) and ``overlap_grad_reduce``. ``overlap_param_gather``: with the
    distributed optimizer, wait for each bucket's parameter all-gather at its first use (see the module
    docstring) rather than in the optimizer step; the values are the same either way. Without an
    initialised parallel_state there is no group and nothing is communicated (a serial run). Call it after
    casting the chunks to their training dtype: it moves the parameters into a contiguous buffer of that
    dtype."""
    cfg = coerce("parallel", parallel_cfg)
    group = ps.get_dp_cp_group() if ps.is_initialized() else None
    expert_group = ps.get_expert_dp_group() if ps.is_initialized() and ps.get_ep_size() > 1 else None
    wrapped = []
    for chunk in model_chunks:
        if isinstance(chunk, DistributedDataParallel):
            raise ValueError("wrap_data_parallel: chunk is already wrapped")
        # Only a pipelined model sums a tied embedding across stages (distributed/finalize.py).
        isolate = tied_embedding_params(chunk) if ps.get_pp_size() > 1 else []
        wrapped.append(DistributedDataParallel(chunk, cfg.bucket_size_mb, cfg.overlap_grad_reduce,
                                               distributed_optimizer, group, isolate_params=isolate,
                                               overlap_param_gather=overlap_param_gather,
                                               expert_group=expert_group))
    return wrapped
