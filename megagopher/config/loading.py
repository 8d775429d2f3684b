"""Reading a run configuration: TOML file, command-line overrides, stages; and writing it back
(docs/ARCHITECTURE.md 4.1, 4.2).

Overrides are ``--section.key=value`` or ``--section.key value``; a value that parses as a TOML literal
takes its type, anything else is a string. ``--stages.NAME.key=value`` overrides one stage. An unknown key
is an error listing the section's keys. Stages (``[[stages]]``) have ``name`` and ``train_iters`` and may
override keys of [training], [optimizer], [data], model.seq_length and model.rope_theta (dotted keys or
sub-tables; the model keys extend the context in a final stage); a config
without stages is one stage named "main" running ``training.train_iters`` steps.

Loading checks each key and value against its declaration (schema.py); the rules that relate keys to one
another and to the world size are ``validate(cfg, world_size)``'s (validate.py).
"""
import copy
import json
import math
import os
import tomllib

from megagopher.config.fields import ConfigError, check_field, check_key, field_map, section_from_dict
from megagopher.config.schema import SECTIONS, STAGE_SECTIONS, JobConfig, StageConfig

STAGE_KEYS = ("name", "train_iters", "keep_optimizer", "grow")
STAGE_MODEL_KEYS = ("seq_length", "rope_theta")  # what a stage may change of the model: its context


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


def _section_value(section, key, value):
    return check_field(f"{section}.{key}", check_key(section, SECTIONS[section], key), value)


def _stage_entry(index, key, value, stage):
    """One key of a stage table into ``stage`` (a StageConfig being built)."""
    where = f"stages[{index}]"
    if key in ("train_iters", "keep_optimizer"):
        if key == "keep_optimizer" and not isinstance(value, bool):
            raise ConfigError(f"{where}.keep_optimizer = {value!r} must be true or false")
        setattr(stage, key, check_field(f"{where}.{key}", field_map(StageConfig)[key], value))
    elif key == "grow":
        if not isinstance(value, dict) or set(value) - {"num_layers", "num_experts"}:
            raise ConfigError(f"{where}.grow = {value!r}; valid keys: num_layers, num_experts")
        stage.grow = {k: _section_value("model", k, value[k]) for k in ("num_layers", "num_experts") if k in value}
    elif key == "model":
        if not isinstance(value, dict) or set(value) - set(STAGE_MODEL_KEYS):
            extra = ", ".join("model." + k for k in (value if isinstance(value, dict) else {})
                              if k not in STAGE_MODEL_KEYS)
            raise ConfigError(f"stages[{index}] may override only model.seq_length and model.rope_theta (a "
                              f"long-context stage), not {extra}")
        for k, v in value.items():
            stage.overrides[("model", k)] = _section_value("model", k, v)
    elif key in STAGE_SECTIONS and isinstance(value, dict):
        for k, v in value.items():
            stage.overrides[(key, k)] = _section_value(key, k, v)
    else:
        raise ConfigError(f"unknown key stages[{index}].{key}; valid: {', '.join(STAGE_KEYS)}, "
                          f"and tables {', '.join(STAGE_SECTIONS)}, model.seq_length, model.rope_theta")


def _stage_from_table(table, index):
    if not isinstance(table, dict):
        raise ConfigError(f"stages[{index}] must be a table ([[stages]])")
    name = table.get("name", f"stage{index}")
    if not isinstance(name, str):
        raise ConfigError(f"stages[{index}].name = {name!r} must be a string")
    if "train_iters" not in table:
        raise ConfigError(f"stages[{index}] ({name}) has no train_iters")
    stage = StageConfig(name=name)
    for key, value in table.items():
        if key != "name":
            _stage_entry(index, key, value, stage)
    return stage


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


def _read_toml(path):
    """The tables of the TOML file at ``path``; ConfigError naming it when it is missing, not a file,
    unreadable, not UTF-8 or not TOML."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory, not a file")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _merge_overrides(tables, stages, overrides):
    for dotted, value in (overrides or {}).items():
        if "." not in dotted:
            raise ConfigError(f"override --{dotted}: keys look like section.key")
        section, key = dotted.split(".", 1)
        if section == "stages":
            _override_stage(stages, key, value)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(SECTIONS)}, stages")
        check_key(section, SECTIONS[section], key)
        tables[section][key] = value


def _split(raw):
    """({section: table} for every section, [stage tables]) of TOML-shaped tables, checking their shape."""
    raw = dict(raw)
    stage_tables = raw.pop("stages", [])
    for section, table in raw.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(SECTIONS)}, stages")
    if not isinstance(stage_tables, list):
        raise ConfigError("stages must be an array of tables ([[stages]])")
    return {name: dict(raw.get(name, {})) for name in SECTIONS}, list(stage_tables)


def from_tables(raw):
    """A JobConfig from TOML-shaped tables ({section: {key: value}, "stages": [tables]})."""
    raw, stage_tables = _split(raw)
    stages = [_stage_from_table(t, i) for i, t in enumerate(stage_tables)]
    model = raw["model"]
    if not model.get("max_position_embeddings"):
        # 0 means: long enough for the longest stage.
        seq = _section_value("model", "seq_length", model.get("seq_length", SECTIONS["model"]().seq_length))
        model["max_position_embeddings"] = max([seq] + [st.overrides.get(("model", "seq_length"), 0)
                                                        for st in stages])
    sections = {name: section_from_dict(name, cls, raw[name]) for name, cls in SECTIONS.items()}
    if not stages:
        stages = [StageConfig(name="main", train_iters=sections["training"].train_iters)]
    return JobConfig(**sections, stages=stages)


def _rejects(raw, message):
    """Whether the file's own tables, without the overrides, fail with ``message``: then the file is at
    fault and the error should name it."""
    try:
        from_tables(copy.deepcopy(raw))
    except ConfigError as e:
        return str(e) == message
    return False


def load_config(path=None, overrides=None):
    """Reads ``path`` (TOML), applies ``overrides`` ({'section.key': value}), returns the JobConfig. Each key
    and value is checked against its declaration; ``validate(cfg, world_size)`` checks the rest. A
    ConfigError caused by the file itself (not by an override) starts with the file's path."""
    raw = _read_toml(path) if path else {}
    try:
        tables, stages = _split(copy.deepcopy(raw))   # stage overrides edit the tables in place
        _merge_overrides(tables, stages, overrides)
        return from_tables({**tables, "stages": stages})
    except ConfigError as e:
        # Re-read without the overrides, only on failure, to tell whose fault it is.
        if path and _rejects(raw, str(e)):
            raise ConfigError(f"{path}: {e}") from None
        raise


# -- writing it back --------------------------------------------------------------------------------------

def to_tables(cfg):
    """The config as TOML-shaped tables; ``from_tables`` reads them back to an equal JobConfig."""
    out = {name: {k: getattr(getattr(cfg, name), k) for k in field_map(cls)} for name, cls in SECTIONS.items()}
    out["stages"] = []
    for st in cfg.stages:
        table = {"name": st.name, "train_iters": st.train_iters}
        if st.keep_optimizer is not None:
            table["keep_optimizer"] = st.keep_optimizer
        if st.grow:
            table["grow"] = dict(st.grow)
        for (section, key), value in st.overrides.items():
            table.setdefault(section, {})[key] = value
        out["stages"].append(table)
    return out


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg):
    """The resolved config as TOML text that load_config reads back to the same config."""
    tables, lines = to_tables(cfg), []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in tables[section].items()]
        lines.append("")
    for st in tables["stages"]:
        lines.append("[[stages]]")
        for key, value in st.items():
            if isinstance(value, dict) and key != "grow":
                lines += [f"{key}.{k} = {toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)

