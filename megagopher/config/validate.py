"""Every rule a run configuration must obey, in one place (invariant 6).

``validate(cfg, world_size)`` needs only the config and the world size, so every rank reaches the same
verdict before any process group exists: a bad config fails everywhere at once with the same message
(naming the key, the value and what would be valid) instead of leaving ranks waiting in a collective.

The rule functions below are also what the lower layers call when they are used as a library without a
config (``initialize_model_parallel`` -> ``validate_layout``, the pipeline plan -> ``validate_schedule``,
the stage split -> ``layer_counts``, the batch ramp-up, the LR schedule, the loss scaler), so each rule
has one implementation and one message.
"""
from megagopher.common import SCHEDULES, device_type
from megagopher.config.fields import ConfigError, check_section, is_int
from megagopher.config.schema import SECTIONS, check_value


class ParallelConfigError(ConfigError):
    """A layout that cannot work."""


class ScheduleError(ConfigError):
    """A schedule / pp / vpp / micro-batch combination that cannot run."""


def _divisible(key, value, divisor, divisor_desc):
    if divisor <= 0 or value % divisor:
        raise ParallelConfigError(f"{key} = {value} is not divisible by {divisor_desc} = {divisor}")


def validate_layout(world_size, tp=1, pp=1, cp=1, vpp=1, dp=None, num_attention_heads=None,
                    num_query_groups=None, ep=1):
    """The process layout against the world size and the attention heads; returns dp."""
    for key, value in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp), ("parallel.vpp", vpp),
                       ("parallel.ep", ep)):
        if not is_int(value) or value < 1:
            raise ParallelConfigError(f"{key} = {value!r} must be a positive integer")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.cp * parallel.pp = "
            f"{tp} * {cp} * {pp} = {model_parallel}")
    derived = world_size // model_parallel
    if dp and dp != derived:
        raise ParallelConfigError(
            f"parallel.dp = {dp} but world size {world_size} / (tp {tp} * cp {cp} * pp {pp}) = {derived}")
    if num_attention_heads is not None:
        _divisible("model.num_attention_heads", num_attention_heads, tp, "parallel.tp")
        _divisible("model.num_query_groups", num_query_groups or num_attention_heads, tp, "parallel.tp")
    if vpp > 1 and pp == 1:
        raise ParallelConfigError(f"parallel.vpp = {vpp} needs parallel.pp > 1 (virtual stages interleave a pipeline)")
    if derived % ep:
        raise ParallelConfigError(f"parallel.ep = {ep} must divide the data-parallel size {derived} (world size "
                                  f"{world_size} / (tp {tp} * cp {cp} * pp {pp})): the expert-parallel group lives "
                                  "inside the data-parallel group")
    return derived


def layer_counts(num_layers, pp, vpp=1, pp_layers=None):
    """Layers of each of the pp * vpp virtual stages, in pipeline order: an even split, or as
    ``pp_layers`` says (one count per pipeline rank, shared evenly by its vpp chunks, or one per virtual
    stage). A virtual stage that holds neither the embedding nor the output head needs a layer."""
    stages = pp * vpp
    if not pp_layers:
        if num_layers % stages:
            raise ParallelConfigError(
                f"model.num_layers = {num_layers} is not divisible by parallel.pp * parallel.vpp = {pp} * {vpp} = "
                f"{stages}; set parallel.pp_layers for an uneven split")
        return [num_layers // stages] * stages
    counts = list(pp_layers)
    if any(not is_int(c) or c < 0 for c in counts):
        raise ParallelConfigError(f"parallel.pp_layers = {counts} must be non-negative integers")
    if vpp > 1 and len(counts) == pp:
        if any(c % vpp for c in counts):
            raise ParallelConfigError(
                f"parallel.pp_layers = {counts} gives layers per pipeline rank; each must be divisible by "
                f"parallel.vpp = {vpp} (or give pp * vpp = {stages} counts, one per virtual stage)")
        counts = [counts[v % pp] // vpp for v in range(stages)]
    if len(counts) != stages:
        raise ParallelConfigError(
            f"parallel.pp_layers = {counts} has {len(counts)} entries; it needs one per pipeline stage "
            f"(parallel.pp = {pp}) or one per virtual stage (parallel.pp * parallel.vpp = {stages})")
    if sum(counts) != num_layers:
        raise ParallelConfigError(f"parallel.pp_layers = {counts} sums to {sum(counts)}, but model.num_layers = "
                                  f"{num_layers}")
    empty = [v for v in range(1, stages - 1) if counts[v] == 0]
    if empty:
        raise ParallelConfigError(f"parallel.pp_layers = {counts} leaves virtual stage {empty[0]} without layers; "
                                  "only the first (embedding) and the last (output head) may have none")
    return counts


def validate_schedule(schedule, pp, vpp=1, num_microbatches=1):
    """Whether ``schedule`` can run pp stages x vpp chunks over ``num_microbatches``; raises ScheduleError."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"parallel.schedule = {schedule!r}; valid: {', '.join(map(repr, SCHEDULES))}")
    for key, value in (("parallel.pp", pp), ("parallel.vpp", vpp), ("number of micro-batches", num_microbatches)):
        if not is_int(value) or value < 1:
            raise ScheduleError(f"{key} = {value!r} must be a positive integer")
    if vpp > 1 and pp == 1:
        raise ScheduleError(f"parallel.vpp = {vpp} needs parallel.pp > 1 (virtual stages interleave a pipeline)")
    if vpp > 1 and schedule in ("1f1b", "zb-h1"):
        raise ScheduleError(f"parallel.schedule = {schedule!r} runs one model chunk per rank, but parallel.vpp = "
                            f"{vpp}; use parallel.schedule = 'interleaved' (or 'gpipe') for virtual stages, "
                            "or parallel.vpp = 1")
    if schedule == "interleaved" and vpp > 1 and num_microbatches < pp:
        raise ScheduleError(
            f"parallel.schedule = 'interleaved' with parallel.pp = {pp}, parallel.vpp = {vpp} needs at least "
            f"parallel.pp = {pp} micro-batches per step, got {num_microbatches} (training.global_batch_size / "
            f"(training.micro_batch_size * dp)): rank 0 could not keep a full group of micro-batches in flight "
            "before its next chunk; raise the global batch size or use parallel.schedule = '1f1b'")


def rampup_steps(rampup, global_batch_size):
    """(start, increment, samples, number of increments) of Megatron's --rampup-batch-size."""
    if len(rampup) != 3 or not all(is_int(v) and v > 0 for v in rampup):
        raise ConfigError(f"training.rampup_batch_size = {rampup!r} must be [start, increment, samples], positive "
                          "integers")
    start, increment, samples = rampup
    if start > global_batch_size:
        raise ConfigError(f"training.rampup_batch_size start = {start} exceeds training.global_batch_size = "
                          f"{global_batch_size}")
    if (global_batch_size - start) % increment:
        raise ConfigError(f"training.global_batch_size - rampup start = {global_batch_size} - {start} is not "
                          f"divisible by the rampup increment {increment}")
    return start, increment, samples, (global_batch_size - start) // increment


def batch_sizes(global_batch_size, rampup):
    """Every global batch size a stage passes through (the ramp's, then the final one)."""
    if not rampup:
        return [global_batch_size]
    start, increment, _, n = rampup_steps(rampup, global_batch_size)
    return [start + k * increment for k in range(n + 1)]


def validate_rampup(global_batch_size, rampup, micro_batch_size, dp):
    """Every batch size of the ramp must split into whole micro-batches on every data-parallel rank."""
    for size in batch_sizes(global_batch_size, rampup) if rampup else []:
        if size % (micro_batch_size * dp):
            raise ConfigError(f"training.rampup_batch_size = {list(rampup)} passes through global batch size "
                              f"{size}, which is not divisible by training.micro_batch_size * dp = "
                              f"{micro_batch_size} * {dp}")


def validate_lr_schedule(lr, min_lr, warmup_iters, total_iters):
    if min_lr > lr:
        raise ConfigError(f"optimizer.min_lr = {min_lr} is larger than optimizer.lr = {lr}")
    if warmup_iters < 0 or total_iters < 1:
        raise ConfigError(f"optimizer.warmup_iters = {warmup_iters} and train_iters = {total_iters} must be "
                          ">= 0 and >= 1")


def validate_loss_scaler(initial_scale, min_scale, growth_interval, hysteresis):
    for key, value in (("initial_loss_scale", initial_scale), ("min_loss_scale", min_scale),
                       ("loss_scale_window", growth_interval), ("hysteresis", hysteresis)):
        check_value("training", key, value)
    if min_scale > initial_scale:
        raise ConfigError(f"training.min_loss_scale = {min_scale!r} exceeds training.initial_loss_scale = "
                          f"{initial_scale!r}")


# -- the run -----------------------------------------------------------------------------------------------

def validate(cfg, world_size):
    """Checks the whole run config for ``world_size`` processes; returns dp. Raises ConfigError."""
    for name in SECTIONS:
        check_section(name, getattr(cfg, name))
    _check_run_wide(cfg)
    names = [st.name for st in cfg.stages]
    dp = None
    for index, stage in enumerate(cfg.stages):
        if names.count(stage.name) > 1:
            raise ConfigError(f"stages[{index}].name = {stage.name!r} is used by more than one stage")
        if ("training", "train_iters") in stage.overrides:  # stage() would replace it by the stage's own
            raise ConfigError(f"stages[{index}].training.train_iters: a stage's number of steps is "
                              f"stages[{index}].train_iters (--stages.{stage.name}.train_iters=N)")
        where = f" (stage {stage.name!r})" if len(cfg.stages) > 1 else ""
        try:
            dp = _check_stage(cfg, index, world_size)
        except ConfigError as e:
            raise type(e)(f"{e}{where}") from None
    return dp


def _check_compile(cfg):
    """training.compile: the combinations torch.compile of a transformer layer is known to compose with."""
    t, p = cfg.training, cfg.parallel
    if not t.compile:
        return
    if t.recompute != "none" or any(st.overrides.get(("training", "recompute"), "none") != "none" for st in cfg.stages):
        raise ConfigError(f"training.compile = true needs training.recompute = 'none' (got {t.recompute!r}): "
                          "activation recomputation replays RNG states around the layer, outside what is compiled")
    if p.schedule == "zb-h1":
        raise ConfigError("training.compile = true does not compose with parallel.schedule = 'zb-h1' (its deferred "
                          "weight gradients live outside the compiled graph); valid: 'gpipe', '1f1b', 'interleaved'")
    cuda = t.device == "cuda" or device_type(t.device, "training.device") == "cuda"
    if cuda and t.kernel_backend != "torch":
        raise ConfigError(f"training.compile = true on CUDA needs training.kernel_backend = 'torch' (got "
                          f"{t.kernel_backend!r}): inductor fuses the layer itself")


def _check_growth(cfg):
    """grow.num_layers / grow.num_experts, stage by stage: upcycling turns a dense model's MLPs into experts
    (docs/moe.md), and depth growth copies layer i mod L into layer i, so an MoE model must keep every
    copied layer's kind (dense or MoE) under model.moe_layer_freq."""
    m = cfg.model
    layers, experts = m.num_layers, m.num_experts
    for index, stage in enumerate(cfg.stages):
        where = f"stages[{index}].grow"
        new_experts = stage.grow.get("num_experts", experts)
        if "num_experts" in stage.grow:
            if experts:
                raise ConfigError(f"{where}.num_experts = {new_experts}: the model already has {experts} experts; "
                                  "sparse upcycling starts from a dense model (model.num_experts = 0)")
            if new_experts < m.moe_top_k:
                raise ConfigError(f"{where}.num_experts = {new_experts} is below model.moe_top_k = {m.moe_top_k}")
            if m.moe_ffn_hidden_size != m.ffn_hidden_size:
                raise ConfigError(f"{where}.num_experts: the experts are copies of the dense MLP, so "
                                  f"model.moe_ffn_hidden_size = {m.moe_ffn_hidden_size} must be "
                                  f"model.ffn_hidden_size = {m.ffn_hidden_size} (or 0)")
        new_layers = stage.grow.get("num_layers", layers)
        if m.mtp_num_layers and new_layers != layers:  # their layers are numbered after the model's (model/mtp.py)
            raise ConfigError(f"{where}.num_layers = {new_layers}: progressive stacking of a model with multi-token "
                              f"prediction modules (model.mtp_num_layers = {m.mtp_num_layers}) is not supported")
        if experts and new_layers != layers and layers % m.moe_layer_freq:
            raise ConfigError(f"{where}.num_layers = {new_layers}: layer i copies layer i mod {layers}, which "
                              f"under model.moe_layer_freq = {m.moe_layer_freq} may be of the other kind (dense or "
                              f"MoE); grow from a multiple of {m.moe_layer_freq} layers")
        layers, experts = new_layers, new_experts


def _experts_at(cfg, index):
    """model.num_experts in stage ``index``: the last grow.num_experts up to it (upcycling), else the model's."""
    experts = cfg.model.num_experts
    for stage in cfg.stages[:index + 1]:
        experts = stage.grow.get("num_experts", experts)
    return experts


def _check_expert_parallel(ep, experts, final_experts):
    """ep is run-wide: a dense stage before an upcycling one runs under it too (it has no experts to split)."""
    if ep > 1 and not final_experts:
        raise ParallelConfigError(f"parallel.ep = {ep} needs a MoE model (model.num_experts > 0, or a stage's "
                                  "grow.num_experts)")
    if ep > 1 and experts % ep:
        raise ParallelConfigError(f"model.num_experts = {experts} is not divisible by parallel.ep = {ep}: every "
                                  "expert-parallel rank holds the same number of experts")


def _check_run_wide(cfg):
    p, d = cfg.parallel, cfg.data
    _check_compile(cfg)
    _check_growth(cfg)
    stop = cfg.run.stop_after_stage
    if stop and stop not in [st.name for st in cfg.stages]:
        raise ConfigError(f"run.stop_after_stage = {stop!r} names no stage; valid: "
                          + ", ".join(repr(st.name) for st in cfg.stages))
    if stop and not cfg.checkpoint.dir:
        raise ConfigError(f"run.stop_after_stage = {stop!r} needs checkpoint.dir: the next command resumes from "
                          "the stage's checkpoint")
    if p.cp > 1 and cfg.training.compile:
        raise ConfigError(f"parallel.cp = {p.cp} does not compose with training.compile = true: ring attention's "
                          "transfers around the CP ring run outside a compiled graph")
    if cfg.training.device == "cuda":
        try:
            device_type("cuda", "training.device")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if d.source == "indexed":
        if not any([d.blend] + [st.overrides.get(("data", "blend")) for st in cfg.stages]):
            raise ConfigError("data.source = 'indexed' needs data.blend = [[weight, path_prefix], ...]")


def _check_document_masking(d, m):
    """Megatron's three flags need the end-of-document id: the tokenizer's or data.eod_id. (Also: a
    tokenizer kind names the format of a tokenizer directory, so it needs one.)"""
    if d.tokenizer_kind and not d.tokenizer_dir:
        raise ConfigError(f"data.tokenizer_kind = {d.tokenizer_kind!r} needs data.tokenizer_dir (the directory "
                          "holding that tokenizer)")
    flags = [k for k in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss") if getattr(d, k)]
    if not flags:
        return
    if d.eod_id == -1 and not (d.source == "indexed" and d.tokenizer_dir):
        raise ConfigError(f"data.{flags[0]} = true needs the end-of-document token id: set data.eod_id, or "
                          "data.tokenizer_dir with indexed data")
    if d.eod_id >= m.vocab_size and not d.tokenizer_dir:
        raise ConfigError(f"data.eod_id = {d.eod_id} is not a token id of model.vocab_size = {m.vocab_size}")
    if m.core_attention != "flash" and d.reset_attention_mask:
        raise ConfigError(f"data.reset_attention_mask = true needs model.core_attention = 'flash' (got "
                          f"{m.core_attention!r}): documents are kept apart by the flash kernel's packed path")


def _check_stage(cfg, index, world_size):
    """The rules that involve a stage's batch, sequence and depth; returns dp."""
    stage = cfg.stages[index]
    for (section, key), value in stage.overrides.items():
        check_value(section, key, value)
    sc = cfg.stage(index)
    p, t, m = sc.parallel, sc.training, sc.model
    dp = validate_layout(world_size, p.tp, p.pp, p.cp, p.vpp, p.dp, m.num_attention_heads, m.num_query_groups,
                         p.ep)
    _check_expert_parallel(p.ep, _experts_at(cfg, index), _experts_at(cfg, len(cfg.stages) - 1))
    for depth in [cfg.model.num_layers] + ([stage.grow["num_layers"]] if "num_layers" in stage.grow else []):
        layer_counts(depth, p.pp, p.vpp, cfg.pp_layers_at(depth))
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ParallelConfigError(f"training.global_batch_size = {t.global_batch_size} is not divisible by "
                                  f"training.micro_batch_size * dp = {t.micro_batch_size * dp}")
    if p.sp or p.cp > 1:
        # Context parallelism cuts the sequence into 2 * cp chunks (causal load balancing), sequence
        # parallelism each CP rank's share over tp.
        split = (p.tp if p.sp else 1) * (2 * p.cp if p.cp > 1 else 1)
        if m.seq_length % split:
            parts = " * ".join((["parallel.tp"] if p.sp else []) + (["2 * parallel.cp"] if p.cp > 1 else []))
            raise ParallelConfigError(f"model.seq_length = {m.seq_length} is not divisible by {parts} = {split} "
                                      "(sequence/context parallelism split the sequence)")
    if p.cp > 1 and m.core_attention != "flash":
        raise ConfigError(f"parallel.cp = {p.cp} needs model.core_attention = 'flash' (got {m.core_attention!r}): "
                          "ring attention merges flash attention's blocks by their log-sum-exp")
    if m.position_embedding == "learned" and m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"model.seq_length = {m.seq_length} exceeds model.max_position_embeddings = "
                          f"{m.max_position_embeddings}")
    validate_rampup(t.global_batch_size, t.rampup_batch_size, t.micro_batch_size, dp)
    for size in batch_sizes(t.global_batch_size, t.rampup_batch_size):
        try:
            validate_schedule(p.schedule, p.pp, p.vpp, size // (t.micro_batch_size * dp))
        except ScheduleError as e:
            raise ScheduleError(f"{e} (global batch size {size}, training.micro_batch_size = "
                                f"{t.micro_batch_size}, dp = {dp})") from None
    _check_document_masking(sc.data, m)
    o = sc.optimizer
    validate_lr_schedule(o.lr, o.min_lr, o.warmup_iters, max(1, t.train_iters))
    if t.precision == "fp16":
        validate_loss_scaler(t.initial_loss_scale, t.min_loss_scale, t.loss_scale_window, t.hysteresis)
    return dp
