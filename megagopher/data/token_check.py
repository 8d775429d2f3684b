"""Checking an indexed dataset's token ids against the model's vocabulary, once per file version.

Why at open and not per batch: each data-parallel rank reads only its slice of a batch, so a check per
batch would stop only the rank that met the bad id while its peers wait in a collective; checked when
the dataset is opened, every rank reads the same file and raises the same DataError before training.
Why it is cheap enough: it is one sequential, chunked numpy pass (argmin/argmax) over the memory-mapped
.bin, and its result, the smallest and largest id and where they are, is kept in the index cache under
a key of the .bin's name, size and modification time, so later runs pay one stat. (Without a writable
cache the pass is repeated per process; within a process it is remembered.) A changed token that stays
inside the vocabulary is not detectable from the files and trains like any other token.
"""
import hashlib
import json
import os

from .cache import read_record, write_record
from .errors import DataError
from .indexed_dataset import data_file_path, index_file_path

_seen = {}   # (path, identity) of a .bin -> its extremes: stages and blends of one process reuse them


def _identity(bin_path):
    """What tells one version of a .bin from another without reading it, as make and rsync do. No
    directory in it: a copy that keeps the modification time (cp -p) is the same data and reuses the record."""
    st = os.stat(bin_path)
    return {"bin": os.path.basename(bin_path)[:-len(".bin")], "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def token_extremes(indexed, cache_dir=None):
    """``indexed.token_extremes()``, from the index cache when a record for this version of the .bin
    is there (and sound), else computed and recorded."""
    bin_path = data_file_path(indexed.path_prefix)
    identity = _identity(bin_path)
    key = json.dumps(identity, sort_keys=True)
    seen = (os.path.abspath(bin_path), key)
    if seen in _seen:
        return _seen[seen]
    path = None
    if cache_dir is not None:
        name = f"{identity['bin']}-tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        path = os.path.join(cache_dir, name)
        record = read_record(path)
        if record is not None and record.get("identity") == identity:
            _seen[seen] = None if record["extremes"] is None else tuple(map(tuple, record["extremes"]))
            return _seen[seen]
    extremes = indexed.token_extremes()
    if path is not None:
        write_record(path, {"identity": identity, "extremes": extremes})
    _seen[seen] = extremes
    return extremes


def check_token_ids(indexed, vocab_size, cache_dir=None):
    """DataError naming the file unless every token id of ``indexed`` lies in [0, vocab_size): a float
    dtype in the .idx, an id outside the vocabulary (with its position and sequence), or a .bin that is
    all zeros (what a crash leaves of a file that was never flushed; no real corpus is one token)."""
    bin_path, idx_path = data_file_path(indexed.path_prefix), index_file_path(indexed.path_prefix)
    if indexed.dtype.kind not in "iu":
        raise DataError(f"{idx_path}: its dtype code says {indexed.dtype}, which holds no token ids "
                        f"(the index is corrupt, or this is not a token dataset)")
    extremes = token_extremes(indexed, cache_dir)
    if extremes is None:
        return
    (lo, lo_at), (hi, hi_at) = extremes
    if lo == hi == 0 and indexed.num_tokens > 1:
        raise DataError(f"{bin_path}: every one of its {indexed.num_tokens} tokens is id 0: the file is "
                        f"zero-filled (damaged), not a tokenised corpus")
    for value, at in ((lo, lo_at), (hi, hi_at)):
        if not 0 <= value < vocab_size:
            raise DataError(f"{bin_path}: token id {value} at position {at} (sequence {indexed.sequence_at(at)}) "
                            f"is outside the model's vocabulary of {vocab_size} ids: the file is damaged or "
                            f"was made with another tokenizer")
