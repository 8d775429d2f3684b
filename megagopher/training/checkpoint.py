"""Sharded, crash-safe checkpoints that load under any parallel layout (docs/ARCHITECTURE.md 4.6).

Layout of one checkpoint (format 3):
    <dir>/iter_0000042/rank_00003.safetensors   what rank 3 alone holds: ranges of its parameters and of
                                                its optimizer shard, and its RNG states (ckpt_save.py)
    <dir>/iter_0000042/metadata.json            config, layout, progress, versions, the index of every
                                                piece (tensor name, TP rank, element range, file), and
                                                the size and sha256 of every file; written last
    <dir>/latest                                the newest complete iteration, written after the rename

Memory and traffic. No rank gathers anything or copies a buffer: each writes the memory it already holds
(ZeRO-1 shards included: the bytes written are the model state once), and each reads back only the
ranges its new layout needs, straight into its parameters and shards (ckpt_reader.py, ckpt_load.py).

Why not torch.distributed.checkpoint: our shards are not plain slices of one global tensor in every
layout (the vocabulary is padded to a multiple of 128 * tp, so the embedding's global shape changes with
tp, and ZeRO-1 shards cut flat buffers across parameters). Indexing pieces by layout-independent name and
element range of the TP-local tensor, with the unpadded full shape, keeps resharding one rule and gives
the converter and the Hugging Face exporter a format they read without processes.

The format itself (names, metadata schema and digest, the publish sequence, which checkpoint is the
newest) is ckpt_format.py's; this module is the trainer's collective use of it.

Crash safety. A checkpoint is written to ``iter_N.tmp``; once every rank's file is on disk (fsynced) rank
0 writes metadata.json (fsynced), renames the directory into place, fsyncs the root, and moves ``latest``
the same way (ckpt_format.publish): an ``iter_N`` directory is complete or absent. A checkpoint of the
same step that was there already is removed only after its replacement is in place, and old ones
(keep_last) only after ``latest`` names the new one. Checksums are verified before a trainer commits to a
checkpoint; one that fails falls back to the previous one.

Asynchronous saves (checkpoint.async_save). The step pays for a snapshot of the rank's pieces into host
memory (pinned on CUDA; allocated once and reused, so one copy of the rank's share stays allocated between
saves); a thread writes the file. Every step's all-reduce carries "my write is done", so
all ranks see the same step at which every file is on disk, and rank 0 publishes the checkpoint then;
the next save, the end of a stage and the end of the run wait for it. A crash before that leaves only
``iter_N.tmp``: the previous checkpoint stays the newest complete one.

A checkpoint without optimizer state (has_optimizer false: a weights-only save, or tools/import_hf.py's
iteration-0 checkpoint, ``save_weights_only``) starts a loading run's optimizer fresh, as Megatron's
--finetune / --no-load-optim do: nothing else is needed to fine-tune from it. Its metadata leaves dp and
world open (null) and holds no RNG state, so the run seeds itself from (training.seed, iteration). The
run's [model] must be the checkpoint's (ckpt_load.check_model_matches: a ModelMismatch, a config error,
names the key).
"""
import hashlib
import os
import shutil

import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.config import to_tables
from megagopher.errors import CheckpointSaveError, SaveFailed
from megagopher.training import ckpt_format as fmt
from megagopher.training.agreement import agree
from megagopher.training.ckpt_files import CheckpointCorrupt, write_shard  # noqa: F401
from megagopher.training.ckpt_format import (FORMAT_VERSION, find_checkpoints, iter_dir,  # noqa: F401
                                             list_checkpoints, write_latest)
from megagopher.training.ckpt_load import (ModelMismatch, check_model_matches, files_needed,  # noqa: F401
                                           load_optimizer, load_weights, verify_on_node)
from megagopher.training.ckpt_reader import CheckpointReader  # noqa: F401
from megagopher.training.ckpt_save import (ShardWriter, named_parameters, plan_pieces, rng_tensors,  # noqa: F401
                                           set_rng_tensors, snapshot)


def layout():
    out = {"tp": ps.get_tp_size(), "pp": ps.get_pp_size(), "dp": ps.get_dp_size(), "vpp": ps.get_vpp_size(),
           "cp": ps.get_cp_size(), "world": dist.get_world_size()}
    if ps.get_ep_size() > 1:  # named only when used, so checkpoints from before expert parallelism compare equal
        out["ep"] = ps.get_ep_size()
    return out


def resume_seed(seed, iteration):
    """The seed of a resume under a new layout: a function of (seed, iteration), so the resumed run is itself
    reproducible and does not replay the random streams the run began with."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{iteration}".encode()).digest()[:8], "little") >> 1


class PendingSave:
    """A checkpoint being written: its directory, this rank's writer and what rank 0 needs to publish it."""

    def __init__(self, root, iteration, writer, index, header):
        self.root, self.iteration, self.writer, self.index, self.header = root, iteration, writer, index, header

    @property
    def tmp_dir(self):
        return fmt.staging_dir(iter_dir(self.root, self.iteration))


def begin_save(root, iteration, chunks, optimizer, progress, cfg, background=False, pool=None):
    """Starts a checkpoint: rank 0 makes ``iter_N.tmp``, every rank snapshots (background; into ``pool``,
    see ckpt_save.snapshot) or writes its file. Collective. Raises CheckpointSaveError (on every rank)
    when the directory cannot be made."""
    rank = dist.get_rank()
    tmp_dir = fmt.staging_dir(iter_dir(root, iteration))
    error = None
    if rank == 0:
        try:
            fmt.start_staging(iter_dir(root, iteration))
        except OSError as e:
            error = e
    if not agree(error is None):
        raise CheckpointSaveError(f"cannot create {tmp_dir}: {error or 'failed on rank 0'}")
    for chunk in chunks:  # ZeRO-1's parameter all-gathers may still be writing the buffers the pieces view
        if hasattr(chunk, "finish_param_gather"):
            chunk.finish_param_gather()
    tensors, index = plan_pieces(chunks, optimizer)
    tensors.update(rng_tensors())
    path = os.path.join(tmp_dir, fmt.rank_file(rank))
    writer = ShardWriter(snapshot(tensors, copy=background, pool=pool), path, background)
    del tensors
    header = None
    if rank == 0:  # the scalars as they are now, not when the background write ends (ckpt_format.build_metadata)
        header = {"iteration": iteration, "progress": dict(progress), "layout": layout(), "config": to_tables(cfg),
                  "has_optimizer": optimizer is not None,
                  "optimizer_scalars": optimizer.scalar_state() if optimizer is not None else None}
    return PendingSave(root, iteration, writer, index, header)


def finish_save(pending, keep_last=0):
    """Waits for this rank's file, then rank 0 publishes the checkpoint. Collective; returns its path, or
    raises CheckpointSaveError on every rank (the temporary directory is removed, nothing else touched)."""
    pending.writer.wait()
    world, rank = dist.get_world_size(), dist.get_rank()
    w = pending.writer
    gathered = [None] * world
    dist.all_gather_object(gathered, (os.path.basename(w.path), w.record, w.error, ps.get_tp_rank(), pending.index))
    errors = [g[2] for g in gathered if g[2]]
    final = iter_dir(pending.root, pending.iteration)
    if rank == 0 and not errors:
        try:
            tensors, files = fmt.index_files([(file, record, tp_rank, index)
                                              for file, record, _, tp_rank, index in gathered])
            rng_files = {r: file for r, (file, *_) in enumerate(gathered)}  # each rank's RNG is in its file
            fmt.publish(final, fmt.build_metadata(**pending.header, tensors=tensors, files=files,
                                                  rng_files=rng_files), keep_last)
        except OSError as e:
            errors.append(f"{final}: {e}")
    if not agree(not errors):
        if rank == 0:
            shutil.rmtree(pending.tmp_dir, ignore_errors=True)
        raise CheckpointSaveError(errors[0] if errors else f"publishing {final} failed on rank 0")
    return final


def save_checkpoint(root, iteration, chunks, optimizer, progress, cfg, keep_last=0):
    """A synchronous save: collective over all ranks. ``progress``: iteration, stage_index, stage_iteration,
    consumed tokens...; ``optimizer`` may be None (a weights-only checkpoint, e.g. for growth)."""
    return finish_save(begin_save(root, iteration, chunks, optimizer, progress, cfg), keep_last)


def save_weights_only(root, iteration, model, progress, cfg, note=None):
    """One process, no process group: ``model`` (a whole GPTModel at tp 1) as a format-3 checkpoint of
    ``iteration`` in ``root`` with no optimizer and no RNG state, published as save_checkpoint publishes
    (metadata last, rename, ``latest``). ``note`` goes into the metadata (where the weights came from).
    Returns the iteration directory."""
    final = iter_dir(root, iteration)
    tmp_dir = fmt.start_staging(final)
    tensors, index = plan_pieces([model], None)
    file = fmt.rank_file(0)
    record = write_shard({k: t.contiguous() for k, t in tensors.items()}, os.path.join(tmp_dir, file))
    entries, files = fmt.index_files([(file, record, 0, index)])
    meta = fmt.build_metadata(iteration, progress, fmt.open_layout(tp=1, pp=1, vpp=1), to_tables(cfg), entries,
                              files, has_optimizer=False, rng_files={}, rng="none: a loading run seeds itself",
                              source=note)
    return fmt.publish(final, meta)


class Checkpointer:
    """The trainer's saves: synchronous, or asynchronous with at most one in flight (module docstring)."""

    def __init__(self, root, keep_last=0, async_save=False, on_error="stop"):
        self.root, self.keep_last, self.async_save, self.on_error = root, keep_last, async_save, on_error
        self.pending = None
        self.pool = {}  # the host snapshot asynchronous saves reuse (one copy of this rank's share)

    def save(self, iteration, chunks, optimizer, progress, cfg):
        """Collective. Returns the path once published (synchronous), or None while it is written."""
        self.wait()
        try:
            pending = begin_save(self.root, iteration, chunks, optimizer, progress, cfg, background=self.async_save,
                                 pool=self.pool)
        except CheckpointSaveError as e:
            return self._failed(e)
        if self.async_save:
            self.pending = pending
            return None
        return self._finish(pending)

    def write_done(self):
        """True when this rank has no background write running (what each step's all-reduce carries)."""
        return self.pending is None or self.pending.writer.done()

    def poll(self, every_rank_done):
        """After a step's all-reduce: publishes the pending checkpoint once every rank's write is done."""
        if self.pending is not None and every_rank_done:
            self.wait()

    def wait(self):
        """Collective: finishes the pending save, if any (the next save, a stage's end, the run's end)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._finish(pending)

    def _finish(self, pending):
        try:
            path = finish_save(pending, self.keep_last)
        except CheckpointSaveError as e:
            return self._failed(e)
        if dist.get_rank() == 0:
            print(f"megagopher: saved checkpoint {path}", flush=True)
        return path

    def _failed(self, error):
        """checkpoint.on_save_error: "stop" raises SaveFailed on every rank, "continue" trains on."""
        previous = list_checkpoints(self.root)
        kept = f"the previous checkpoint {iter_dir(self.root, previous[-1])} is intact" if previous else \
            "no earlier checkpoint exists"
        message = f"checkpoint save failed ({error}); {kept}"
        if self.on_error == "stop":
            raise SaveFailed(f"{message}; stopping (checkpoint.on_save_error = \"continue\" trains on)")
        if dist.get_rank() == 0:
            print(f"megagopher: {message}; training continues (checkpoint.on_save_error = \"continue\")", flush=True)
        return None


def resolve_load(load, root):
    """checkpoint.load: "" (start fresh), "auto" (the checkpoints of checkpoint.dir), or a path."""
    if not load:
        return []
    return find_checkpoints(root if load == "auto" else load)


__all__ = ["CheckpointCorrupt", "CheckpointReader", "CheckpointSaveError", "Checkpointer", "FORMAT_VERSION",
           "ModelMismatch", "agree", "check_model_matches", "files_needed", "find_checkpoints", "iter_dir", "layout",
           "list_checkpoints", "load_optimizer", "load_weights", "named_parameters", "resume_seed", "resolve_load",
           "save_checkpoint", "save_weights_only", "set_rng_tensors", "verify_on_node", "write_latest"]
