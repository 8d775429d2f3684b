"""Build the train / valid / test datasets the trainer reads: split, blend, cache (Megatron semantics).

``build_gpt_datasets`` is the one call the training loop needs. Every dataset it returns is already
shuffled and fixed by (blend, seq_length, seed, split), so global batch k is samples [k*gbs, (k+1)*gbs)
whatever the data-parallel size (invariant 2); ``global_batch`` shows the slicing each DP rank does.
"""
import os
import re
import warnings

import numpy as np

from megagopher.errors import InputError

from .blended_dataset import BlendedDataset, normalize_weights, samples_per_dataset
from .errors import DataError
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset
from .token_check import check_token_ids

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split):
    """'969,30,1' -> normalised [train, valid, test] weights; missing trailing parts count as 0 (as in
    Megatron: '99,1' has no test split)."""
    parts = [p for p in re.split(r"[,/ ]+", str(split).strip()) if p]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"split {split!r} must be up to three comma-separated numbers, like '969,30,1'") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"split {split!r} must be 1 to 3 non-negative numbers with a positive sum, like '969,30,1'")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_document_ranges(num_documents, split_weights):
    """[(first, count)] per split over documents 0..N-1, contiguous, with Megatron's rounding
    (``_get_split_indices``): cumulative round(w * N), the excess taken off every boundary."""
    bounds = [0]
    for w in split_weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds[1:] = [b - excess for b in bounds[1:]]
    for i in range(1, len(bounds)):   # a zero-weight first split can go negative (e.g. '0,3,7' of 5)
        bounds[i] = max(bounds[i], bounds[i - 1])
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(split_weights))]


def _parse_blend(blend):
    if isinstance(blend, (str, os.PathLike)):
        blend = [[1.0, blend]]
    try:
        weights = [float(w) for w, _ in blend]
        prefixes = [os.fspath(p) for _, p in blend]
    except (TypeError, ValueError):
        raise InputError(f"blend must be [[weight, path_prefix], ...], got {blend!r}") from None
    return normalize_weights(weights, "blend"), prefixes


def default_cache_dir(prefix):
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def _writable(cache_dir):
    try:
        os.makedirs(cache_dir, exist_ok=True)
        return os.access(cache_dir, os.W_OK)
    except OSError:
        return False


def _open_indexed(prefixes, vocab_size, cache_dir):
    """The blend's indexed datasets, each one's token ids checked against ``vocab_size`` when it is given."""
    indexed = [IndexedDataset(p) for p in prefixes]
    for ds in indexed if vocab_size is not None else ():
        check_token_ids(ds, vocab_size, cache_dir)
    return indexed


def build_gpt_datasets(blend, seq_length, seed, split, num_samples, cache_dir=None, vocab_size=None):
    """Return (train, valid, test) datasets of shuffled GPT samples.

    blend        [[weight, path_prefix], ...] (or one path prefix): indexed datasets and their weights.
    seq_length   each sample is seq_length + 1 token ids (inputs and shifted labels).
    seed         fixes every document and sample order.
    split        "969,30,1"-style train/valid/test weights over each dataset's documents (contiguous
                 ranges, Megatron's rounding). A document is a sequence of the .idx: preprocess_data
                 writes one per document, and Megatron-Core also splits GPT data by sequence.
    num_samples  (n_train, n_valid, n_test): samples each split must provide; epochs repeat as needed.
                 A count of 0 gives None for that split.
    cache_dir    where indices are cached; default: PREFIX's directory + "/index-cache" for the first
                 prefix (no cache, with a warning, if it cannot be written). A damaged cache file is
                 rebuilt, with a warning (data/cache.py).
    vocab_size   when given, every token id of every dataset must lie in [0, vocab_size)
                 (data/token_check.py: one pass over each .bin, remembered in the cache).

    Each returned dataset has ``len() >= `` its requested count and ``ds[i]`` -> int64 numpy array of
    seq_length + 1 ids, identical for identical (blend, seq_length, seed, split). With several datasets the
    result is a BlendedDataset of exactly the requested size. Raises a ValueError naming the path or
    argument at fault; for the blend, the split and the files an InputError (DataError; MissingDataFile,
    also a FileNotFoundError), which the training command reports in one line with exit status 2.
    """
    weights, prefixes = _parse_blend(blend)
    split_weights = parse_split(split)
    if len(num_samples) != 3 or any(int(n) != n or n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative integers (train, valid, test), got {num_samples}")
    if int(seq_length) != seq_length or seq_length < 1:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length}")
    if cache_dir is None:
        cache_dir = default_cache_dir(prefixes[0])
        if not _writable(cache_dir):
            warnings.warn(f"cannot write the index cache {cache_dir}; indices will be rebuilt every run")
            cache_dir = None
    indexed = _open_indexed(prefixes, vocab_size, cache_dir)
    ranges = [split_document_ranges(len(ds), split_weights) for ds in indexed]

    results = []
    for s, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[s])
        if n == 0:
            results.append(None)
            continue
        per_dataset = samples_per_dataset(weights, n) if len(indexed) > 1 else [n]
        parts = []
        for d, ds in enumerate(indexed):
            first, count = ranges[d][s]
            if per_dataset[d] == 0:
                parts.append(None)
                continue
            if count == 0:
                raise DataError(f"the {name} split of {prefixes[d]} is empty (split {split!r} over "
                                f"{len(ds)} documents) but {n} {name} samples were requested")
            parts.append(GPTDataset(ds, first, count, seq_length, seed, int(per_dataset[d]), name, cache_dir))
        results.append(parts[0] if len(parts) == 1 else BlendedDataset(parts, weights, n))
    return tuple(results)


def global_batch(dataset, batch_index, global_batch_size, dp_rank=0, dp_size=1):
    """The rows of global batch ``batch_index`` that data-parallel rank ``dp_rank`` of ``dp_size`` owns:
    samples [k*gbs + r*gbs/dp, k*gbs + (r+1)*gbs/dp), stacked as an int64 array (gbs/dp, seq_length + 1).
    Concatenating every rank's rows gives the dp_size = 1 batch, so data order is layout-independent."""
    if global_batch_size % dp_size:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size}")
    per_rank = global_batch_size // dp_size
    start = batch_index * global_batch_size + dp_rank * per_rank
    return np.stack([dataset[i] for i in range(start, start + per_rank)])
