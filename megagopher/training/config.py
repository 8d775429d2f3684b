"""The run configuration: TOML file, command-line overrides, validation and stages (ARCHITECTURE 4.1, 4.2).

A config is a dict of sections. Every section has fixed keys with defaults (DEFAULTS below); an unknown key
is an error that lists the section's valid keys. Overrides are ``--section.key=value`` or
``--section.key value``; a value that parses as a TOML literal takes its type, anything else is a string.

Stages (``[[stages]]``): each has ``name`` and ``train_iters`` and may override keys of [training],
[optimizer], [data] and model.seq_length, written as dotted keys (``optimizer.lr = 1e-4``) or sub-tables.
A config without stages is one stage named "main" running ``training.train_iters`` steps.
"""
import copy
import json
import math
import os
import tomllib
from dataclasses import fields

from megagopher.model.config import GPTConfig

DEFAULTS = {
    "model": {f.name: f.default for f in fields(GPTConfig)},
    "parallel": {
        "tp": 1, "pp": 1, "dp": 0, "cp": 1, "vpp": 1, "sp": False,
        "schedule": "1f1b",                 # "gpipe" | "1f1b" | "interleaved" | "zb-h1"
        "pp_layers": [],                    # explicit layers per pipeline stage (default: even split)
        "trace": False,                     # write a Chrome trace of the pipeline schedule to run.dir
        "bucket_size_mb": 25.0,             # data-parallel gradient bucket size
        "overlap_grad_reduce": True,
        "backend": "auto",                  # "auto" (nccl on CUDA, else gloo) | "gloo" | "nccl"
        "timeout_s": 600,                   # process-group timeout: a dead rank ends the job
    },
    "training": {
        "micro_batch_size": 1, "global_batch_size": 8, "train_iters": 10, "seed": 1234,
        "precision": "fp32", "recompute": "none", "recompute_num_layers": 0,
        "log_interval": 1, "eval_interval": 0, "eval_iters": 2,
        "rampup_batch_size": [],            # Megatron's --rampup-batch-size: [start, increment, samples]
        "log_params_norm": False,           # add the global parameter norm to every metrics row
        "initial_loss_scale": 65536.0, "min_loss_scale": 1.0, "loss_scale_window": 1000, "hysteresis": 2,
        "device": "auto",                   # "auto" | "cpu" | "cuda"
        "kernel_backend": "auto",           # megagopher.kernels backend: "auto" | "triton" | "torch"
        "nan_policy": "stop",               # a non-finite loss: "stop" the run or "skip" the step
        "exit_after_iters": 0,              # stop (with a checkpoint) after this many steps of this invocation
    },
    "optimizer": {
        "lr": 3e-4, "min_lr": 0.0, "warmup_iters": 0, "warmup_init_lr": 0.0, "decay": "cosine",
        "wsd_decay_fraction": 0.1, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
        "clip_grad": 1.0, "distributed": False,
    },
    "data": {
        "source": "synthetic",              # "synthetic" | "indexed"
        "blend": [], "valid_blend": [], "tokenizer_dir": "", "split": "969,30,1", "cache_dir": "",
    },
    "checkpoint": {"dir": "", "save_interval": 0, "keep_last": 0, "load": "", "keep_optimizer": True},
    "run": {"dir": "runs/default", "tensorboard": True},
}
STAGE_KEYS = ("name", "train_iters", "keep_optimizer", "grow")
STAGE_SECTIONS = ("training", "optimizer", "data")
CHOICES = {
    ("parallel", "schedule"): ("gpipe", "1f1b", "interleaved", "zb-h1"),
    ("parallel", "backend"): ("auto", "gloo", "nccl"),
    ("training", "precision"): ("fp32", "bf16", "fp16"),
    ("training", "recompute"): ("none", "selective", "full"),
    ("training", "device"): ("auto", "cpu", "cuda"),
    ("training", "kernel_backend"): ("auto", "triton", "torch"),
    ("training", "nan_policy"): ("stop", "skip"),
    ("data", "source"): ("synthetic", "indexed"),
}


class ConfigError(ValueError):
    """A bad configuration; the message names the key, the value and what would be valid."""


def parse_value(text):
    """A TOML literal if ``text`` is one (true, 3e-4, [[1.0, "a"]], "quoted"), else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args):
    """['--a.b=1', '--c.d', 'x'] -> {'a.b': 1, 'c.d': 'x'}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        out[key] = parse_value(value)
    return out


def _check_key(section, key):
    if section not in DEFAULTS:
        raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(DEFAULTS)}, stages")
    if key not in DEFAULTS[section]:
        raise ConfigError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(DEFAULTS[section])}")


def _typed(section, key, value):
    """Coerces ints given for float keys; rejects a value of the wrong type."""
    default = DEFAULTS[section][key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} = {value!r} must be true or false")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(default, int) and not isinstance(value, int):
        raise ConfigError(f"{section}.{key} = {value!r} must be an integer")
    elif isinstance(default, float) and not isinstance(value, float):
        raise ConfigError(f"{section}.{key} = {value!r} must be a number")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{section}.{key} = {value!r} must be a string")
    elif isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{section}.{key} = {value!r} must be a list")
    valid = CHOICES.get((section, key))
    if valid and value not in valid:
        raise ConfigError(f"{section}.{key} = {value!r}; valid: {', '.join(map(repr, valid))}")
    return value


def _flatten_stage(stage, index):
    """A stage table -> {'name':..., 'train_iters':..., 'overrides': {(section, key): value}}."""
    out = {"name": stage.get("name", f"stage{index}"), "overrides": {}}
    if "train_iters" not in stage:
        raise ConfigError(f"stages[{index}] ({out['name']}) has no train_iters")
    for key, value in stage.items():
        if key in ("name",):
            continue
        if key in ("train_iters", "keep_optimizer"):
            out[key] = value
        elif key == "grow":
            if not isinstance(value, dict) or set(value) - {"num_layers"}:
                raise ConfigError(f"stages[{index}].grow = {value!r}; valid keys: num_layers")
            out["grow"] = value
        elif key == "model":
            if set(value) - {"seq_length"}:
                raise ConfigError(f"stages[{index}] may override only model.seq_length, not "
                                  f"{', '.join('model.' + k for k in value if k != 'seq_length')}")
            out["overrides"][("model", "seq_length")] = _typed("model", "seq_length", value["seq_length"])
        elif key in STAGE_SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                _check_key(key, k)
                out["overrides"][(key, k)] = _typed(key, k, v)
        else:
            raise ConfigError(f"unknown key stages[{index}].{key}; valid: {', '.join(STAGE_KEYS)}, "
                              f"and tables {', '.join(STAGE_SECTIONS)}, model.seq_length")
    if not isinstance(out["train_iters"], int) or out["train_iters"] < 0:
        raise ConfigError(f"stages[{index}].train_iters = {out['train_iters']!r} must be an integer >= 0")
    return out


def _override_stage(stages, dotted, value):
    """--stages.NAME.key=value (or --stages.NAME.section.key=value) on the raw stage tables."""
    names = [st.get("name", f"stage{i}") for i, st in enumerate(stages)]
    name, _, key = dotted.partition(".")
    if name not in names or not key:
        raise ConfigError(f"override --stages.{dotted}: stage overrides look like --stages.NAME.key=value "
                          f"with NAME one of {names}")
    table = stages[names.index(name)]
    *path, last = key.split(".")
    for part in path:
        table = table.setdefault(part, {})
    table[last] = value


def load_config(path=None, overrides=None):
    """Reads ``path`` (TOML), applies ``overrides`` ({'section.key': value}), returns the resolved config."""
    raw = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = copy.deepcopy(DEFAULTS)
    stages = raw.pop("stages", [])
    for section, table in raw.items():
        if section not in DEFAULTS or not isinstance(table, dict):
            raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(DEFAULTS)}, stages")
        for key, value in table.items():
            _check_key(section, key)
            cfg[section][key] = _typed(section, key, value)
    if not isinstance(stages, list):
        raise ConfigError("stages must be an array of tables ([[stages]])")
    for dotted, value in (overrides or {}).items():
        if "." not in dotted:
            raise ConfigError(f"override --{dotted}: keys look like section.key")
        section, key = dotted.split(".", 1)
        if section == "stages":
            _override_stage(stages, key, value)
            continue
        _check_key(section, key)
        cfg[section][key] = _typed(section, key, value)
    cfg["stages"] = [_flatten_stage(s, i) for i, s in enumerate(stages)] or \
        [{"name": "main", "train_iters": cfg["training"]["train_iters"], "overrides": {}}]
    validate(cfg)
    return cfg


def stage_config(cfg, stage_index):
    """The sections as they apply during stage ``stage_index``: base values updated by that stage's
    overrides (stages do not inherit one another's overrides)."""
    out = {s: dict(cfg[s]) for s in DEFAULTS}
    for (section, key), value in cfg["stages"][stage_index]["overrides"].items():
        out[section][key] = value
    out["training"]["train_iters"] = cfg["stages"][stage_index]["train_iters"]
    return out


def model_config(cfg, num_layers=None, vocab_size=None):
    """The GPTConfig of a run: max_position_embeddings covers the longest stage's sequence."""
    m = dict(cfg["model"])
    longest = max([m["seq_length"]] + [st["overrides"].get(("model", "seq_length"), 0) for st in cfg["stages"]])
    m["max_position_embeddings"] = m["max_position_embeddings"] or longest
    if num_layers is not None:
        m["num_layers"] = num_layers
    if vocab_size is not None:
        m["vocab_size"] = vocab_size
    return GPTConfig(**m)


def validate(cfg):
    """Checks that need no process group (the layout is checked against the world size later)."""
    try:
        model_config(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    t = cfg["training"]
    for key in ("micro_batch_size", "global_batch_size", "log_interval"):
        if t[key] < 1:
            raise ConfigError(f"training.{key} = {t[key]} must be >= 1")
    ramp = t["rampup_batch_size"]
    if ramp and (len(ramp) != 3 or not all(isinstance(v, int) and v > 0 for v in ramp)):
        raise ConfigError(f"training.rampup_batch_size = {ramp!r} must be [start, increment, samples], "
                          "positive integers")
    if cfg["parallel"]["cp"] != 1:
        raise ConfigError(f"parallel.cp = {cfg['parallel']['cp']}: context parallelism is not implemented; "
                          "valid: 1")
    if cfg["data"]["source"] == "indexed":
        blends = [cfg["data"]["blend"]] + [st["overrides"].get(("data", "blend")) for st in cfg["stages"]]
        if not any(blends):
            raise ConfigError("data.source = 'indexed' needs data.blend = [[weight, path_prefix], ...]")
    if not math.isfinite(cfg["optimizer"]["lr"]) or cfg["optimizer"]["lr"] < 0:
        raise ConfigError(f"optimizer.lr = {cfg['optimizer']['lr']} must be a finite number >= 0")


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg):
    """The resolved config as TOML text that load_config reads back to the same config."""
    lines = []
    for section in DEFAULTS:
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in cfg[section].items()]
        lines.append("")
    for st in cfg["stages"]:
        lines.append("[[stages]]")
        lines += [f"{k} = {_toml_value(st[k])}" for k in STAGE_KEYS if k in st]
        lines += [f"{s}.{k} = {_toml_value(v)}" for (s, k), v in st["overrides"].items()]
        lines.append("")
    return "\n".join(lines)
