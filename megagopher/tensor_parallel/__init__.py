"""Tensor and sequence parallelism: the f/g operators, parallel layers, vocab-parallel cross entropy, and
RNG streams with activation checkpointing."""
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, LinearWithGradAccumulationAndAsyncCommunication, RowParallelLinear,
                     VocabParallelEmbedding, column_parallel_linears, init_parameters, pad_vocab_size,
                     parallel_linear, set_init)
from .mappings import (copy_to_tp_region, gather_from_sp_region, gather_from_tp_region, reduce_from_tp_region,
                       reduce_scatter_to_sp_region, scatter_to_sp_region, scatter_to_tp_region)
from .random import checkpoint, get_rng_tracker, model_parallel_seed

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "init_parameters",
           "pad_vocab_size", "set_init", "vocab_parallel_cross_entropy", "copy_to_tp_region",
           "reduce_from_tp_region", "scatter_to_tp_region", "gather_from_tp_region", "scatter_to_sp_region",
           "gather_from_sp_region", "reduce_scatter_to_sp_region", "checkpoint", "get_rng_tracker",
           "model_parallel_seed", "LinearWithGradAccumulationAndAsyncCommunication", "column_parallel_linears",
           "parallel_linear"]
