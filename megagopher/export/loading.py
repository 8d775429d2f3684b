"""From a checkpoint path to what a reader of it needs: the iteration directory, the run's config with its
stages, the GPTConfig the weights belong to, and the run's tokenizer (when it had one).

Everything is rebuilt from ``metadata.json`` (docs/ARCHITECTURE.md 4.6), so no process group is needed. Two facts
come from the checkpoint rather than the config: the number of layers (progress.num_layers, which stage
growth may have changed) and the vocabulary (the unpadded row count of the word embeddings, which is the
tokenizer's when the run had one).
"""
import os

from megagopher.training.checkpoint import CheckpointCorrupt, CheckpointReader, find_checkpoints
from megagopher.training.ckpt_load import saved_model_config, saved_run_config, saved_vocab_size


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


# Rebuilt from the metadata alone; the trainer checks a run's [model] against the same (ckpt_load.py).
run_config, vocab_size_of, model_config_of = saved_run_config, saved_vocab_size, saved_model_config


def _last_data_setting(reader, key):
    """The run's data.KEY: the last stage that sets one wins over the [data] section."""
    cfg = run_config(reader)
    found = getattr(cfg.data, key)
    for st in cfg.stages:
        found = st.overrides.get(("data", key)) or found
    return found


def tokenizer_dir_of(reader):
    """The run's data.tokenizer_dir (the last stage that sets one wins), or "" when it had none."""
    return _last_data_setting(reader, "tokenizer_dir")


def tokenizer_kind_of(reader):
    """The run's data.tokenizer_kind (the last stage that sets one wins), or "" (detect) when it named none."""
    return _last_data_setting(reader, "tokenizer_kind")


def load_run_tokenizer(reader, tokenizer_dir=None, required=True):
    """The tokenizer of the run (or the one in ``tokenizer_dir``, its kind detected); None when there is none
    and not ``required``. Checks it fits the model's vocabulary."""
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
    # The run's kind names the format of the run's directory; a directory given here is detected.
    tok = load_tokenizer(directory, None if tokenizer_dir else tokenizer_kind_of(reader))
    vocab = vocab_size_of(reader)
    if tok.vocab_size > vocab:
        raise ValueError(f"tokenizer {os.path.join(directory, tok.files[0])} ({tok.kind}) has {tok.vocab_size} "
                         f"tokens but the model of checkpoint {reader.path} has a vocabulary of {vocab}: it is not "
                         "this model's tokenizer")
    return tok
