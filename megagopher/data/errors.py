"""Errors for data and tokenizer files the user must fix.

They are ``errors.InputError``s: the message is one line naming the file and what is wrong, and the
training command prints it and exits with status 2 on every rank (every rank reads the same files, so
every rank raises the same error). Being ValueErrors, they keep working for library callers that catch
ValueError; the "missing file" ones are FileNotFoundErrors too, as the readers raised before.
"""
import os

from megagopher.errors import InputError


class DataError(InputError):
    """A dataset file (.bin, .idx) or an index cache that cannot be used."""


class TokenizerError(InputError):
    """A tokenizer file (vocab.json, merges.txt) that cannot be used."""


class MissingDataFile(DataError, FileNotFoundError):
    """A dataset file that does not exist."""


class MissingTokenizerFile(TokenizerError, FileNotFoundError):
    """A tokenizer file that does not exist."""


def reason(error):
    """A short, one-line reason for an OSError met while reading a file."""
    if isinstance(error, PermissionError):
        return "permission denied (no read access)"
    if isinstance(error, IsADirectoryError):
        return "it is a directory, not a file"
    return (error.strerror or str(error)).splitlines()[0]


def require_file(path, what, error, missing, hint=""):
    """Raise ``missing`` (a FileNotFoundError) when ``path`` does not exist, or ``error`` when it exists but
    is not a regular file (a directory where the file should be). ``what`` names the file's role."""
    if os.path.isdir(path):
        raise error(f"{what} {path} is a directory, not a file{hint}")
    if not os.path.isfile(path):
        raise missing(f"{what} {path} does not exist{hint}")


def unreadable(error, path, os_error):
    """``error`` for an OSError met while opening or reading ``path``."""
    return error(f"cannot read {path}: {reason(os_error)}")
