"""Data parallelism with overlapped, bucketed gradient reduction, after Megatron-Core's
DistributedDataParallel (and PyTorch DDP, Li et al. 2020).

The wrapper moves the chunk's parameters into a ParamAndGradBuffer (contiguous parameters, fp32
``main_grad``) and hooks every parameter's gradient accumulation:

- each hook adds the fresh ``param.grad`` (model dtype) into ``param.main_grad`` (fp32) and frees it;
- on the last micro-batch of a step it also marks the parameter ready in its bucket, and when a bucket's
  last parameter is ready the bucket's all-reduce (reduce-scatter with the distributed optimizer) is
  launched asynchronously, so it runs while the backward pass carries on with earlier layers;
- every earlier micro-batch runs under ``no_sync()`` and only accumulates.

``finish_grad_sync()`` (called by finalize_model_grads after the schedule) launches whatever is left and
waits for everything. ``param.accumulate_main_grad(grad)`` is the same entry point for gradients computed
outside autograd's accumulation (the zero-bubble schedule's deferred weight-gradient GEMMs), so bucket
readiness does not rely on autograd hooks alone.
"""
import contextlib
import functools

import torch.nn as nn

from megagopher import parallel_state as ps
from megagopher.config.schema import check_value, coerce
from megagopher.distributed.finalize import tied_embedding_params
from megagopher.distributed.param_and_grad_buffer import ParamAndGradBuffer


class DistributedDataParallel(nn.Module):
    """Wraps one model chunk. ``forward`` is the chunk's; ``state_dict`` is the chunk's (no ``module.``
    prefix, so checkpoints do not depend on the wrapping); other attributes fall through to the chunk."""

    def __init__(self, module, bucket_size_mb=25.0, overlap_grad_reduce=True, use_distributed_optimizer=False,
                 data_parallel_group=None, isolate_params=()):
        super().__init__()
        bucket_size_mb = check_value("parallel", "bucket_size_mb", bucket_size_mb)
        self.module = module
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        # The buffer sizes buckets in elements of the fp32 gradient.
        bucket_numel = max(1, int(bucket_size_mb * 2 ** 20) // 4) if bucket_size_mb > 0 else None
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for n, p in named:  # a second wrapper would hook the same parameters and count gradients twice
            if hasattr(p, "accumulate_main_grad"):
                raise ValueError(f"parameter {n} already belongs to a DistributedDataParallel wrapper")
        self.buffer = ParamAndGradBuffer([p for _, p in named], bucket_numel, data_parallel_group,
                                         shard=use_distributed_optimizer, isolate=isolate_params,
                                         param_names={id(p): n for n, p in named})
        self.sync_enabled = True  # False inside no_sync(): micro-batches before the last only accumulate
        self._hooks = []
        for _, p in named:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook))
            p.accumulate_main_grad = functools.partial(self._accumulate_main_grad, p)

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
        no gradient when a backward deferred this weight's gradient: zero-bubble's B pass; that gradient
        arrives later through accumulate_main_grad.)"""
        grad, param.grad = param.grad, None
        if grad is not None:
            self._accumulate_main_grad(param, grad)

    def _accumulate_main_grad(self, param, grad):
        bucket = self.buffer.bucket_of[id(param)]
        if bucket.launched:
            raise RuntimeError(f"gradient of {self.buffer.name(param)} arrived after bucket {bucket.index}'s "
                               "reduction started: a parameter used again after its gradient was final?")
        param.main_grad.add_(grad.detach())  # no autograd history into the buffer
        if not self.sync_enabled:
            return
        bucket.ready.add(id(param))
        if self.overlap_grad_reduce and len(bucket.ready) == len(bucket.params):
            self._start_bucket_sync(bucket)

    def _start_bucket_sync(self, bucket):
        self.buffer.start_bucket_sync(bucket)

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
        for bucket in self.buffer.buckets:
            if not bucket.launched:
                self._start_bucket_sync(bucket)

    def finish_grad_sync(self):
        """Waits until every bucket is reduced; main_grad then holds the data-parallel sum (or, with the
        distributed optimizer, this rank's shards of it)."""
        self.start_grad_sync()
        self.buffer.finish_grad_sync()

    def zero_grad_buffer(self):
        """Zeros main_grad before a step's first micro-batch."""
        for p in self.buffer.params:
            p.grad = None
        self.buffer.reset()

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        return self.module.load_state_dict(state_dict, strict=strict, **kwargs)


def wrap_data_parallel(model_chunks, parallel_cfg=None, distributed_optimizer=False):
    """Wraps each chunk in DistributedDataParallel over the data-parallel (x context-parallel) group.

    ``parallel_cfg``: the ``[parallel]`` section (a ParallelConfig, or a dict of some of its keys); uses
    ``bucket_size_mb`` (0 = one bucket) and ``overlap_grad_reduce``. Without an initialised parallel_state
    there is no group and nothing is communicated (a serial run). Call it after casting the chunks to
    their training dtype: it moves the parameters into a contiguous buffer of that dtype."""
    cfg = coerce("parallel", parallel_cfg)
    group = ps.get_dp_cp_group() if ps.is_initialized() else None
    wrapped = []
    for chunk in model_chunks:
        if isinstance(chunk, DistributedDataParallel):
            raise ValueError("wrap_data_parallel: chunk is already wrapped")
        # Only a pipelined model sums a tied embedding across stages (distributed/finalize.py).
        isolate = tied_embedding_params(chunk) if ps.get_pp_size() > 1 else []
        wrapped.append(DistributedDataParallel(chunk, cfg.bucket_size_mb, cfg.overlap_grad_reduce,
                                               distributed_optimizer, group, isolate_params=isolate))
    return wrapped
