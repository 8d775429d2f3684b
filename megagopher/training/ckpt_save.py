"""What one rank writes into a checkpoint, and the writer that puts it on disk now or in the background.

Every rank writes one file, ``rank_00003.safetensors``, holding *pieces*: flat ranges of its parameters
and optimizer state, each a view of the memory the training already holds (no gather, no copy).

  - A data-parallel replica group splits the writing: under ZeRO-1 each rank writes the ranges of the flat
    buffers its optimizer shard owns (weights, master weights, Adam moments); without it each rank writes
    its 1/dp of every buffer. Every byte of model state is written once, by one rank.
  - A parameter replicated over tensor parallelism (norms, row-parallel biases) is written by TP rank 0
    only; the tied word-embedding copy on the last pipeline stage is not written (the first stage's is).
  - fp32 parameters are their own master weights, so "master" is written only for bf16/fp16 runs.
  - The rank's RNG states go in the same file ("rng/...").

A piece is named ``kind/name/tp_rank/lo`` (ckpt_format.piece_key): ``kind`` one of PIECE_KINDS, ``name`` the
layout-independent parameter name, elements [lo, hi) of the flattened tensor that TP rank ``tp_rank`` holds.
Expert parameters under expert parallelism are written as if ep were 1: a rank's experts are a block of
dimension 0 of the TP rank's (experts, out, in) tensor, i.e. one contiguous range of its flattening, so their
pieces are indexed in that whole tensor (``expert_offset``) and a reader under any ep reads the range it
holds. The index of all pieces goes into the checkpoint's metadata.json, so a reader under any layout finds
the ranges it needs.
"""
import math
import threading

import torch

from megagopher import parallel_state as ps
from megagopher.common import dtype_name, unwrap_model
from megagopher.tensor_parallel.random import get_rng_tracker
from megagopher.training.ckpt_files import write_shard
from megagopher.training.ckpt_format import piece_key

PIECE_KINDS = ("param", "master", "exp_avg", "exp_avg_sq")
OPTIMIZER_KINDS = PIECE_KINDS[1:]


def named_parameters(chunks):
    """(global name, tensor) of every parameter and persistent buffer this rank holds (the module state,
    as state_dict names it: e.g. a sigmoid router's balancing bias); a tied-embedding copy on the last
    stage is named after the word embeddings it mirrors."""
    out = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, p in model.named_parameters():
            if getattr(p, "shared_embedding", False):
                name = p.init_name
            out.append((name, p))
        out += [(name, t) for name, t in model.state_dict(keep_vars=True).items()
                if not isinstance(t, torch.nn.Parameter)]
    return out


def saved_local_shape(p):
    """The TP rank's tensor of ``p`` as a checkpoint holds it: an expert parameter's with all the experts."""
    if not hasattr(p, "expert_first"):
        return list(p.shape)
    return [p.full_shape[0]] + list(p.shape[1:])


def expert_offset(p):
    """Where this rank's flattened ``p`` starts in the flattened ``saved_local_shape(p)`` (0 but for the
    experts of an expert-parallel rank)."""
    return getattr(p, "expert_first", 0) * math.prod(p.shape[1:])


def tensor_meta(p):
    """What a reader under another layout needs to re-cut ``p``: its unpadded full shape, split dimension,
    the TP size and this TP rank's local shape."""
    return {"full_shape": list(getattr(p, "full_shape", p.shape)), "partition_dim": getattr(p, "partition_dim", None),
            "tp_size": ps.get_tp_size(), "dtype": dtype_name(p.dtype),
            "local_shape": saved_local_shape(p)}


def _write_ranges(buffer, expert=False):
    """The [lo, hi) ranges of ``buffer`` this rank writes (see the module docstring)."""
    if buffer.shard:
        return buffer.owned_ranges()
    if buffer.group is None:  # a model without the data-parallel wrapper: DP rank 0 writes it all (its
        # experts: every rank of DP rank 0's expert-parallel group, the first ep ranks of DP)
        first = ps.get_dp_rank() < (ps.get_ep_size() if expert else 1)
        return [(0, buffer.numel)] if first and ps.get_cp_rank() == 0 else []
    n, r, d = buffer.numel, buffer.dp_rank, buffer.dp_size
    return [(n * r // d, n * (r + 1) // d)]


def _pieces_of(p, buffer, shards):
    """(kind, lo, hi, flat view) of ``p`` this rank writes; lo/hi index the flattened local tensor."""
    p_lo, p_hi = buffer.param_range[id(p)]
    for w_lo, w_hi in _write_ranges(buffer, hasattr(p, "expert_first")):
        lo, hi = max(p_lo, w_lo), min(p_hi, w_hi)
        if lo >= hi:
            continue
        yield "param", lo - p_lo, hi - p_lo, buffer.param_data[lo:hi]
        for s in shards:
            a, z = max(lo, s.start), min(hi, s.end)
            for kind in OPTIMIZER_KINDS if a < z else ():
                if kind != "master" or s.has_master_copy:
                    yield kind, a - p_lo, z - p_lo, getattr(s, kind)[a - s.start:z - s.start]


class _Alone:
    """A parameter outside any flat buffer, seen as a buffer of one (not sharded, no DP group)."""

    def __init__(self, p):
        self.shard, self.group, self.numel = False, None, p.numel()
        self.param_range = {id(p): (0, p.numel())}
        self.param_data = p.detach().reshape(-1)


def plan_pieces(chunks, optimizer):
    """(tensors, index): {key: flat tensor view} this rank writes, and {name: {**tensor_meta, "pieces":
    [[kind, lo, hi, key], ...]}} for every parameter it holds (pieces may be empty)."""
    buffers = list(optimizer.buffers) if optimizer is not None else \
        [b for c in chunks for b in getattr(c, "grad_buffers", ())]
    where = {id(p): b for b in buffers for p in b.params}
    shards = {}
    for s in optimizer.shards if optimizer is not None else ():
        shards.setdefault(id(s.buffer), []).append(s)
    tp_rank = ps.get_tp_rank()
    tensors, index = {}, {}
    for name, p in named_parameters(chunks):
        entry = index[name] = {**tensor_meta(p), "pieces": []}
        if getattr(p, "shared_embedding", False) or (entry["partition_dim"] is None and tp_rank != 0):
            continue
        buffer = where.get(id(p))
        if buffer is None:  # a weights-only save of chunks without the wrapper: a buffer of its own
            buffer = _Alone(p)
        offset = expert_offset(p)
        for kind, lo, hi, flat in _pieces_of(p, buffer, shards.get(id(buffer), [])):
            lo, hi = lo + offset, hi + offset
            key = piece_key(kind, name, tp_rank, lo)
            tensors[key] = flat
            entry["pieces"].append([kind, lo, hi, key])
    return tensors, index


def rng_tensors():
    """This rank's random states as named uint8 tensors: CPU, CUDA, and the model-parallel tracker's."""
    out = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng/cuda"] = torch.cuda.get_rng_state()
    out.update({f"rng/tracker/{k}": v for k, v in get_rng_tracker().get_states().items()})
    return out


def set_rng_tensors(tensors):
    torch.set_rng_state(tensors["rng/cpu"])
    get_rng_tracker().set_states({k[len("rng/tracker/"):]: v for k, v in tensors.items()
                                  if k.startswith("rng/tracker/")})
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


def snapshot(tensors, copy, pool=None):
    """The tensors to write, in host memory. ``copy`` (asynchronous saves) copies them, because training
    goes on changing the originals; GPU tensors always come over, into pinned memory so the copies run
    at full bus speed. A synchronous save of CPU tensors writes them where they are. ``pool`` ({key:
    host tensor}, kept by the caller between saves) is reused when the pieces have not changed shape:
    allocating (and on CUDA pinning) a rank's share of the model state again at every save costs more
    than copying it."""
    out, on_gpu = {}, False
    pool = {} if pool is None else pool
    for key, t in tensors.items():
        if t.device.type == "cpu" and not copy:
            out[key] = t
            continue
        on_gpu = on_gpu or t.device.type == "cuda"
        host = pool.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = pool[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        host.copy_(t, non_blocking=t.device.type == "cuda")
        out[key] = host
    for key in set(pool) - set(tensors):
        del pool[key]
    if on_gpu:
        torch.cuda.synchronize()
    return out


class ShardWriter:
    """Writes one rank's file, at once or on a background thread. ``record`` ({"bytes", "sha256"}) or
    ``error`` (one line) says how it went once ``done()``."""

    def __init__(self, tensors, path, background):
        self.path, self._tensors = path, tensors
        self.record, self.error = None, None
        self._thread = threading.Thread(target=self._write, name="megagopher-checkpoint-writer", daemon=True) \
            if background else None
        if self._thread is not None:
            self._thread.start()
        else:
            self._write()

    def _write(self):
        try:
            self.record = write_shard(self._tensors, self.path)
        except Exception as e:  # disk full, read-only, quota: reported to every rank, which decide together
            self.error = f"{self.path}: {e}"
        finally:
            self._tensors = None

    def done(self):
        return self._thread is None or not self._thread.is_alive()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
