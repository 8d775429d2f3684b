"""From a checkpoint path to what a reader of it needs: the iteration directory, the run's config with its
stages, the GPTConfig the weights belong to, and the run's tokenizer (when it had one).

Everything is rebuilt from ``metadata.json`` (ARCHITECTURE 4.6), so no process group is needed. Two facts
come from the checkpoint rather than the config: the number of layers (progress.num_layers, which stage
growth may have changed) and the vocabulary (the unpadded row count of the word embeddings, which is the
tokenizer's when the run had one).
"""
import os

from megagopher.training.checkpoint import CheckpointReader, iter_dir, list_checkpoints


class CheckpointNotFound(FileNotFoundError):
    pass


def resolve_checkpoint(path):
    """An ``iter_NNNNNNN`` directory from ``path``: that directory itself, or the one ``path/latest`` names
    (falling back to the newest complete one when ``latest`` is missing)."""
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    if not os.path.isdir(path):
        raise CheckpointNotFound(f"checkpoint {path!r} does not exist")
    latest = os.path.join(path, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise CheckpointNotFound(f"{latest} holds {text!r}, not an iteration number")
        candidate = iter_dir(path, int(text))
        if os.path.exists(os.path.join(candidate, "metadata.json")):
            return candidate
    found = list_checkpoints(path)
    if not found:
        raise CheckpointNotFound(f"{path!r} is neither a checkpoint (iter_NNNNNNN with metadata.json) nor a "
                                 "checkpoint directory holding one")
    return iter_dir(path, found[-1])


def open_checkpoint(path):
    """A CheckpointReader on the checkpoint ``path`` resolves to."""
    return CheckpointReader(resolve_checkpoint(path))


def run_config(reader):
    """The run config saved with the checkpoint, its stage overrides turned back into the
    ``{(section, key): value}`` form of megagopher.training.config."""
    saved = reader.meta["config"]
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items() if k != "stages"}
    cfg["stages"] = [{**{k: v for k, v in st.items() if k != "overrides"},
                      "overrides": {(s, k): v for s, k, v in st.get("overrides", [])}}
                     for st in saved.get("stages", [])]
    return cfg


def vocab_size_of(reader):
    """The real (unpadded) vocabulary of the checkpoint's model."""
    return int(reader.meta["tensors"]["embedding.word.weight"]["full_shape"][0])


def model_config_of(reader):
    """The GPTConfig of the weights in ``reader``."""
    from megagopher.training.config import model_config
    cfg = run_config(reader)
    progress = reader.meta.get("progress") or {}
    return model_config(cfg, num_layers=progress.get("num_layers", cfg["model"]["num_layers"]),
                        vocab_size=vocab_size_of(reader))


def tokenizer_dir_of(reader):
    """The run's data.tokenizer_dir (the last stage that sets one wins), or "" when it had none."""
    cfg = run_config(reader)
    found = cfg.get("data", {}).get("tokenizer_dir", "")
    for st in cfg["stages"]:
        found = st["overrides"].get(("data", "tokenizer_dir")) or found
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
