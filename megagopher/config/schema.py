"""The typed run configuration: one dataclass per TOML section, each field with its default, allowed values
and one-line doc (``python -m megagopher.train --help-config`` prints them), and the run as a whole
(``JobConfig``): the sections plus the ordered stages.

The modules below the config take these objects, not dicts. Library entry points that are also handy with
a plain dict (``wrap_data_parallel``, ``build_optimizer``, ``memory_report``) turn it into a section with
``coerce``, which checks every key and value against the same declarations.
"""
import dataclasses
import math
from dataclasses import dataclass, field

from megagopher.common import DEVICES, PRECISIONS, RECOMPUTE_MODES, SCHEDULES
from megagopher.config.fields import (ConfigError, check_field, check_key, is_int, is_number, option,
                                      section_from_dict)
from megagopher.config.model import GPTConfig
from megagopher.data.tokenizer import TOKENIZER_KINDS

DECAYS = ("cosine", "linear", "constant", "wsd")
_POSITIVE = (lambda v: v >= 1, "must be >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_UNIT = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def _int_list(minimum):
    return (lambda v: all(is_int(x) and x >= minimum for x in v),
            "must be non-negative integers" if minimum == 0 else f"must be integers >= {minimum}")


def _blend_ok(v):
    return all(isinstance(e, list) and len(e) == 2 and is_number(e[0]) and e[0] >= 0 and isinstance(e[1], str)
               for e in v)


_BLEND = (_blend_ok, "must be [[weight, path_prefix], ...] with weights >= 0")


@dataclass
class ParallelConfig:
    tp: int = option(1, "tensor-parallel size", check=_POSITIVE)
    pp: int = option(1, "pipeline-parallel size", check=_POSITIVE)
    dp: int = option(0, "data-parallel size; 0 = world size / (tp * cp * pp)", check=_NON_NEGATIVE)
    cp: int = option(1, "context-parallel size (ring attention over the sequence)", check=_POSITIVE)
    ep: int = option(1, "expert-parallel size: the experts of every MoE layer split over ep data-parallel ranks "
                        "(inside dp, as Megatron's; dp must be divisible by ep)", check=_POSITIVE)
    vpp: int = option(1, "virtual pipeline stages (model chunks) per pipeline rank", check=_POSITIVE)
    sp: bool = option(False, "sequence parallelism (needs tp > 1 to take effect)")
    schedule: str = option("1f1b", "pipeline schedule", choices=SCHEDULES)
    pp_layers: list = option([], "layers per pipeline stage, or per virtual stage (default: an even split)",
                             check=_int_list(0))
    trace: bool = option(False, "write a Chrome trace of the pipeline schedule to run.dir")
    bucket_size_mb: float = option(25.0, "data-parallel gradient bucket size in MiB (0 = one bucket)",
                                   check=_NON_NEGATIVE)
    overlap_grad_reduce: bool = option(True, "launch each bucket's reduction during the backward pass")
    backend: str = option("auto", "process-group backend (auto: nccl on CUDA, else gloo)",
                          choices=("auto", "gloo", "nccl"))
    timeout_s: int = option(600, "process-group timeout in seconds: a dead rank ends the job", check=_POSITIVE)


@dataclass
class TrainingConfig:
    micro_batch_size: int = option(1, "samples per micro-batch", check=_POSITIVE)
    global_batch_size: int = option(8, "samples per optimizer step", check=_POSITIVE)
    train_iters: int = option(10, "steps of a run without stages", check=_NON_NEGATIVE)
    seed: int = option(1234, "seed of initialisation, data order and dropout")
    precision: str = option("fp32", "parameter and activation dtype (16-bit keeps fp32 master weights)",
                            choices=PRECISIONS)
    recompute: str = option("none", "activation recomputation", choices=RECOMPUTE_MODES)
    recompute_num_layers: int = option(0, "with full recompute, only the first N layers of a chunk (0 = all)",
                                       check=_NON_NEGATIVE)
    log_interval: int = option(1, "console line every N steps", check=_POSITIVE)
    eval_interval: int = option(0, "validation every N steps (0 = never)", check=_NON_NEGATIVE)
    eval_iters: int = option(2, "global batches per validation", check=_POSITIVE)
    rampup_batch_size: list = option([], "Megatron's --rampup-batch-size: [start, increment, samples]",
                                     check=(lambda v: not v or (len(v) == 3 and all(is_int(x) and x > 0 for x in v)),
                                            "must be [start, increment, samples], positive integers"))
    log_params_norm: bool = option(False, "add the global parameter norm to every metrics row")
    initial_loss_scale: float = option(65536.0, "fp16: the first loss scale", check=(lambda v: v > 0, "must be > 0"))
    min_loss_scale: float = option(1.0, "fp16: the smallest loss scale", check=(lambda v: v > 0, "must be > 0"))
    loss_scale_window: int = option(1000, "fp16: clean steps before the scale grows", check=_POSITIVE)
    hysteresis: int = option(2, "fp16: overflowing steps tolerated before the scale backs off", check=_POSITIVE)
    device: str = option("auto", "device (auto: CUDA when available)", choices=DEVICES)
    kernel_backend: str = option("auto", "megagopher.kernels backend", choices=("auto", "triton", "torch"))
    compile: bool = option(False, "wrap each transformer layer in torch.compile (needs recompute 'none', a "
                                  "schedule other than zb-h1, and the torch kernels on CUDA)")
    nan_policy: str = option("stop", "a non-finite loss: stop the run or skip the step", choices=("stop", "skip"))
    exit_after_iters: int = option(0, "stop (with a checkpoint) after N steps of this invocation (0 = never)",
                                   check=_NON_NEGATIVE)
    z_loss: float = option(0.0, "PaLM's auxiliary loss z_loss * logsumexp(logits)^2 per token, added to the "
                                "objective (the logged loss stays the cross entropy)",
                           check=(lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0"))


@dataclass
class OptimizerConfig:
    lr: float = option(3e-4, "peak learning rate", check=(lambda v: math.isfinite(v) and v >= 0,
                                                          "must be a finite number >= 0"))
    min_lr: float = option(0.0, "learning rate at the end of the decay", check=_NON_NEGATIVE)
    warmup_iters: int = option(0, "linear warm-up steps", check=_NON_NEGATIVE)
    warmup_init_lr: float = option(0.0, "learning rate at the start of the warm-up", check=_NON_NEGATIVE)
    decay: str = option("cosine", "decay after the warm-up", choices=DECAYS)
    wsd_decay_fraction: float = option(0.1, "wsd: fraction of the steps spent decaying",
                                       check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    weight_decay: float = option(0.1, "decoupled weight decay (matrices only)", check=_NON_NEGATIVE)
    beta1: float = option(0.9, "Adam beta1", check=_UNIT)
    beta2: float = option(0.95, "Adam beta2", check=_UNIT)
    eps: float = option(1e-8, "Adam epsilon", check=(lambda v: v > 0, "must be > 0"))
    clip_grad: float = option(1.0, "global gradient-norm clipping (0 disables it)", check=_NON_NEGATIVE)
    distributed: bool = option(False, "ZeRO-1: shard the optimizer state over data-parallel ranks")


@dataclass
class DataConfig:
    source: str = option("synthetic", "training data: a seeded bigram stream or indexed files",
                         choices=("synthetic", "indexed"))
    blend: list = option([], "indexed: [[weight, path_prefix], ...]", check=_BLEND)
    valid_blend: list = option([], "indexed: validation blend (default: the split of blend)", check=_BLEND)
    tokenizer_dir: str = option("", "the run's tokenizer: a directory with vocab.json + merges.txt (GPT-2 BPE), "
                                "tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece or tiktoken); "
                                "sets the vocabulary")
    tokenizer_kind: str = option("", "the format of data.tokenizer_dir (\"\": detected from its files)",
                                 choices=("",) + TOKENIZER_KINDS)
    split: str = option("969,30,1", "train,valid,test weights of each blended dataset")
    cache_dir: str = option("", "where dataset indices are cached (default: beside the data)")
    # Document masking of packed samples, Megatron-LM's flags (megagopher/data/document_mask.py).
    reset_position_ids: bool = option(False, "positions restart at 0 after each end-of-document token")
    reset_attention_mask: bool = option(False, "no token attends across an end-of-document token")
    eod_mask_loss: bool = option(False, "no loss where the input token is the end-of-document token")
    eod_id: int = option(-1, "the end-of-document token id for document masking (-1: the tokenizer's)",
                         check=(lambda v: v >= -1, "must be >= -1"))


@dataclass
class CheckpointConfig:
    dir: str = option("", "checkpoint root (empty: never save)")
    save_interval: int = option(0, "save every N iterations (0: only at stage ends and on signals)",
                                check=_NON_NEGATIVE)
    keep_last: int = option(0, "keep only the newest N checkpoints (0 = all)", check=_NON_NEGATIVE)
    load: str = option("", "resume from: \"\" (fresh), \"auto\" (newest in dir), or a checkpoint path")
    initial_load: str = option("", "the weights a run starts from when load finds no checkpoint (a checkpoint "
                                   "root or iter_N directory): its weights only, at iteration 0 with a fresh "
                                   "optimizer; \"\": initialise from training.seed")
    keep_optimizer: bool = option(True, "a new stage keeps the optimizer state (a stage may override it)")
    async_save: bool = option(False, "write checkpoints on a background thread; the step pays only for a "
                                     "snapshot to host memory (one copy of the rank's share)")
    on_save_error: str = option("stop", "a save that fails (disk full, read-only): \"stop\" the run (exit "
                                        "status 4) or \"continue\" training; the previous checkpoint stays intact",
                                choices=("stop", "continue"))


@dataclass
class RunConfig:
    dir: str = option("runs/default", "metrics.jsonl, tensorboard events and the resolved config.toml")
    tensorboard: bool = option(True, "write tensorboard events")
    stop_after_stage: str = option("", "end the run after this stage, its checkpoint saved: a later stage that "
                                       "needs another layout (a long-context stage at a larger parallel.cp) "
                                       "then runs as its own command resuming from it")
    # Weights & Biases, an optional sink beside metrics.jsonl (training/wandb_sink.py; pip install megagopher[wandb]).
    wandb_project: str = option("", "wandb project the metrics rows and the resolved config go to (empty: no wandb)")
    wandb_entity: str = option("", "wandb entity (user or team) of the project (empty: the logged-in user's default)")
    wandb_run_name: str = option("", "wandb run name (empty: the name of run.dir)")
    wandb_mode: str = option("auto", "auto: $WANDB_MODE if set, else online when logged in (WANDB_API_KEY or a "
                                     "~/.netrc entry for the wandb host), else offline (wandb sync uploads it later)",
                             choices=("auto", "online", "offline"))


SECTIONS = {"model": GPTConfig, "parallel": ParallelConfig, "training": TrainingConfig,
            "optimizer": OptimizerConfig, "data": DataConfig, "checkpoint": CheckpointConfig, "run": RunConfig}
STAGE_SECTIONS = ("training", "optimizer", "data")  # and model.seq_length, model.rope_theta


@dataclass
class StageConfig:
    """One ``[[stages]]`` entry: ``overrides`` maps (section, key) to the stage's value."""
    name: str = option("main", "stage name (used by --stages.NAME.key overrides and the metrics)")
    train_iters: int = option(0, "steps of this stage", check=_NON_NEGATIVE)
    keep_optimizer: object = option(None, "keep the previous stage's optimizer state (default: "
                                          "checkpoint.keep_optimizer)")
    grow: dict = option({}, "growth before the stage: {num_layers = N} (progressive stacking) and/or "
                            "{num_experts = E} (sparse upcycling of the dense MLPs into E experts, docs/moe.md)")
    overrides: dict = field(default_factory=dict, metadata={"internal": True})


@dataclass
class JobConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stages: list = field(default_factory=list)

    def stage(self, index):
        """The config as it applies during stage ``index``: the base sections updated by that stage's
        overrides (stages do not inherit one another's), training.train_iters = the stage's steps."""
        st = self.stages[index]
        changes = {s: {} for s in STAGE_SECTIONS + ("model",)}
        for (section, key), value in st.overrides.items():
            changes[section][key] = value
        changes["training"]["train_iters"] = st.train_iters
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **kv)
                                            for s, kv in changes.items() if kv})

    def pp_layers_at(self, num_layers):
        """parallel.pp_layers places the configured depth only; a grown model is split evenly."""
        return list(self.parallel.pp_layers) if num_layers == self.model.num_layers else []

    def model_at(self, num_layers=None, vocab_size=None, num_experts=None):
        """The GPTConfig of the run at another depth or expert count (growth) or vocabulary (the tokenizer's)."""
        changes = {k: v for k, v in (("num_layers", num_layers), ("vocab_size", vocab_size),
                                     ("num_experts", num_experts)) if v is not None}
        return dataclasses.replace(self.model, **changes)


def coerce(section_name, value):
    """A section object from an object of the section's class, a {key: value} dict, or None (defaults)."""
    cls = SECTIONS[section_name]
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"[{section_name}] must be a {cls.__name__} or a table, got {type(value).__name__}")
    return section_from_dict(section_name, cls, value)


def check_value(section_name, key, value):
    """The verdict of the declaration of ``section.key`` on ``value`` (the type-coerced value, or ConfigError)."""
    return check_field(f"{section_name}.{key}", check_key(section_name, SECTIONS[section_name], key), value)
