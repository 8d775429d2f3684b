"""The trainer's progress and its side of checkpoints (training/loop.py's ``Trainer`` holds a ``TrainState``
and calls these functions; it inherits nothing): the progress a checkpoint records, where a run's weights
come from at start-up, and progressive stacking (which goes through a weights-only checkpoint so it works
under any layout).

Where the weights come from, in this order (torchtitan separates the two in the same way: its checkpoint
folder and its ``initial_load_path``):
  1. resume: the newest usable checkpoint that checkpoint.load names ("auto": checkpoint.dir's, where this
     run saves), with its progress, optimizer state and random streams;
  2. initial load: when there is none, checkpoint.initial_load's weights only (an imported model), at
     iteration 0 with a fresh optimizer;
  3. initialisation from training.seed.
Rank 0 prints one line saying which, at every start.

A stage's last checkpoint records that stage with all its steps done (stage_iteration = its train_iters),
so rerunning the same command with more steps, or with a stage added, continues from it.
"""
import dataclasses
import os
import re
import shutil

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.errors import InputError
from megagopher.config import ConfigError
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.tensor_parallel.layers import take_shard
from megagopher.training import checkpoint as ckpt
from megagopher.training.agreement import agree
from megagopher.training.ckpt_load import read_slice

# An expert parameter of an upcycled layer and the dense MLP parameter its E copies start from.
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.)experts\.(fc[12]\.(?:weight|bias))$")
# What a checkpoint cannot do without; older ones lack num_experts and skipped_total (the run's own then).
_REQUIRED = ("iteration", "consumed_tokens", "stage_index", "stage_iteration", "stage_samples", "num_layers")
# What a checkpoint that cannot be used raises while it is opened, checked and read.
_DAMAGED = (ckpt.CheckpointCorrupt, KeyError, TypeError, ValueError, OSError)


@dataclasses.dataclass
class TrainState:
    """The trainer's progress: what a checkpoint records beside its tensors (metadata.json "progress")."""
    iteration: int = 0  # optimizer steps over the whole run, every stage
    consumed_tokens: int = 0
    stage_index: int = 0
    stage_iteration: int = 0  # steps done in the current stage
    stage_samples: int = 0  # samples consumed in the current stage: the data position (ramp-up aware)
    num_layers: int = 0  # the model's depth now: progressive stacking changes it
    num_experts: int | None = None  # the experts per MoE layer now: sparse upcycling changes it
    skipped_total: int = 0  # steps skipped (a non-finite loss under nan_policy "skip", an fp16 overflow)

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, saved):
        """Takes a checkpoint's progress; a key it lacks keeps this state's value, unless it is required."""
        missing = [key for key in _REQUIRED if key not in saved]
        if missing:
            raise KeyError(f"the checkpoint's progress lacks {', '.join(missing)}")
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])

    def next_stage(self):
        self.stage_index, self.stage_iteration, self.stage_samples = self.stage_index + 1, 0, 0


def check_load_paths(cfg, vocab_size):
    """Before any collective (invariant 6), from disk: checkpoint.load names a checkpoint when it is a path,
    and checkpoint.initial_load, when this run will start from it (load finds nothing), is a readable
    checkpoint of this run's model (whose vocabulary is ``vocab_size``). Raises ConfigError naming the key."""
    c = cfg.checkpoint
    if c.load not in ("", "auto") and not ckpt.find_checkpoints(c.load):
        raise ConfigError(f"checkpoint.load = {c.load!r}: no checkpoint there (an iter_NNNNNNN directory, or a "
                          "checkpoint root holding one); \"auto\" resumes from checkpoint.dir if it has one")
    if c.initial_load and not ckpt.resolve_load(c.load, c.dir):
        _open_initial(cfg, vocab_size)


def _open_initial(cfg, vocab_size):
    """The reader of checkpoint.initial_load's newest checkpoint, its model checked against the run's;
    ConfigError when it is missing or unusable."""
    path = cfg.checkpoint.initial_load
    found = ckpt.find_checkpoints(path)
    if not found:
        raise ConfigError(f"checkpoint.initial_load = {path!r}: no checkpoint there (an iter_NNNNNNN directory, "
                          "or a checkpoint root holding one)")
    try:
        reader = ckpt.CheckpointReader(found[0])
        saved_layers = reader.meta["progress"]["num_layers"]
    except _DAMAGED as e:
        raise ConfigError(f"checkpoint.initial_load = {path!r}: {found[0]} cannot be read ({e})") from None
    ckpt.check_model_matches(reader, cfg, vocab_size)
    if saved_layers != cfg.model.num_layers:
        raise ConfigError(f"checkpoint.initial_load = {path!r} holds {saved_layers} layers but model.num_layers = "
                          f"{cfg.model.num_layers}: a run starts from all of its layers")
    return reader


def restore_or_build(cfg, state, build, vocab_size, device):
    """The model chunks this run starts from, from where the module docstring says. ``build(num_layers,
    num_experts)`` makes fresh, unwrapped chunks; ``state`` is the progress of a fresh run. Returns (chunks,
    progress, reader of the optimizer state to load or None). Every rank runs the same collectives."""
    c = cfg.checkpoint
    for path in ckpt.resolve_load(c.load, c.dir):
        resumed = _try_resume(path, cfg, state, build, vocab_size)
        if resumed is not None:
            reader, chunks, saved = resumed
            _continue_random_streams(reader, saved.iteration, cfg.training.seed, device)
            if dist.get_rank() == 0:
                print(f"megagopher: resumed from {reader.path} (stage {saved.stage_index}, step "
                      f"{saved.stage_iteration}, iteration {saved.iteration})", flush=True)
            return chunks, saved, reader if reader.meta.get("has_optimizer") else None
    chunks = build(state.num_layers, state.num_experts)
    if c.initial_load:
        path = _initial_load(cfg, chunks, vocab_size)
        where = f"{path} (initial load of its weights: iteration 0, a fresh optimizer)"
    else:
        where = f"initialisation (training.seed = {cfg.training.seed}, iteration 0)"
    if dist.get_rank() == 0:
        print(f"megagopher: weights from {where}", flush=True)
    return chunks, state, None


def _try_resume(path, cfg, state, build, vocab_size):
    """(reader, chunks, progress) of the checkpoint ``path`` when every rank can use it, else None. Every
    file this rank will read (weights, optimizer state, RNG) is checked before the trainer commits to it, so
    a damaged one of any kind falls back to the one before; the same collectives run on every rank
    whatever fails where."""
    reader, chunks, files, error, saved = None, None, set(), None, dataclasses.replace(state)
    try:
        reader = ckpt.CheckpointReader(path)
        saved.load_state_dict(reader.meta["progress"])
        chunks = build(saved.num_layers, saved.num_experts)
        same_layout = reader.meta["layout"] == ckpt.layout()
        files = ckpt.files_needed(reader, chunks, reader.meta.get("has_optimizer"),
                                  dist.get_rank() if same_layout else None)
    except _DAMAGED as e:
        error = e
    if reader is not None:  # another model is a config error, not a damaged checkpoint to fall back past
        ckpt.check_model_matches(reader, cfg, vocab_size)
    error = ckpt.verify_on_node(reader, files) or error
    if error is None:
        try:
            ckpt.load_weights(reader, chunks)
        except (ckpt.CheckpointCorrupt, KeyError, RuntimeError, OSError) as e:
            error = e
    if agree(error is None):
        return reader, chunks, saved
    if dist.get_rank() == 0 or error is not None:
        print(f"megagopher: checkpoint {path} cannot be used ({error or 'corrupt on another rank'}); "
              "trying the previous one", flush=True)
    return None


def _continue_random_streams(reader, iteration, seed, device):
    rng = reader.rng_tensors(dist.get_rank()) if reader.meta["layout"] == ckpt.layout() else None
    if rng is not None:  # the same ranks: continue their random streams exactly
        ckpt.set_rng_tensors(rng)
    else:  # a new layout has new ranks: streams derived from (seed, iteration), reproducible in turn
        model_parallel_seed(ckpt.resume_seed(seed, iteration), ps.get_tp_rank(), ps.get_pp_rank(), device)


def _initial_load(cfg, chunks, vocab_size):
    """checkpoint.initial_load's weights into ``chunks`` (any saved layout; the random streams stay the
    seed's, as a fresh run's). Unusable on any rank: an InputError on every rank. Returns its path."""
    reader = _open_initial(cfg, vocab_size)
    error = ckpt.verify_on_node(reader, ckpt.files_needed(reader, chunks, False))
    if error is None:
        try:
            ckpt.load_weights(reader, chunks)
        except (ckpt.CheckpointCorrupt, KeyError, RuntimeError, OSError) as e:
            error = e
    if not agree(error is None):
        raise InputError(f"checkpoint.initial_load = {cfg.checkpoint.initial_load!r}: {reader.path} cannot be "
                         f"used ({error or 'damaged, as another rank found'})")
    return reader.path


def skip_finished_stages(cfg, state):
    """A checkpoint from a stage's end names that stage with all its steps done. Given more steps
    (training.train_iters raised, as with Megatron's --train-iters) the stage goes on; else the next
    stage (perhaps one added since) starts."""
    while state.stage_index < len(cfg.stages) and state.stage_iteration > 0 and \
            state.stage_iteration >= cfg.stage(state.stage_index).training.train_iters:
        state.next_stage()


def grow(cfg, state, chunks, build, num_layers, num_experts):
    """Progressive stacking (Gong et al. 2019): a deeper model whose layer i starts as layer i mod L of
    the current one; and/or sparse upcycling (Komatsuzaki et al. 2022): each MoE layer's experts start
    as copies of the dense MLP, its router fresh (docs/moe.md). Goes through a weights-only checkpoint
    so it works under any layout. Returns the new, unwrapped chunks; ``state`` takes the new shape."""
    old, old_experts = state.num_layers, state.num_experts
    tmp_root = os.path.join(cfg.run.dir, ".grow")
    path = ckpt.save_checkpoint(tmp_root, state.iteration, chunks, None, state.state_dict(), cfg)
    reader = ckpt.CheckpointReader(path)

    def source(name):
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            return f"layers.{int(index) % old}.{rest}"
        return name

    grown = build(num_layers, num_experts)
    _load_grown(reader, grown, source)
    state.num_layers, state.num_experts = num_layers, num_experts
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
        if num_layers != old:
            print(f"megagopher: grew the model from {old} to {num_layers} layers (progressive stacking)",
                  flush=True)
        if num_experts != old_experts:
            print(f"megagopher: upcycled the dense MLPs into {num_experts} experts with fresh routers "
                  "(sparse upcycling)", flush=True)
    return grown


@torch.no_grad()
def _load_grown(reader, chunks, source):
    """Every parameter of the grown ``chunks`` from the checkpoint: under the saved name ``source(name)``,
    or, for the experts of an upcycled layer, E copies of the dense MLP's tensor (then cut for this TP rank);
    an upcycled layer's router keeps its fresh initial values (its balancing bias: zero)."""
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
        elif not origin.endswith((".mlp.router.weight", ".mlp.router.expert_bias")):
            raise KeyError(f"growing the model: no saved tensor {origin!r} to start {name!r} from")
