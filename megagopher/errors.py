"""The errors a run ends with on purpose, and its exit statuses. Imports nothing, so every layer (the data
and config packages included, which need no torch) may use it; megagopher.common re-exports it."""


class InputError(ValueError):
    """Bad input the user must fix: a config key, a dataset, tokenizer or config file. The message is one
    line naming the file or key and what is wrong; the training command prints it and exits with status 2
    on every rank (every rank reads the same input, so every rank raises it)."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, read-only file system) and checkpoint.on_save_error
    is "stop": every rank agreed on it; the training command exits with status 4."""


# Exit statuses of megagopher.train besides 0: bad input, an agreed non-finite loss, a failed save under
# checkpoint.on_save_error = "stop", and a lost rank, launcher or rendezvous store (training/watchdog.py).
EXIT_INPUT_ERROR, EXIT_NON_FINITE, EXIT_SAVE_FAILED, EXIT_PEER_LOST = 2, 3, 4, 5
