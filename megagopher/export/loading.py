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
