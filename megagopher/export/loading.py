"""From a checkpoint path to what a reader of it needs: the iteration directory, the run's config with its
stages, the GPTConfig the weights belong to, and the run's tokenizer (when it had one).

Everything is rebuilt from ``metadata.json`` (docs/ARCHITECTURE.md 4.6), so no process group is needed. Two facts
come from the checkpoint rather than the config: the number of layers (progress.num_layers, which stage
growth may have changed) and the vocabulary (the unpadded row count of the word embeddings, which is the
tokenizer's when the run had one).
"""
import dataclasses
import os

from megagopher.config import from_tables
from megagopher.training.checkpoint import CheckpointCorrupt, CheckpointReader, find_checkpoints


class CheckpointNotFound(FileNotFoundError):
    pass


def open_checkpoint(path):
    """A CheckpointReader on the newest readable checkpoint ``path`` names (checkpoint.find_checkpoints: an
    iter_N directory, or the newest complete one of a root, falling back past unreadable ones)."""
    if not os.path.exists(path):
        raise CheckpointNotFound(f"checkpoint {path!r} does not exist")
    errors = []
    for candidate in find_checkpoints(path):
        try:
            return CheckpointReader(candidate)
        except CheckpointCorrupt as e:
            errors.append(str(e))
    if errors:
        raise CheckpointNotFound(f"no readable checkpoint in {path!r}: {'; '.join(errors)}")
    raise CheckpointNotFound(f"{path!r} is neither a checkpoint (iter_NNNNNNN with metadata.json) nor a "
                             "checkpoint directory holding one")


def run_config(reader):
    """The run's JobConfig, as saved with the checkpoint (format 2: TOML-shaped tables; format 1 stored
    each stage's overrides as [section, key, value] triples)."""
    saved = reader.meta["config"]
    if reader.meta.get("format_version", 1) < 2:
        saved = dict(saved, stages=[_stage_table_v1(st) for st in saved.get("stages", [])])
    return from_tables(saved)


def _stage_table_v1(stage):
    table = {k: v for k, v in stage.items() if k != "overrides"}
    for section, key, value in stage.get("overrides", []):
        table.setdefault(section, {})[key] = value
    return table


def vocab_size_of(reader):
    """The real (unpadded) vocabulary of the checkpoint's model."""
    return int(reader.meta["tensors"]["embedding.word.weight"]["full_shape"][0])


def model_config_of(reader):
    """The GPTConfig of the weights in ``reader``: the run's [model] at the depth reached (growth) and with
    the context of the stage it was saved in (a long-context stage's seq_length and rope_theta)."""
    cfg = run_config(reader)
    progress = reader.meta.get("progress") or {}
    stage = min(progress.get("stage_index", 0), len(cfg.stages) - 1)
    context = {k: v for (section, k), v in cfg.stages[stage].overrides.items() if section == "model"}
    model = cfg.model_at(num_layers=progress.get("num_layers", cfg.model.num_layers), vocab_size=vocab_size_of(reader))
    return dataclasses.replace(model, **context)


def tokenizer_dir_of(reader):
    """The run's data.tokenizer_dir (the last stage that sets one wins), or "" when it had none."""
    cfg = run_config(reader)
    found = cfg.data.tokenizer_dir
    for st in cfg.stages:
        found = st.overrides.get(("data", "tokenizer_dir")) or found
    return found


def load_run_tokenizer(reader, tokenizer_dir=None, required=True):
    """The tokenizer of the run (or the one in ``tokenizer_dir``); None when there is none and not
    ``required``. Checks it fits the model's vocabulary."""
    directory = tokenizer_dir or tokenizer_dir_of(reader)
    if not directory:
        if not required:
            return None
        raise ValueError(f"the run of checkpoint {reader.path} had no tokenizer (data.tokenizer_dir is empty): "
                         "give token ids (--prompt-ids) or a tokenizer directory (--tokenizer-dir DIR)")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} (data.tokenizer_dir of checkpoint "
                                f"{reader.path}) does not exist here; pass --tokenizer-dir DIR")
    from megagopher.data.tokenizer import load_tokenizer
    tok = load_tokenizer(directory)
    tok.directory = directory
    vocab = vocab_size_of(reader)
    if tok.vocab_size > vocab:
        raise ValueError(f"tokenizer {directory} has {tok.vocab_size} tokens but the model's vocabulary is {vocab}")
    return tok
