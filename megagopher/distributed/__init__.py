"""Data parallelism and the gradient reductions that close a training step.

    chunks = wrap_data_parallel(chunks, parallel_cfg, distributed_optimizer=...)
    ... forward/backward, every micro-batch but the last under chunk.no_sync() ...
    finalize_model_grads(chunks)    # waits for the DP reduction, then the SP and tied-embedding sums
"""
from .ddp import DistributedDataParallel, wrap_data_parallel
from .finalize import finalize_model_grads
from .param_and_grad_buffer import Bucket, ParamAndGradBuffer

__all__ = ["DistributedDataParallel", "wrap_data_parallel", "finalize_model_grads", "ParamAndGradBuffer",
           "Bucket"]
