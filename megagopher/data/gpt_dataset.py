"""GPT pretraining samples cut from an indexed dataset, after Megatron-Core's GPTDataset.

The documents of one split are concatenated, in a shuffled order, into one token stream per epoch;
sample k of an epoch is the window ``stream[k*L : k*L + L + 1]`` (L = seq_length), so consecutive samples
share one token (the last label of one is the first input of the next) and a sample may run across
document boundaries. Three indices make this random-access and cheap:

  document index  (epochs, docs)  the document order of each epoch: a fresh permutation per epoch, so
                                  every document is used exactly once per epoch;
  sample index    (epochs * (S+1), 2)  where each sample starts: (position in the flattened document
                                  index, token offset in that document); sample k ends where k+1 starts;
  shuffle index   (epochs * S,)   the order samples are served in: a permutation inside each epoch's
                                  block, so no sample is lost or repeated within an epoch.

(S = samples per epoch = (tokens - 1) // L; the fewer than L tokens left at an epoch's end are dropped.)
Everything is built with vectorised numpy (cumsum + searchsorted; no Python loop per sample or per
document) from ``numpy.random.RandomState`` streams seeded by (seed, split, epoch, purpose):
RandomState's output is frozen across numpy versions, and seeding per epoch means asking for more samples
only appends epochs, leaving the earlier order unchanged. The indices are cached as .npy files whose name
hashes everything they depend on (the document lengths themselves, the document range, seq_length, seed,
split and epoch count), written under a temporary name and renamed, so ranks that build at the same time
only overwrite a file with identical content, and vouched for by a manifest of digests, so a damaged
cache file is rebuilt rather than trusted (data/cache.py).
"""
import hashlib
import os

import numpy as np

from .cache import cached_indices
from .errors import DataError

INDEX_VERSION = 2     # bump when the algorithm or the cache layout changes, so old caches are not reused
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
_DOC_SHUFFLE, _SAMPLE_SHUFFLE = 0, 1


def _rng(seed, split, epoch, purpose):
    return np.random.RandomState([seed % 2**32, SPLIT_IDS[split], epoch, purpose])


def build_document_index(first, count, num_epochs, seed, split):
    """(num_epochs, count) array of document ids in [first, first + count), one permutation per epoch."""
    dtype = np.int32 if first + count < 2**31 else np.int64
    out = np.empty((num_epochs, count), dtype=dtype)
    for epoch in range(num_epochs):   # one vectorised permutation per epoch
        out[epoch] = first + _rng(seed, split, epoch, _DOC_SHUFFLE).permutation(count)
    return out


def build_sample_index(sizes, document_index, seq_length):
    """Start (flat document-index position, token offset) of every sample of every epoch, plus the end
    of each epoch's last sample. ``sizes[d]`` is the length of document d (absolute ids)."""
    num_epochs, count = document_index.shape
    flat_sizes = sizes[document_index.ravel()].astype(np.int64)
    tokens_per_epoch = int(flat_sizes[:count].sum())
    per_epoch = (tokens_per_epoch - 1) // seq_length
    doc_starts = np.zeros(flat_sizes.size, dtype=np.int64)     # where each document begins in the stream
    np.cumsum(flat_sizes[:-1], out=doc_starts[1:])
    # Every epoch holds the same documents, so epoch e begins at token e * tokens_per_epoch.
    sample_starts = (np.arange(num_epochs, dtype=np.int64)[:, None] * tokens_per_epoch
                     + np.arange(per_epoch + 1, dtype=np.int64)[None, :] * seq_length).ravel()
    # 'right' - 1 finds the last document starting at or before the token, skipping empty documents.
    position = np.searchsorted(doc_starts, sample_starts, side="right") - 1
    offset = sample_starts - doc_starts[position]
    dtype = np.int32 if max(flat_sizes.size, int(sizes.max(initial=0))) < 2**31 else np.int64
    return np.stack([position, offset], axis=1).astype(dtype)


def build_shuffle_index(per_epoch, num_epochs, seed, split):
    """Global sample ids, a permutation of [e*S, (e+1)*S) inside each epoch's block."""
    out = np.empty(num_epochs * per_epoch, dtype=np.int64)
    for epoch in range(num_epochs):
        out[epoch * per_epoch:(epoch + 1) * per_epoch] = \
            epoch * per_epoch + _rng(seed, split, epoch, _SAMPLE_SHUFFLE).permutation(per_epoch)
    return out


class GPTDataset:
    """Shuffled samples of ``seq_length + 1`` tokens from documents [first, first + count) of ``indexed``.

    ``len()`` is every sample of the epochs built (at least ``num_samples``); ``ds[i]`` is an int64 array
    of seq_length + 1 token ids, fixed by (document lengths, range, seq_length, seed, split). A document
    here is one sequence of the indexed dataset (the ``text_document`` layout preprocess_data writes).
    """

    def __init__(self, indexed, first, count, seq_length, seed, num_samples, split="train", cache_dir=None):
        if split not in SPLIT_IDS:
            raise ValueError(f"split {split!r} is not one of {list(SPLIT_IDS)}")
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"seq_length ({seq_length}) and num_samples ({num_samples}) must be positive")
        if count < 1 or first < 0 or first + count > len(indexed):
            raise ValueError(f"document range [{first}, {first + count}) is empty or outside "
                             f"{indexed.path_prefix} ({len(indexed)} sequences)")
        self.indexed, self.seq_length, self.split = indexed, seq_length, split
        sizes = indexed.sequence_lengths
        tokens = int(sizes[first:first + count].sum(dtype=np.int64))
        self.samples_per_epoch = (tokens - 1) // seq_length
        if self.samples_per_epoch < 1:
            raise DataError(f"the {split} split of {indexed.path_prefix} (documents [{first}, "
                             f"{first + count})) has {tokens} tokens: too few for one sample of "
                             f"seq_length + 1 = {seq_length + 1}")
        self.num_epochs = -(-num_samples // self.samples_per_epoch)
        description = {
            "version": INDEX_VERSION, "split": split, "seed": seed, "seq_length": seq_length,
            "first": first, "count": count, "num_epochs": self.num_epochs,
            "sizes_sha256": hashlib.sha256(np.ascontiguousarray(sizes[first:first + count]).tobytes()).hexdigest(),
            "prefix": os.path.basename(indexed.path_prefix),
        }

        def build():
            doc_index = build_document_index(first, count, self.num_epochs, seed, split)
            return {"document_index": doc_index,
                    "sample_index": build_sample_index(sizes, doc_index, seq_length),
                    "shuffle_index": build_shuffle_index(self.samples_per_epoch, self.num_epochs, seed, split)}

        stem = f"{os.path.basename(indexed.path_prefix)}-{split}"
        arrays = cached_indices(cache_dir, stem, description, build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self._flat_docs = self.document_index.reshape(-1)

    def __len__(self):
        return len(self.shuffle_index)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} is out of range for the {self.split} split of "
                             f"{self.indexed.path_prefix} ({len(self)} samples)")
        epoch, k = divmod(int(self.shuffle_index[i]), self.samples_per_epoch)
        row = epoch * (self.samples_per_epoch + 1) + k
        (p0, o0), (p1, o1) = self.sample_index[row], self.sample_index[row + 1]
        p0, o0, p1, o1 = int(p0), int(o0), int(p1), int(o1)
        docs = self._flat_docs
        if p0 == p1:
            parts = [self.indexed.get(int(docs[p0]), o0, o1 - o0 + 1)]
        else:   # first document from o0, whole documents between, the last up to o1 inclusive
            parts = [self.indexed.get(int(docs[p0]), o0)]
            parts += [self.indexed.get(int(d)) for d in docs[p0 + 1:p1]]
            parts.append(self.indexed.get(int(docs[p1]), 0, o1 + 1))
        sample = np.concatenate(parts).astype(np.int64)
        assert len(sample) == self.seq_length + 1, (i, len(sample))
        return sample
