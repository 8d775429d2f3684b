"""Megatron's memory-mapped indexed dataset format (MMIDIDX), read and written.

A dataset is a pair of files sharing a prefix:
  PREFIX.bin  the token ids of every sequence, back to back, in one dtype;
  PREFIX.idx  little-endian header and index:
      9 bytes   magic b"MMIDIDX\\x00\\x00"
      uint64    version (1)
      uint8     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
      uint64    sequence count S
      uint64    document count D (= number of documents + 1)
      int32[S]  sequence lengths, in tokens
      int64[S]  byte offset of each sequence in .bin
      int64[D]  document indices: sequence index where each document starts, starting at 0 and
                ending with S (document k is sequences [doc[k], doc[k+1]))
This is the layout Megatron-Core's ``IndexedDataset`` reads and writes (megatron/core/datasets/
indexed_dataset.py), so files go both ways. Both writers store the sequences back to back, so the
pointers are the running byte sums of the lengths and the .bin is exactly as long as the index says. The
reader checks all of that when it opens the pair (one vectorised pass over the index, no pass over the
.bin), so a truncated, foreign or damaged file fails with a DataError naming it instead of returning
garbage. What the format cannot reveal is a changed token inside the .bin; ``token_extremes`` gives
what a caller needs to check ids against a vocabulary (data/token_check.py).
"""
import array
import os
import struct

import numpy as np

from .errors import DataError, MissingDataFile, require_file, unreadable

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8   # 34 bytes
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def data_file_path(prefix):
    return prefix + ".bin"


def index_file_path(prefix):
    return prefix + ".idx"


def token_dtype_for(vocab_size):
    """uint16 when every id fits (vocab_size <= 65536), int32 otherwise: halves the .bin for GPT-2-sized
    vocabularies."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def _map(path):
    """A read-only byte map of ``path``; DataError naming it when it cannot be read."""
    try:
        return np.memmap(path, mode="r", dtype=np.uint8)
    except OSError as e:
        raise unreadable(DataError, path, e) from None


def _read_index(idx_path):
    """(dtype, sequence count, document-index count, byte map) of an .idx whose header and size agree."""
    try:
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
    except OSError as e:
        raise unreadable(DataError, idx_path, e) from None
    if len(header) < HEADER_SIZE or header[:9] != MAGIC:
        raise DataError(f"{idx_path} is not an MMIDIDX index: it starts with {header[:9]!r}, "
                        f"expected {MAGIC!r}")
    version, code, seq_count, doc_count = struct.unpack("<QBQQ", header[9:])
    if version != VERSION:
        raise DataError(f"{idx_path}: index version {version} is not supported (only {VERSION})")
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
    idx_size = os.path.getsize(idx_path)
    # Megatron's multimodal files append one int8 mode per sequence; accept and ignore them.
    expected = HEADER_SIZE + seq_count * (4 + 8) + doc_count * 8
    if idx_size not in (expected, expected + seq_count):
        raise DataError(f"{idx_path} is {idx_size} bytes but its header ({seq_count} sequences, "
                        f"{doc_count} document indices) implies {expected}: truncated or corrupt")
    return np.dtype(DTYPE_CODES[code]), seq_count, doc_count, _map(idx_path)


def check_index(idx_path, lengths, pointers, docs, itemsize):
    """The token count of an index whose arrays agree: document indices rising from 0 to the sequence
    count, no negative length, and every pointer the running byte sum of the lengths before it (how both
    writers lay out the .bin). DataError naming ``idx_path`` and the first entry that disagrees."""
    seq_count = len(lengths)
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != seq_count or np.any(np.diff(docs) < 0):
        raise DataError(f"{idx_path}: document indices must rise from 0 to the sequence count "
                        f"{seq_count}; got {docs[:3].tolist()}...{docs[-3:].tolist()}")
    if not seq_count:
        return 0
    if lengths.min() < 0:
        bad = int(np.argmax(lengths < 0))
        raise DataError(f"{idx_path}: sequence {bad} has negative length {int(lengths[bad])}: the index is corrupt")
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    starts = ends - lengths.astype(np.int64) * itemsize
    wrong = np.flatnonzero(pointers != starts)
    if wrong.size:
        i = int(wrong[0])
        raise DataError(f"{idx_path}: sequence {i} starts at byte {int(pointers[i])} of the .bin but the "
                        f"sequences before it end at byte {int(starts[i])}: the index is corrupt")
    return int(ends[-1]) // itemsize


class IndexedDataset:
    """Read-only view of PREFIX.bin / PREFIX.idx (ours or Megatron's).

    ``len(ds)`` is the number of sequences; ``ds[i]`` returns sequence i as a numpy array of token ids
    (a view into the memory map: no copy); ``ds.get(i, offset, length)`` returns part of it.
    ``ds.sequence_lengths`` (int32[S]), ``ds.sequence_pointers`` (int64[S]) and ``ds.document_indices``
    (int64[D], starting at 0) are the arrays of the index. Opening checks the whole index (see
    ``check_index``) against the .bin, so any offset it hands out lies inside the file. Raises
    MissingDataFile (a FileNotFoundError) when a file is missing and DataError (a ValueError) when a file
    is unreadable, the index is malformed or the .bin does not have the size the index says.
    """

    def __init__(self, path_prefix):
        self.path_prefix = str(path_prefix)
        self._open()

    def _open(self):
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        hint = f" (expected {self.path_prefix}.bin and .idx, e.g. from tools/preprocess_data.py)"
        for path in (idx_path, bin_path):
            require_file(path, "indexed dataset file", DataError, MissingDataFile, hint)
        self.dtype, seq_count, doc_count, index = _read_index(idx_path)
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(index, np.int32, seq_count, off)
        off += 4 * seq_count
        self.sequence_pointers = np.frombuffer(index, np.int64, seq_count, off)
        off += 8 * seq_count
        self.document_indices = np.frombuffer(index, np.int64, doc_count, off)
        self._index = index
        self.num_tokens = check_index(idx_path, self.sequence_lengths, self.sequence_pointers,
                                      self.document_indices, self.dtype.itemsize)
        bin_size = os.path.getsize(bin_path)
        needed = self.num_tokens * self.dtype.itemsize
        if bin_size < needed:
            raise DataError(f"{bin_path} is {bin_size} bytes but {idx_path} points up to byte {needed}: "
                            f"the .bin is truncated (or belongs to another index)")
        if bin_size > needed:
            # Megatron's writer and ours write exactly the indexed tokens; more bytes mean the pair does
            # not belong together (or the last length in the index is corrupt).
            raise DataError(f"{bin_path} is {bin_size} bytes but {idx_path} accounts for {needed}: the "
                            f"files do not belong together (or the index is corrupt)")
        self._bin = _map(bin_path) if bin_size else np.zeros(0, np.uint8)

    def __getstate__(self):
        # Memory maps do not pickle; DataLoader workers reopen the files by path.
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self._open()

    def __len__(self):
        return len(self.sequence_lengths)

    @property
    def num_documents(self):
        return len(self.document_indices) - 1

    def token_extremes(self, chunk_tokens=1 << 24):
        """((smallest id, its position), (largest id, its position)) over every token of the .bin, in one
        chunked pass (positions count tokens from the start of the .bin); None when it holds no token."""
        tokens = np.frombuffer(self._bin, self.dtype, self.num_tokens)
        lo = hi = None
        for start in range(0, self.num_tokens, chunk_tokens):
            chunk = tokens[start:start + chunk_tokens]
            i, j = int(chunk.argmin()), int(chunk.argmax())
            if lo is None or chunk[i] < lo[0]:
                lo = (chunk[i].item(), start + i)
            if hi is None or chunk[j] > hi[0]:
                hi = (chunk[j].item(), start + j)
        return None if lo is None else (lo, hi)

    def sequence_at(self, position):
        """The sequence holding token ``position`` of the .bin (positions as in ``token_extremes``)."""
        starts = self.sequence_pointers // self.dtype.itemsize
        return int(np.searchsorted(starts, position, side="right")) - 1

    def _check(self, i):
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"sequence index must be an integer or slice, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} is out of range for {self.path_prefix} "
                             f"({n} sequences)")
        return int(i) % n if n else int(i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i, offset=0, length=None):
        """Tokens ``[offset, offset + length)`` of sequence i (to its end when length is None)."""
        i = self._check(i)
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {i} of "
                             f"{self.path_prefix} ({size} tokens)")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)


def write_index(idx_path, dtype, sequence_lengths, document_indices):
    """Write an MMIDIDX .idx for sequences stored back to back (pointers are the running byte sums)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[np.dtype(dtype)], len(lengths), len(docs)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(docs.tobytes())


class IndexedDatasetBuilder:
    """Write PREFIX.bin / PREFIX.idx one document at a time, under temporary names.

    Nothing appears under the final names until :meth:`finalize`, which writes the index and renames
    .bin then .idx into place (the .idx last, so a reader never sees a complete-looking pair whose .bin
    is missing). :meth:`abort` removes the temporary files. Each document is stored as one sequence, as
    Megatron's preprocess_data does for ``text_document`` datasets.
    """

    def __init__(self, path_prefix, dtype):
        self.path_prefix = str(path_prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code (valid: {sorted(map(str, CODE_OF_DTYPE))})")
        self.info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        os.makedirs(os.path.dirname(os.path.abspath(self.path_prefix)), exist_ok=True)
        self._tmp = f".tmp-{os.getpid()}"
        self._bin = open(data_file_path(self.path_prefix) + self._tmp, "wb")
        # 4 bytes a document (the .idx's own int32), not a Python int's 36: a corpus of 100M documents keeps
        # 0.4 GB of lengths until finalize instead of 3.6 GB.
        self.sequence_lengths = array.array("i")
        self.num_tokens = 0

    def add_document(self, tokens):
        array = np.asarray(tokens)
        if self.info is not None and array.size and (array.min() < self.info.min or array.max() > self.info.max):
            raise ValueError(f"token ids outside {self.dtype} range [{self.info.min}, {self.info.max}] "
                             f"while writing {self.path_prefix}.bin")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self.sequence_lengths.append(array.size)
        self.num_tokens += array.size

    def finalize(self):
        """Write the index, flush both files to disk and move them to their final names."""
        bin_path, idx_path = data_file_path(self.path_prefix), index_file_path(self.path_prefix)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        n = len(self.sequence_lengths)
        write_index(idx_path + self._tmp, self.dtype, self.sequence_lengths, np.arange(n + 1))
        os.replace(bin_path + self._tmp, bin_path)
        os.replace(idx_path + self._tmp, idx_path)

    def abort(self):
        self._bin.close()
        for path in (data_file_path(self.path_prefix), index_file_path(self.path_prefix)):
            if os.path.exists(path + self._tmp):
                os.remove(path + self._tmp)
