"""The outcomes a run ends with on purpose, and their exit statuses, in one place. Imports nothing, so every
layer (the data and config packages included, which need no torch) may use it; megagopher.common
re-exports it. Every entry point (megagopher.train, generate, evaluate, tools/*.py) returns these names,
never a bare number, so a status means one thing across the project (docs/ARCHITECTURE.md 4.1)."""

# Exit statuses besides 0: bad input (a config key, a data, tokenizer or checkpoint file, a command-line
# value), an agreed non-finite loss, a failed save under checkpoint.on_save_error = "stop", and a lost
# rank, launcher or rendezvous store (training/watchdog.py). (1 stays Python's: an uncaught error, or a
# tool's check that found a problem.)
EXIT_INPUT_ERROR, EXIT_NON_FINITE, EXIT_SAVE_FAILED, EXIT_PEER_LOST = 2, 3, 4, 5


class InputError(ValueError):
    """Bad input the user must fix: a config key, a dataset, tokenizer or config file. The message is one
    line naming the file or key and what is wrong; the training command prints it and exits with
    EXIT_INPUT_ERROR on every rank (every rank reads the same input, so every rank raises it)."""


class NonFiniteLoss(RuntimeError):
    """The step's loss was NaN or infinite on some rank and training.nan_policy is "stop": every rank
    agreed on it in the step's all-reduce (training/agreement.py); the training command exits with
    EXIT_NON_FINITE after publishing any checkpoint still being written."""


class CheckpointSaveError(OSError):
    """A save failed on some rank (every rank raises it, having agreed); the previous checkpoint is intact.
    The Checkpointer turns it into SaveFailed ("stop") or a warning ("continue")."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, read-only file system) and checkpoint.on_save_error
    is "stop": every rank agreed on it; the training command exits with EXIT_SAVE_FAILED."""


# The outcome of each error a training run ends with, first match wins.
_EXIT_STATUS = ((NonFiniteLoss, EXIT_NON_FINITE), (InputError, EXIT_INPUT_ERROR), (SaveFailed, EXIT_SAVE_FAILED))
ENDING_ERRORS = tuple(error for error, _ in _EXIT_STATUS)


def exit_status(error):
    """The exit status of a run that ended with ``error`` (one of ENDING_ERRORS)."""
    for kind, status in _EXIT_STATUS:
        if isinstance(error, kind):
            return status
    raise TypeError(f"{type(error).__name__} is not an ending outcome; valid: "
                    f"{', '.join(e.__name__ for e in ENDING_ERRORS)}")
