"""Config fields that carry their default, their allowed values and a one-line doc (torchtitan's
job_config style), and the one place that checks a value against its field.

    lr: float = option(3e-4, "peak learning rate", check=(lambda v: v >= 0, "must be >= 0"))

``check_field`` is the verdict on one value. The loader, ``validate(cfg, world_size)`` and the library
functions that accept a plain value for a key (``schema.check_value``: ``DistributedDataParallel(
bucket_size_mb=)``, ``DynamicLossScaler(hysteresis=)``) all reach it: one rule, one message.
"""
import dataclasses

from megagopher.errors import InputError


class ConfigError(InputError):
    """A bad configuration; the message names the key, the value and what would be valid."""


def option(default, doc, choices=None, check=None):
    """A dataclass field with metadata: ``choices`` (allowed values) and ``check`` = (predicate, what the
    value must be), applied after the type check."""
    meta = {"doc": doc, "choices": tuple(choices) if choices else None, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def coerce_type(where, default, value):
    """``value`` in the type of ``default`` (an int is accepted for a float), or ConfigError."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, float):
        ok, want = is_number(value), "a number"
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok, want = is_int(value), "an integer"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, list):
        ok, want = isinstance(value, list), "a list"
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "a table"
    else:
        ok, want = True, ""
    if not ok:
        raise ConfigError(f"{where} = {value!r} must be {want}")
    return value


def field_default(field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def check_field(where, field, value):
    """The type, choices and check of one field: returns the (type-coerced) value or raises ConfigError."""
    value = coerce_type(where, field_default(field), value)
    choices, check = field.metadata.get("choices"), field.metadata.get("check")
    if choices and value not in choices:
        raise ConfigError(f"{where} = {value!r}; valid: {', '.join(map(repr, choices))}")
    if check is not None:
        predicate, what = check
        if not predicate(value):
            raise ConfigError(f"{where} = {value!r} {what}")
    return value


def field_map(cls):
    """The config keys of a section class: every field but those marked internal (a stage's parsed overrides)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def check_key(section_name, cls, key):
    keys = field_map(cls)
    if key not in keys:
        raise ConfigError(f"unknown key {section_name}.{key}; valid keys of [{section_name}]: {', '.join(keys)}")
    return keys[key]


def check_section(section_name, obj):
    """Every field of a section object against its declaration (collects nothing: the first bad one raises)."""
    for name, field in field_map(type(obj)).items():
        setattr(obj, name, check_field(f"{section_name}.{name}", field, getattr(obj, name)))
    return obj


def section_from_dict(section_name, cls, table):
    """A section object from a {key: value} table: unknown keys and bad values raise ConfigError."""
    values = {}
    for key, value in (table or {}).items():
        values[key] = check_field(f"{section_name}.{key}", check_key(section_name, cls, key), value)
    return cls(**values)

