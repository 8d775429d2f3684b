"""Sharded, crash-safe checkpoints that load under any parallel layout (docs/ARCHITECTURE.md 4.6).

Layout of one checkpoint:
    <dir>/iter_0000042/model_tp00_pp00.pt    this (tp, pp) rank's parameter shards, keyed by global name
    <dir>/iter_0000042/optim_tp00_pp00.pt    the optimizer's per-parameter state (fp32 master weights and
                                             Adam moments) in the same shard shapes, gathered over DP
    <dir>/iter_0000042/rng_rank00003.pt      every rank's RNG states (CPU, CUDA, tracker)
    <dir>/iter_0000042/metadata.json         config, layout, progress, versions, per-tensor index and
                                             a sha256 per file; written last
    <dir>/latest                             the newest complete iteration, written after the rename

Why not torch.distributed.checkpoint: our shards are not plain slices of one global tensor in every
layout. The vocabulary is padded to a multiple of 128 * tp, so the embedding's global shape itself
changes with tp, and the data-parallel shards of the distributed optimizer cut across parameters. Keying
every tensor by its layout-independent name and recording its *unpadded* full shape and split dimension
makes resharding one rule: join the saved shards, drop the padding, re-pad and slice for the new layout.
It also gives the offline converter and the Hugging Face exporter a format they can read without
processes or process groups.

A checkpoint is written to ``iter_N.tmp`` and renamed once every rank has written and rank 0 has written
the metadata, so an ``iter_N`` directory is complete or absent; ``latest`` is written (temp + rename)
after that. A file whose checksum does not match is reported and the previous checkpoint is used.
"""
import hashlib
import json
import os
import re
import shutil
import time

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import unwrap_model
from megagopher.config import to_tables
from megagopher.tensor_parallel.layers import take_shard
from megagopher.tensor_parallel.random import get_rng_tracker

FORMAT_VERSION = 2  # 2: the config is stored as TOML-shaped tables (config.to_tables)


class CheckpointCorrupt(RuntimeError):
    pass


def named_parameters(chunks):
    """(global name, parameter) of every parameter this rank holds; a tied-embedding copy on the last
    stage is named after the word embeddings it mirrors."""
    out = []
    for chunk in chunks:
        for name, p in unwrap_model(chunk).named_parameters():
            if getattr(p, "shared_embedding", False):
                name = p.init_name
            out.append((name, p))
    return out


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_file(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return _sha256(path)


def iter_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


def _tensor_meta(p, tp_size):
    return {"full_shape": list(getattr(p, "full_shape", p.shape)), "partition_dim": getattr(p, "partition_dim", None),
            "tp_size": tp_size}


def save_checkpoint(root, iteration, chunks, optimizer, progress, cfg, keep_last=0):
    """Collective over all ranks. ``progress``: iteration, stage_index, stage_iteration, consumed tokens...
    ``optimizer`` may be None (a weights-only checkpoint, e.g. at a stage boundary)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_rank, pp_rank, dp_rank = ps.get_tp_rank(), ps.get_pp_rank(), ps.get_dp_rank()
    final = iter_dir(root, iteration)
    tmp_dir = final + ".tmp"
    if rank == 0:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)  # left by a run killed mid-save
        os.makedirs(tmp_dir)
    dist.barrier()
    named = named_parameters(chunks)
    files, index = {}, {}
    tag = f"tp{tp_rank:02d}_pp{pp_rank:02d}"
    # Optimizer state is gathered over DP (collective), so every DP rank takes part before rank 0 of DP writes.
    opt_state = optimizer.param_state(named) if optimizer is not None else None
    if dp_rank == 0:
        model_file = f"model_{tag}.pt"
        files[model_file] = save_file({n: p.detach().cpu() for n, p in named}, os.path.join(tmp_dir, model_file))
        for n, p in named:
            index[n] = {**_tensor_meta(p, ps.get_tp_size()), "tp_rank": tp_rank, "file": model_file}
        if opt_state is not None:
            optim_file = f"optim_{tag}.pt"
            files[optim_file] = save_file(opt_state, os.path.join(tmp_dir, optim_file))
    rng_file = f"rng_rank{rank:05d}.pt"
    files[rng_file] = save_file(rng_states(), os.path.join(tmp_dir, rng_file))
    gathered = [None] * world
    dist.all_gather_object(gathered, (files, index))
    if rank == 0:
        all_files, tensors = {}, {}
        for f, idx in gathered:
            all_files.update(f)
            for name, meta in idx.items():
                entry = tensors.setdefault(name, {k: meta[k] for k in ("full_shape", "partition_dim", "tp_size")})
                entry.setdefault("shards", {})[str(meta["tp_rank"])] = meta["file"]
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "progress": progress,
                "layout": layout(), "config": to_tables(cfg), "tensors": tensors, "files": all_files,
                "has_optimizer": optimizer is not None,
                "optimizer_scalars": optimizer.scalar_state() if optimizer is not None else None,
                "versions": {"torch": torch.__version__, "megagopher": _version()}, "time": time.time()}
        with open(os.path.join(tmp_dir, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(iter_dir(root, old), ignore_errors=True)
        write_latest(root)
    dist.barrier()
    return final


def _version():
    import megagopher
    return megagopher.__version__


def layout():
    return {"tp": ps.get_tp_size(), "pp": ps.get_pp_size(), "dp": ps.get_dp_size(), "vpp": ps.get_vpp_size(),
            "world": dist.get_world_size()}


def write_latest(root):
    """``latest`` := the newest complete checkpoint in ``root``, the one ``find_checkpoints`` puts first,
    so the marker and the resolver always agree (temp name + rename: never half written)."""
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(f"{list_checkpoints(root)[-1]}\n")
    os.replace(tmp, os.path.join(root, "latest"))


def list_checkpoints(root):
    """Iterations of the complete checkpoints in ``root`` (those with metadata), oldest first."""
    its = []
    for name in os.listdir(root) if os.path.isdir(root) else []:  # not glob: a root may contain [ or *
        m = re.fullmatch(r"iter_(\d+)", name)
        if m and os.path.exists(os.path.join(root, name, "metadata.json")):
            its.append(int(m.group(1)))
    return sorted(its)


def rng_states():
    state = {"cpu": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state):
    torch.set_rng_state(state["cpu"])
    get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointReader:
    """Reads full, unpadded tensors by name from a checkpoint directory, verifying each file's checksum
    the first time it is opened. Needs no process group."""

    def __init__(self, path):
        self.path = path
        meta_path = os.path.join(path, "metadata.json")
        if not os.path.exists(meta_path):
            raise CheckpointCorrupt(f"{path}: no metadata.json (an incomplete checkpoint)")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointCorrupt(f"{meta_path}: unreadable ({e})") from None
        self._open = {}

    def _file(self, name):
        if name not in self._open:
            path = os.path.join(self.path, name)
            expected = self.meta["files"].get(name)
            if not os.path.exists(path):
                raise CheckpointCorrupt(f"{path}: missing")
            if expected is not None and _sha256(path) != expected:
                raise CheckpointCorrupt(f"{path}: checksum mismatch (file corrupt or truncated)")
            self._open[name] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._open[name]

    def names(self):
        return list(self.meta["tensors"])

    def full_tensor(self, name, prefix="model", key=None):
        """The whole tensor ``name`` (for prefix "optim", its state ``key``), with the vocab padding removed."""
        if name not in self.meta["tensors"]:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}")
        entry = self.meta["tensors"][name]
        shards = []
        for tp_rank in range(entry["tp_size"]):
            file = entry["shards"][str(tp_rank)].replace("model_", prefix + "_", 1)
            content = self._file(file)
            shards.append(content[name] if key is None else content[name][key])
            if entry["partition_dim"] is None:
                break
        full = torch.cat(shards, dim=entry["partition_dim"]) if entry["partition_dim"] is not None else shards[0]
        if entry["partition_dim"] is not None:
            full = full.narrow(entry["partition_dim"], 0, entry["full_shape"][entry["partition_dim"]])
        return full

    def optimizer_keys(self, name):
        entry = self.meta["tensors"][name]
        file = entry["shards"]["0"].replace("model_", "optim_", 1)
        return list(self._file(file)[name].keys())


def shard_for(param, full):
    """This rank's slice of ``full`` for ``param`` under the current layout (re-padding the vocabulary)."""
    return take_shard(param, full, ps.get_tp_rank(), ps.get_tp_size())


def load_weights(reader, chunks, name_map=None):
    """Copies every parameter of this rank's chunks from the checkpoint (any saved layout). ``name_map``
    maps a parameter's name to the saved name it starts from (progressive stacking)."""
    with torch.no_grad():
        for name, p in named_parameters(chunks):
            source = name_map(name) if name_map else name
            p.copy_(shard_for(p, reader.full_tensor(source)).to(p.dtype))


def load_optimizer(reader, chunks, optimizer):
    named = named_parameters(chunks)
    state = {}
    for name, p in named:
        state[name] = {key: shard_for(p, reader.full_tensor(name, "optim", key)) for key in reader.optimizer_keys(name)}
    optimizer.load_param_state(named, state)
    optimizer.load_scalar_state(reader.meta["optimizer_scalars"])


def find_checkpoints(path):
    """The one policy for "the newest checkpoint", used by training, generate, evaluate, export and convert:
    the checkpoint directories ``path`` names, newest first. ``path`` is one iter_N directory (then just it)
    or a checkpoint root (then its complete iter_N directories, those with metadata.json: a save is renamed
    into place only once complete, and ``latest`` is rewritten after every save to name the first of these).
    Loaders try them in order, so a corrupt newest checkpoint falls back to the one before."""
    if path and os.path.exists(os.path.join(path, "metadata.json")):
        return [path]
    if not path or not os.path.isdir(path):
        return []
    return [iter_dir(path, i) for i in reversed(list_checkpoints(path))]


def resolve_load(load, root):
    """checkpoint.load: "" (start fresh), "auto" (the checkpoints of checkpoint.dir), or a path."""
    if not load:
        return []
    return find_checkpoints(root if load == "auto" else load)


def agree(ok):
    """True only if ``ok`` on every rank (one all-reduce)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=ps.get_device())
    dist.all_reduce(flag)
    return int(flag.item()) == 0
