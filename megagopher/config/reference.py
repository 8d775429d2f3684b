"""The config reference a user reads (``python -m megagopher.train --help-config``), generated from the
field declarations so it cannot drift from the code."""
from megagopher.config.fields import field_default, field_map
from megagopher.config.loading import toml_value
from megagopher.config.schema import SECTIONS, STAGE_SECTIONS, StageConfig


def entries():
    """(key, default, choices, doc) for every key, sections first, then the keys of a stage."""
    out = []
    for section, cls in SECTIONS.items():
        for name, f in field_map(cls).items():
            out.append((f"{section}.{name}", field_default(f), f.metadata["choices"], f.metadata["doc"]))
    for name, f in field_map(StageConfig).items():
        out.append((f"stages.{name}", field_default(f), f.metadata["choices"], f.metadata["doc"]))
    return out


def help_text():
    lines = ["megagopher config keys: --section.key=value on the command line, or [section] key = value in",
             "the TOML file. A [[stages]] entry may also override any key of "
             f"{', '.join(f'[{s}]' for s in STAGE_SECTIONS)} and model.seq_length."]
    current = None
    for key, default, choices, doc in entries():
        section, name = key.split(".", 1)
        if section != current:
            lines += ["", "[[stages]]" if section == "stages" else f"[{section}]"]
            current = section
        shown = "(none)" if default is None else toml_value(default)
        valid = f"  one of: {', '.join(map(toml_value, choices))}" if choices else ""
        lines += [f"  {name} = {shown}{valid}", f"      {doc}"]
    return "\n".join(lines) + "\n"
