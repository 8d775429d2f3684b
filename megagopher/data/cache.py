"""The index cache: files the data pipeline derives from a dataset and keeps to save work on the next run.

Every file is written under a temporary name and renamed, so ranks that build at the same time only ever
replace a file with one of identical content, and a reader never sees a half-written one. Every file is
sealed by a digest: a JSON record carries the sha256 of its own content, and the manifest of a set of
.npy arrays carries each array file's size and sha256. A cache file is no input the user must fix: one
that is missing, damaged (truncated, zero-filled, a flipped bit), unreadable or not a file is noticed by
its digest, named in a warning and rebuilt; when it cannot be written (a directory in the way, a
read-only disk) a warning names it and the run goes on without caching. So a damaged cache never
changes the data a run reads, and never stops a run.
"""
import hashlib
import json
import os
import uuid
import warnings

import numpy as np

from .errors import reason


def _warn(message):
    warnings.warn(message, stacklevel=3)


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(path, write):
    """``write(binary file)`` into a temporary name, then rename it to ``path``. Returns the file's
    {"bytes", "sha256"}, or None (after a warning naming the file) when it cannot be written there."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        seal = {"bytes": os.path.getsize(tmp), "sha256": _file_sha256(tmp)}
        os.replace(tmp, path)
        return seal
    except OSError as e:
        _warn(f"cannot write the index cache file {path} ({reason(e)}); going on without caching it")
        if os.path.isfile(tmp):
            os.remove(tmp)
        return None


def write_record(path, record):
    """Write ``record`` (JSON-able) sealed with its digest; False when it cannot be written."""
    text = json.dumps({"record": record, "sha256": _digest(record)}, indent=1, sort_keys=True)
    return _write(path, lambda f: f.write(text.encode())) is not None


def read_record(path):
    """The record written at ``path``, or None when there is none or it is damaged (with a warning)."""
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "rb") as f:
            sealed = json.loads(f.read().decode("utf-8"))
        if _digest(sealed["record"]) == sealed["sha256"]:
            return sealed["record"]
        why = "its digest does not match its content"
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = reason(e) if isinstance(e, OSError) else f"not a sealed record: {type(e).__name__}"
    _warn(f"index cache file {path} is damaged ({why}); rebuilding it")
    return None


def _load_arrays(manifest, paths, description):
    """The arrays of a manifest that matches ``description`` and whose files match their digests."""
    record = read_record(manifest)
    if record is None:
        return None
    try:
        if record["description"] != description:
            raise ValueError("it describes other indices")
        for name, path in paths.items():
            want = record["files"][name]
            if os.path.getsize(path) != want["bytes"] or _file_sha256(path) != want["sha256"]:
                raise ValueError(f"{os.path.basename(path)} does not match its digest")
        return {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"{os.path.basename(e.filename or '')}: {reason(e)}" if isinstance(e, OSError) else str(e)
        _warn(f"index cache {manifest} cannot be used ({why}); rebuilding it")
        return None


def cached_indices(cache_dir, stem, description, build,
                   names=("document_index", "sample_index", "shuffle_index")):
    """The arrays ``build()`` returns ({name: array} for ``names``), from cache_dir/<stem>-<hash>-<name>.npy
    when the manifest cache_dir/<stem>-<hash>.json vouches for them, else built and saved. ``description``
    (JSON-able) must hold everything the arrays depend on; its hash names the files, the manifest repeats it."""
    if cache_dir is None:
        return build()
    base = os.path.join(cache_dir, f"{stem}-{_digest(description)[:16]}")
    manifest, paths = f"{base}.json", {n: f"{base}-{n}.npy" for n in names}
    arrays = _load_arrays(manifest, paths, description)
    if arrays is not None:
        return arrays
    arrays = build()
    files = {}
    for name, path in paths.items():
        files[name] = _write(path, lambda f, a=arrays[name]: np.save(f, a))
        if files[name] is None:
            return arrays
    # The manifest goes last: while it is missing a reader rebuilds rather than trusts partial files.
    write_record(manifest, {"description": description, "files": files})
    return arrays
