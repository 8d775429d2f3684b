"""The trainer's side of checkpoints (a base class of ``Trainer``, training/loop.py): restoring the newest
usable checkpoint at start-up, saving, the progress a checkpoint records, progressive stacking (which goes
through a weights-only checkpoint so it works under any layout), and where a restored run goes on.

A stage's last checkpoint records that stage with all its steps done (stage_iteration = its train_iters),
so rerunning the same command with more steps, or with a stage added, continues from it.
"""
import os
import re
import shutil

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.tensor_parallel.layers import take_shard
from megagopher.training import checkpoint as ckpt
from megagopher.training.ckpt_load import read_slice

# An expert parameter of an upcycled layer and the dense MLP parameter its E copies start from.
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.)experts\.(fc[12]\.(?:weight|bias))$")


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
                progress = reader.meta["progress"]
                chunks = self._build_model(progress["num_layers"],
                                           progress.get("num_experts", self.cfg.model.num_experts))
                same_layout = reader.meta["layout"] == ckpt.layout()
                files = ckpt.files_needed(reader, chunks, reader.meta.get("has_optimizer"),
                                          self.rank if same_layout else None)
            except (ckpt.CheckpointCorrupt, KeyError, TypeError, ValueError, OSError) as e:
                error = e
            if reader is not None:  # another model is a config error, not a damaged checkpoint to fall back past
                ckpt.check_model_matches(reader, self.cfg, self.vocab_size)
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

    def _grow(self, num_layers, num_experts):
        """Progressive stacking (Gong et al. 2019): a deeper model whose layer i starts as layer i mod L of
        the current one; and/or sparse upcycling (Komatsuzaki et al. 2022): each MoE layer's experts start
        as copies of the dense MLP, its router fresh (docs/moe.md). Goes through a weights-only checkpoint
        so it works under any layout."""
        old, old_experts = self.num_layers, self.num_experts
        tmp_root = os.path.join(self.cfg.run.dir, ".grow")
        path = ckpt.save_checkpoint(tmp_root, self.iteration, self.chunks, None, self._progress(), self.cfg)
        reader = ckpt.CheckpointReader(path)

        def source(name):
            if name.startswith("layers."):
                index, rest = name.split(".", 2)[1:]
                return f"layers.{int(index) % old}.{rest}"
            return name

        chunks = self._build_model(num_layers, num_experts)
        _load_grown(reader, chunks, source)
        self.chunks = self._wrap(chunks)
        self.optimizer = None
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(tmp_root, ignore_errors=True)
            if num_layers != old:
                print(f"megagopher: grew the model from {old} to {num_layers} layers (progressive stacking)",
                      flush=True)
            if num_experts != old_experts:
                print(f"megagopher: upcycled the dense MLPs into {num_experts} experts with fresh routers "
                      "(sparse upcycling)", flush=True)

    def _progress(self):
        return {"iteration": self.iteration, "consumed_tokens": self.consumed_tokens, "stage_index": self.stage_index,
                "stage_iteration": self.stage_iteration, "stage_samples": self.stage_samples,
                "num_layers": self.num_layers, "num_experts": self.num_experts,
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


@torch.no_grad()
def _load_grown(reader, chunks, source):
    """Every parameter of the grown ``chunks`` from the checkpoint: under the saved name ``source(name)``,
    or, for the experts of an upcycled layer, E copies of the dense MLP's tensor (then cut for this TP rank);
    an upcycled layer's router keeps its fresh initial values."""
    saved = set(reader.names())
    for name, p in ckpt.named_parameters(chunks):
        origin = source(name)
        if origin in saved:
            read_slice(reader, origin, "param", p, 0, p.data.view(-1))
            continue
        expert = _EXPERT.match(origin)
        if expert and expert.group(1) + expert.group(2) in saved:
            dense = reader.full_tensor(expert.group(1) + expert.group(2))
            full = dense.unsqueeze(0).expand(p.full_shape[0], *dense.shape)
            p.copy_(take_shard(p, full, ps.get_tp_rank(), ps.get_tp_size()).to(p.dtype))
        elif not origin.endswith(".mlp.router.weight"):
            raise KeyError(f"growing the model: no saved tensor {origin!r} to start {name!r} from")
