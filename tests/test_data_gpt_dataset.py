"""GPT samples, splits, blending and index caching: determinism across builds and data-parallel sizes,
no sample lost or repeated within an epoch, blend proportions, concurrent cache writers, clear errors.

The synthetic datasets store token = its own position in the dataset (plus a per-dataset base), so every
sample tells exactly which documents and offsets it came from."""
import multiprocessing
import os

import numpy as np
import pytest

from megagopher.data import (GPTDataset, IndexedDataset, IndexedDatasetBuilder, build_gpt_datasets,
                             global_batch, parse_split, split_document_ranges)
from megagopher.data.blended_dataset import blending_schedule


def make_dataset(prefix, num_docs, seed=0, base=0, empty_every=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=num_docs)
    if empty_every:
        lengths[::empty_every] = 0     # Megatron-made files may hold empty sequences
    b = IndexedDatasetBuilder(prefix, np.int32)
    pos = base
    for n in lengths:
        b.add_document(np.arange(pos, pos + n))
        pos += n
    b.finalize()
    return prefix


def doc_of_token(indexed, base=0):
    starts = np.concatenate([[0], np.cumsum(indexed.sequence_lengths)]) + base
    return lambda tokens: np.searchsorted(starts, tokens, side="right") - 1


def test_every_epoch_uses_each_document_once_and_each_sample_once(tmp_path):
    ds = IndexedDataset(make_dataset(str(tmp_path / "a"), 200, empty_every=17))
    L = 16
    g = GPTDataset(ds, 0, 200, L, seed=5, num_samples=1000, split="train", cache_dir=str(tmp_path / "c"))
    S = g.samples_per_epoch
    tokens = int(ds.sequence_lengths.sum())
    assert S == (tokens - 1) // L and g.num_epochs == -(-1000 // S) and len(g) == g.num_epochs * S >= 1000
    for e in range(g.num_epochs):
        assert sorted(g.document_index[e].tolist()) == list(range(200))                # each doc once
        block = np.asarray(g.shuffle_index[e * S:(e + 1) * S])
        assert sorted(block.tolist()) == list(range(e * S, (e + 1) * S))                # each sample once
        # Served samples of this epoch, put back in stream order, tile the epoch's token stream exactly:
        # sample k is stream[k*L : k*L + L + 1], sharing one token with sample k + 1.
        stream = np.concatenate([ds[d] for d in g.document_index[e]])
        order = np.argsort(block)
        samples = [g[e * S + int(i)] for i in order]
        for k, s in enumerate(samples):
            assert s.dtype == np.int64 and len(s) == L + 1
            assert np.array_equal(s, stream[k * L:k * L + L + 1])
    assert not np.array_equal(g.document_index[0], g.document_index[1])               # reshuffled per epoch


def test_identical_across_builds_caches_and_prefix_stable(tmp_path):
    prefix = make_dataset(str(tmp_path / "a"), 300)
    ds = IndexedDataset(prefix)
    kw = dict(seq_length=32, seed=9, split="train")
    a = GPTDataset(ds, 0, 300, num_samples=500, cache_dir=str(tmp_path / "c1"), **kw)
    b = GPTDataset(ds, 0, 300, num_samples=500, cache_dir=str(tmp_path / "c1"), **kw)   # loaded from cache
    c = GPTDataset(IndexedDataset(prefix), 0, 300, num_samples=500, cache_dir=None, **kw)
    assert isinstance(b.shuffle_index, np.memmap)                                   # really from disk
    for x in (b, c):
        for name in ("document_index", "sample_index", "shuffle_index"):
            assert np.array_equal(getattr(a, name), getattr(x, name))
    assert all(np.array_equal(a[i], c[i]) for i in range(len(a)))
    more = GPTDataset(ds, 0, 300, num_samples=5 * len(a), cache_dir=None, **kw)   # more epochs appended
    assert all(np.array_equal(a[i], more[i]) for i in range(len(a)))
    other = GPTDataset(ds, 0, 300, 32, seed=10, num_samples=500, split="train")
    assert not np.array_equal(other.shuffle_index, a.shuffle_index)
    files = sorted(os.listdir(tmp_path / "c1"))
    assert len(files) == 4 and all(f.startswith("a-train-") for f in files)        # 3 indices + description
    GPTDataset(ds, 0, 300, 33, 9, 500, "train", cache_dir=str(tmp_path / "c1"))     # seq_length in the hash
    assert len(os.listdir(tmp_path / "c1")) == 8


def test_global_batches_do_not_depend_on_dp_size(tmp_path):
    prefix = make_dataset(str(tmp_path / "a"), 100)
    train, _, _ = build_gpt_datasets([[1.0, prefix]], 8, 1, "1", (64, 0, 0))
    for k in range(4):
        reference = global_batch(train, k, 16)
        assert reference.shape == (16, 9)
        for dp in (2, 4, 8):
            assert np.array_equal(np.concatenate([global_batch(train, k, 16, r, dp) for r in range(dp)]), reference)
    with pytest.raises(ValueError, match="not divisible by dp_size 3"):
        global_batch(train, 0, 16, 0, 3)


def _build_in_child(args):
    prefix, cache = args
    g = GPTDataset(IndexedDataset(prefix), 0, 2000, 8, 3, 200_000, "train", cache)
    return [np.asarray(g.shuffle_index[:50]).tolist(), g[123].tolist()]


def test_racing_builders_agree(tmp_path):
    prefix = make_dataset(str(tmp_path / "a"), 2000)
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_build_in_child, [(prefix, cache)] * 3)
    assert results[0] == results[1] == results[2]
    assert _build_in_child((prefix, cache)) == results[0]
    assert not [f for f in os.listdir(cache) if ".tmp-" in f]


def test_split_semantics_and_disjoint_documents(tmp_path):
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("99,1") == pytest.approx([0.99, 0.01, 0.0])
    # Megatron's _get_split_indices on 1000 and 10 documents.
    assert split_document_ranges(1000, parse_split("969,30,1")) == [(0, 969), (969, 30), (999, 1)]
    assert split_document_ranges(10, parse_split("6,3,1")) == [(0, 6), (6, 3), (9, 1)]
    assert split_document_ranges(5, parse_split("0,3,7")) == [(0, 0), (0, 1), (1, 4)]
    with pytest.raises(ValueError, match="like '969,30,1'"):
        parse_split("a,b")
    prefix = make_dataset(str(tmp_path / "a"), 400)
    ds = IndexedDataset(prefix)
    train, valid, test = build_gpt_datasets([[1, prefix]], 8, 0, "80,15,5", (100, 50, 20))
    which = doc_of_token(ds)
    for split, (lo, hi) in ((train, (0, 320)), (valid, (320, 380)), (test, (380, 400))):
        docs = np.concatenate([which(split[i]) for i in range(len(split))])
        assert docs.min() >= lo and docs.max() < hi
    assert os.path.isdir(tmp_path / "index-cache")                  # default: next to the data
    t2, v2, te2 = build_gpt_datasets(prefix, 8, 0, "80,15,5", (100, 0, 0))
    assert v2 is None and te2 is None and np.array_equal(t2[7], train[7])
    with pytest.raises(ValueError, match=r"test split of .*a is empty .* 5 test samples"):
        build_gpt_datasets([[1, prefix]], 8, 0, "99,1", (10, 1, 5))


def test_blend_proportions_and_determinism(tmp_path):
    bases = [0, 10**6, 2 * 10**6]
    prefixes = [make_dataset(str(tmp_path / f"d{i}"), 150 + 50 * i, seed=i, base=b) for i, b in enumerate(bases)]
    weights = [0.5, 0.3, 0.2]
    blend = [[w * 10, p] for w, p in zip(weights, prefixes)]          # weights are normalised
    train, valid, _ = build_gpt_datasets(blend, 16, 42, "90,10,0", (10_000, 300, 0))
    assert len(train) == 10_000 and len(valid) == 300
    source = np.array([train[i][0] // 10**6 for i in range(len(train))])
    assert np.array_equal(source, train.dataset_index)
    realised = np.bincount(source, minlength=3) / len(train)
    assert np.all(np.abs(realised - weights) < 0.01), realised
    for prefix_len in (100, 1000, 3333):                               # holds in every prefix, not just overall
        part = np.bincount(source[:prefix_len], minlength=3)
        assert np.all(np.abs(part - np.array(weights) * prefix_len) <= 1.5)
    for d in range(3):                                                 # each component's samples in order, once
        assert train.dataset_sample_index[source == d].tolist() == list(range((source == d).sum()))
    again, _, _ = build_gpt_datasets(blend, 16, 42, "90,10,0", (10_000, 0, 0), cache_dir=str(tmp_path / "other"))
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 10_000, 97))
    # By hand: virtual times (k + 0.5) / w are d0: 1, 3, 5, 7; d1: 1.67, 5, 8.3; d2: 2.5, 7.5; in time
    # order (the tie at 5 to the lower index): d0 d1 d2 d0 d0 d1 d0.
    idx, sample = blending_schedule(weights, 7)
    assert idx.tolist() == [0, 1, 2, 0, 0, 1, 0] and sample.tolist() == [0, 0, 0, 1, 2, 1, 3]


def test_errors_are_clear(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"nope\.idx does not exist"):
        build_gpt_datasets([[1, missing]], 8, 0, "1", (1, 0, 0))
    prefix = make_dataset(str(tmp_path / "a"), 3)
    with pytest.raises(ValueError, match="blend weights must be"):
        build_gpt_datasets([[-1, prefix]], 8, 0, "1", (1, 0, 0))
    with pytest.raises(ValueError, match="blend must be"):
        build_gpt_datasets([prefix, prefix], 8, 0, "1", (1, 0, 0))
    with pytest.raises(ValueError, match="too few for one sample of seq_length \\+ 1 = 10001"):
        build_gpt_datasets([[1, prefix]], 10_000, 0, "1", (1, 0, 0))
    with pytest.raises(ValueError, match="num_samples must be three"):
        build_gpt_datasets([[1, prefix]], 8, 0, "1", (1, 0))
    train, _, _ = build_gpt_datasets([[1, prefix]], 4, 0, "1", (2, 0, 0))
    with pytest.raises(IndexError, match=f"sample {len(train)} is out of range"):
        train[len(train)]
