"""The trainer's side of checkpoints (a base class of ``Trainer``, training/loop.py): restoring the newest
usable checkpoint at start-up, saving, the progress a checkpoint records, progressive stacking (which goes
through a weights-only checkpoint so it works under any layout), and where a restored run goes on.

A stage's last checkpoint records that stage with all its steps done (stage_iteration = its train_iters),
so rerunning the same command with more steps, or with a stage added, continues from it.
"""
import os
import shutil

import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.training import checkpoint as ckpt


class CheckpointedRun:
    """Needs from the subclass: cfg, rank, device, chunks, optimizer, checkpointer, _build_model, _wrap."""

    def _restore_or_build(self):
        """Loads the newest usable checkpoint, else starts fresh. Every file this rank will read (weights,
        optimizer state, RNG) is checked before the trainer commits to a checkpoint, so a damaged one of any
        kind falls back to the one before; the same collectives run on every rank whatever fails where."""
        c = self.cfg.checkpoint
        for path in ckpt.resolve_load(c.load, c.dir):
            reader, chunks, files, error = None, None, set(), None
            try:
                reader = ckpt.CheckpointReader(path)
                chunks = self._build_model(reader.meta["progress"]["num_layers"])
                same_layout = reader.meta["layout"] == ckpt.layout()
                files = ckpt.files_needed(reader, chunks, reader.meta.get("has_optimizer"),
                                          self.rank if same_layout else None)
            except (ckpt.CheckpointCorrupt, KeyError, TypeError, ValueError, OSError) as e:
                error = e
            error = ckpt.verify_on_node(reader, files) or error
            if error is None:
                try:
                    ckpt.load_weights(reader, chunks)
                except (ckpt.CheckpointCorrupt, KeyError, RuntimeError, OSError) as e:
                    error = e
            if ckpt.agree(error is None):
                self._resume_from(reader, chunks)
                return
            if self.rank == 0 or error is not None:
                print(f"megagopher: checkpoint {path} cannot be used ({error or 'corrupt on another rank'}); "
                      "trying the previous one", flush=True)
        self.chunks = self._wrap(self._build_model(self.num_layers))

    def _resume_from(self, reader, chunks):
        progress = reader.meta["progress"]
        self.iteration, self.consumed_tokens = progress["iteration"], progress["consumed_tokens"]
        self.stage_index, self.stage_iteration = progress["stage_index"], progress["stage_iteration"]
        self.stage_samples = progress["stage_samples"]
        self.skipped_total = progress.get("skipped_total", 0)
        self.chunks = self._wrap(chunks)
        if reader.meta.get("has_optimizer"):
            self.pending_optimizer = reader
        rng = reader.rng_tensors(self.rank) if reader.meta["layout"] == ckpt.layout() else None
        if rng is not None:  # the same ranks: continue their random streams exactly
            ckpt.set_rng_tensors(rng)
        else:  # a new layout has new ranks: streams derived from (seed, iteration), reproducible in turn
            model_parallel_seed(ckpt.resume_seed(self.cfg.training.seed, self.iteration), ps.get_tp_rank(),
                                ps.get_pp_rank(), self.device)
        if self.rank == 0:
            print(f"megagopher: resumed from {reader.path} (stage {self.stage_index}, step {self.stage_iteration}, "
                  f"iteration {self.iteration})", flush=True)

    def _grow(self, num_layers):
        """Progressive stacking (Gong et al. 2019): a deeper model whose layer i starts as layer i mod L of
        the current one. Goes through a weights-only checkpoint so it works under any layout."""
        old = self.num_layers
        tmp_root = os.path.join(self.cfg.run.dir, ".grow")
        path = ckpt.save_checkpoint(tmp_root, self.iteration, self.chunks, None, self._progress(), self.cfg)
        reader = ckpt.CheckpointReader(path)

        def source(name):
            if name.startswith("layers."):
                index, rest = name.split(".", 2)[1:]
                return f"layers.{int(index) % old}.{rest}"
            return name

        chunks = self._build_model(num_layers)
        ckpt.load_weights(reader, chunks, name_map=source)
        self.chunks = self._wrap(chunks)
        self.optimizer = None
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(tmp_root, ignore_errors=True)
            print(f"megagopher: grew the model from {old} to {num_layers} layers (progressive stacking)", flush=True)

    def _progress(self):
        return {"iteration": self.iteration, "consumed_tokens": self.consumed_tokens, "stage_index": self.stage_index,
                "stage_iteration": self.stage_iteration, "stage_samples": self.stage_samples,
                "num_layers": self.num_layers,
                "skipped_total": self.skipped_total}

    def save(self):
        if self.cfg.checkpoint.dir:
            self.checkpointer.save(self.iteration, self.chunks, self.optimizer, self._progress(), self.cfg)

    def _skip_finished_stages(self):
        """A checkpoint from a stage's end names that stage with all its steps done. Given more steps
        (training.train_iters raised, as with Megatron's --train-iters) the stage goes on; else the next
        stage (perhaps one added since) starts."""
        while self.stage_index < len(self.cfg.stages) and self.stage_iteration > 0 and \
                self.stage_iteration >= self.cfg.stage(self.stage_index).training.train_iters:
            self.stage_index, self.stage_iteration, self.stage_samples = self.stage_index + 1, 0, 0
