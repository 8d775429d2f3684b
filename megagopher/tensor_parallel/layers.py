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
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagopher import parallel_state as ps
from megagopher.tensor_parallel.weight_grad import linear  # F.linear, W-deferrable under ZB-H1
from megagopher.tensor_parallel import mappings


def _tp(group):
    group = group if group is not None else (ps.get_tp_group() if ps.is_initialized() else None)
    if group is None:
        return None, 1, 0
    import torch.distributed as dist
    return group, dist.get_world_size(group), dist.get_rank(group)


def set_init(param, full_shape, partition_dim=None, std=0.02, fill=None, init_name=None):
    """Records how ``param`` is initialised: normal(0, std) over ``full_shape`` (or constant ``fill``),
    split along ``partition_dim``. ``init_name`` makes a copy start from another parameter's values
    (the output head of a tied embedding on the last pipeline stage)."""
    param.full_shape = tuple(full_shape)
    param.partition_dim = partition_dim
    param.tensor_model_parallel = partition_dim is not None
    param.init_std, param.init_fill, param.init_name = std, fill, init_name
    return param


def seed_for(seed, name):
    """A 63-bit generator seed from (seed, parameter name): independent of layout and process."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_tensor(param, name, seed):
    """The full, unsharded initial value of ``param`` (fp32, CPU)."""
    if param.init_fill is not None:
        return torch.full(param.full_shape, float(param.init_fill))
    gen = torch.Generator().manual_seed(seed_for(seed, param.init_name or name))
    return torch.empty(param.full_shape).normal_(0.0, param.init_std, generator=gen)


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
    a checkpoint saved under any layout."""
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

    def forward(self, x):
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias)
        x = mappings.gather_from_sp_region(x, self.group) if self.sequence_parallel \
            else mappings.copy_to_tp_region(x, self.group)
        y = linear(x, self.weight, self.bias)
        return mappings.gather_from_tp_region(y, self.group) if self.gather_output else y


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
            return linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp_region(x, self.group)
        y = linear(x, self.weight)
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
