"""Batches for the training loop: which samples make up global batch k, and the synthetic source.

Invariant 2: global batch k is samples [consumed, consumed + global_batch_size) of a dataset that is
already a deterministic function of the seed (shuffled by the dataset itself); each data-parallel rank
takes a fixed contiguous slice of it, and micro-batches split that slice. Nothing depends on dp except
which slice a rank reads, so every layout sees the same global batches.

The synthetic source is a learnable, deterministic token stream: a random successor table (a bigram
"grammar") fixed by the seed, followed with probability 0.85 and replaced by a uniform token otherwise.
A model that learns the table reaches a loss near 0.15 * ln(V) + H(0.85) from ln(V) at the start.
"""
import concurrent.futures
import os
from typing import NamedTuple

import numpy as np
import torch

from megagopher import parallel_state as ps
from megagopher.config import ConfigError
from megagopher.data.document_mask import document_mask
from megagopher.context_parallel import split_for_cp_rank
from megagopher.model.mtp import mtp_batch

IGNORE_INDEX = -100  # labels that carry no loss (the cross entropy's ignore_index)


class SyntheticDataset:
    """Sample i: seq_length + 1 tokens of the seeded bigram chain, a pure function of (seed, i)."""

    def __init__(self, vocab_size, seq_length, seed, follow_prob=0.85):
        self.vocab_size, self.seq_length, self.seed, self.follow_prob = vocab_size, seq_length, seed, follow_prob
        self.successor = np.random.default_rng([seed, 0xC0FFEE]).permutation(vocab_size)

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, int(i)])
        n = self.seq_length + 1
        noise = rng.integers(0, self.vocab_size, n)
        follow = rng.random(n) < self.follow_prob
        out = np.empty(n, dtype=np.int64)
        out[0] = noise[0]
        for t in range(1, n):
            out[t] = self.successor[out[t - 1]] if follow[t] else noise[t]
        return out


def global_batch_indices(consumed_samples, global_batch_size, dp_rank, dp_size):
    """The sample indices of this DP rank's slice of the global batch starting at ``consumed_samples``."""
    per_rank = global_batch_size // dp_size
    start = consumed_samples + dp_rank * per_rank
    return range(start, start + per_rank)


class DocumentMasking(NamedTuple):
    """Megatron's document-masking flags (data.reset_position_ids, ...) and the end-of-document id."""
    eod: int
    reset_position_ids: bool
    reset_attention_mask: bool
    eod_mask_loss: bool

    @classmethod
    def from_config(cls, data_cfg, eod):
        """None when no flag is set: the batches then carry tokens and labels only."""
        flags = (data_cfg.reset_position_ids, data_cfg.reset_attention_mask, data_cfg.eod_mask_loss)
        return cls(eod, *flags) if any(flags) else None


def microbatches(dataset, indices, micro_batch_size, device, masking=None, mtp_depth=0):
    """Splits this rank's slice into micro-batches: dicts of tokens and labels [mbs, s] on ``device``, and
    the document-masking and multi-token prediction inputs of ``_split``."""
    samples = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in indices])
    return _split(torch.from_numpy(samples), micro_batch_size, device, masking, mtp_depth)


class Prefetcher:
    """Micro-batches of one dataset, the next step's prepared on a background thread while this step
    computes: reading and collating samples leaves the critical path. On CUDA the collated batch sits in
    pinned memory and goes over with one non-blocking copy. The batches are exactly ``microbatches``'s."""

    def __init__(self, dataset, micro_batch_size, device, masking=None, mtp_depth=0):
        self.dataset, self.micro_batch_size, self.device, self.masking = dataset, micro_batch_size, device, masking
        self.mtp_depth = mtp_depth
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="megagopher-data")
        self._next = None  # (range of indices, future of the collated host tensor)

    def get(self, indices, next_indices=None):
        """This step's micro-batches (``indices``); starts preparing ``next_indices``'s."""
        if self._next is not None and self._next[0] == indices:
            data = self._next[1].result()  # re-raises a data error in the training thread
        else:
            data = self._collate(indices)
        self._next = (next_indices, self._pool.submit(self._collate, next_indices)) if next_indices else None
        return _split(data, self.micro_batch_size, self.device, self.masking, self.mtp_depth)

    def _collate(self, indices):
        data = torch.from_numpy(np.stack([np.asarray(self.dataset[i], dtype=np.int64) for i in indices]))
        return data.pin_memory() if self.device.type == "cuda" else data

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def _split(data, micro_batch_size, device, masking=None, mtp_depth=0):
    """Micro-batches: dicts of ``tokens`` and ``labels``, and with document masking (``masking``, a
    DocumentMasking) ``position_ids``, ``cu_seqlens`` (the micro-batch's rows end to end, full length) and
    ``loss_tokens`` (how many labels carry loss); labels without loss are IGNORE_INDEX. With multi-token
    prediction (``mtp_depth`` modules) ``mtp_tokens``, ``mtp_labels`` and ``mtp_loss_tokens`` (model/mtp.py
    mtp_batch), shifted on the whole sequences, within documents. Under context
    parallelism each CP rank keeps its two chunks of every sequence. The masks are found on the host copy,
    which is already there, so the device is never synchronised for them."""
    cp, cp_rank = ps.get_cp_size(), ps.get_cp_rank()
    out = []
    for start in range(0, data.shape[0], micro_batch_size):
        host = data[start:start + micro_batch_size]
        chunk = host.to(device, non_blocking=True)  # whole rows of a pinned batch: one contiguous copy
        tokens, labels = chunk[:, :-1], chunk[:, 1:]
        extra = document_mask(host[:, :-1], *masking) if masking is not None else {}
        loss_mask = extra.pop("loss_mask", None)
        if loss_mask is not None:
            labels = labels.masked_fill(loss_mask.to(device, non_blocking=True) == 0, IGNORE_INDEX)
            extra["loss_tokens"] = int(loss_mask.sum())
        if mtp_depth:  # shifted before the CP split: a shift crosses the CP chunks
            masked = host[:, 1:] if loss_mask is None else host[:, 1:].masked_fill(loss_mask == 0, IGNORE_INDEX)
            extra.update(mtp_batch(host, masked, mtp_depth, extra.get("cu_seqlens"), cp, cp_rank, IGNORE_INDEX))
        if "position_ids" in extra:
            extra["position_ids"] = split_for_cp_rank(extra["position_ids"], cp, cp_rank)
        mb = {"tokens": split_for_cp_rank(tokens, cp, cp_rank).contiguous(),
              "labels": split_for_cp_rank(labels, cp, cp_rank).contiguous()}
        mb.update({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in extra.items()})
        out.append(mb)
    return out


def vocab_size_of(cfg):
    """The model's vocabulary: the tokenizer's (data.tokenizer_dir, of data.tokenizer_kind) when the data has
    one, else model.vocab_size. A tokenizer file that is missing or damaged raises TokenizerError naming it
    (an InputError: one line, exit 2)."""
    d = cfg.data
    if d.source == "indexed" and d.tokenizer_dir:
        # Read from files the config names, so checked here (still before any collective), not in validate.
        if not os.path.isdir(d.tokenizer_dir):
            raise ConfigError(f"data.tokenizer_dir = {d.tokenizer_dir!r} is not a directory (it must hold a "
                              "tokenizer: vocab.json + merges.txt, tokenizer.json or tokenizer.model)")
        from megagopher.data.tokenizer import load_tokenizer
        return load_tokenizer(d.tokenizer_dir, d.tokenizer_kind).vocab_size
    return cfg.model.vocab_size


def eod_id_of(cfg):
    """The end-of-document id document masking uses: data.eod_id, else the tokenizer's; None when no
    stage masks documents (validate made sure one of the two is there when one does)."""
    sections = [cfg.data] + [cfg.stage(i).data for i in range(len(cfg.stages))]
    masking = [d for d in sections if d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss]
    if not masking:
        return None
    if masking[0].eod_id >= 0:
        return masking[0].eod_id
    from megagopher.data.tokenizer import load_tokenizer
    eod = load_tokenizer(masking[0].tokenizer_dir, masking[0].tokenizer_kind).eod
    if eod is None:
        raise ConfigError(f"the tokenizer in data.tokenizer_dir = {masking[0].tokenizer_dir!r} has no end-of-document "
                          "token, which document masking needs: set data.eod_id")
    return eod


def build_datasets(scfg, vocab_size, train_iters):
    """(train, valid) datasets for a stage (``scfg``: JobConfig.stage(i)); valid is None when the stage does
    not evaluate."""
    t, d, seq = scfg.training, scfg.data, scfg.model.seq_length
    evaluates = t.eval_interval > 0
    if d.source == "synthetic":
        train = SyntheticDataset(vocab_size, seq, t.seed)
        valid = SyntheticDataset(vocab_size, seq, t.seed + 1) if evaluates else None
        return train, valid
    from megagopher.data import build_gpt_datasets
    n_train = train_iters * t.global_batch_size
    n_valid = t.eval_iters * t.global_batch_size if evaluates else 0
    # vocab_size: every token id is checked against the model's vocabulary when the files are opened,
    # identically on every rank (data/token_check.py says why not per batch).
    train, valid, _ = build_gpt_datasets(d.blend, seq, t.seed, d.split, (n_train, n_valid, 0),
                                         cache_dir=d.cache_dir or None, vocab_size=vocab_size)
    if d.valid_blend and evaluates:
        valid, _, _ = build_gpt_datasets(d.valid_blend, seq, t.seed, "1,0,0", (n_valid, 0, 0),
                                         cache_dir=d.cache_dir or None, vocab_size=vocab_size)
    return train, valid
