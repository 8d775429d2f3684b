#!/usr/bin/env python3
"""Benchmark the data pipeline: tokenizer training, preprocessing throughput (MB/s per worker) and
GPT index building for a million documents.

    python tools/bench_data.py [--corpus-mb 20] [--vocab-size 32000] [--workers 1,2] [--documents 1000000]

The corpus is built offline from the standard library and the math generator (tools/make_corpora.py's
sources). The index benchmark writes a 1M-document index whose .bin is a sparse file (only the lengths
matter to index building), so it needs no disk space or tokenising time. Prints one line per result.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files  # noqa: E402
from megagopher.data.gpt_dataset import GPTDataset  # noqa: E402
from megagopher.data.indexed_dataset import IndexedDataset, write_index  # noqa: E402
from megagopher.data.math_problems import generate_problems  # noqa: E402
from megagopher.data.preprocess import preprocess  # noqa: E402
from megagopher.data.stdlib_corpus import build_stdlib_corpora  # noqa: E402


def cpu_seconds():
    """CPU time of this process plus its finished children (the preprocessing workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_corpus(path, megabytes):
    cap = int(megabytes * 1e6)
    general, code = build_stdlib_corpora(cap // 3, cap // 2, seed=0, include_tests=True)
    size = sum(len(r["text"]) for r in general + code)
    math = generate_problems(max(0, (cap - size) // 420), seed=0)
    rows = [r["text"] for r in general + code + math]
    with open(path, "w", encoding="utf-8") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")
    return rows


def bench_index(work, documents, seq_length, epochs):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 1.0, documents), 1, 60000).astype(np.int32)   # median ~400 tokens
    prefix = os.path.join(work, "million")
    write_index(prefix + ".idx", np.uint16, lengths, np.arange(documents + 1))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)   # sparse: index building never reads tokens
    ds = IndexedDataset(prefix)
    tokens = int(lengths.sum(dtype=np.int64))
    samples = epochs * ((tokens - 1) // seq_length)
    start = time.perf_counter()
    built = GPTDataset(ds, 0, documents, seq_length, 1234, samples, "train", cache_dir=None)
    build_s = time.perf_counter() - start
    cache = os.path.join(work, "cache")
    start = time.perf_counter()
    GPTDataset(ds, 0, documents, seq_length, 1234, samples, "train", cache_dir=cache)
    build_save_s = time.perf_counter() - start
    start = time.perf_counter()
    GPTDataset(ds, 0, documents, seq_length, 1234, samples, "train", cache_dir=cache)
    load_s = time.perf_counter() - start
    print(f"index build: {documents} documents, {tokens / 1e6:.0f}M tokens, seq_length {seq_length}, "
          f"{epochs} epoch(s) = {len(built)} samples: {build_s:.2f} s to build, {build_save_s:.2f} s to build "
          f"and cache, {load_s:.3f} s to load from cache")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=20.0)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    p.add_argument("--documents", type=int, default=1_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--skip-preprocess", action="store_true")
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}; numpy {np.__version__}; "
          f"python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        if not args.skip_preprocess:
            corpus = os.path.join(work, "corpus.jsonl")
            start = time.perf_counter()
            texts = make_corpus(corpus, args.corpus_mb)
            mb = os.path.getsize(corpus) / 1e6
            print(f"corpus: {len(texts)} documents, {mb:.1f} MB of JSONL in {time.perf_counter() - start:.1f} s")
            start = time.perf_counter()
            vocab, merges = train_bpe(count_words(texts), args.vocab_size)
            tok_dir = os.path.join(work, "tokenizer")
            write_tokenizer_files(tok_dir, vocab, merges)
            print(f"train_tokenizer: vocab {len(vocab)} on {mb:.1f} MB in {time.perf_counter() - start:.1f} s "
                  f"(one core)")
            for workers in [int(w) for w in args.workers.split(",")]:
                cpu = cpu_seconds()
                stats = preprocess(corpus, tok_dir, os.path.join(work, f"w{workers}"), workers=workers,
                                   append_eod=True, log_interval=0)
                cpu = cpu_seconds() - cpu
                mb, wall = stats["bytes"] / 1e6, stats["seconds"]
                # MB per CPU-second does not depend on what else the machine runs; wall-clock rates do.
                print(f"preprocess: {workers} worker(s): {stats['documents']} documents, {stats['tokens']} "
                      f"tokens in {wall:.1f} s = {mb / wall:.2f} MB/s, {mb / wall / workers:.2f} MB/s per worker, "
                      f"{stats['documents'] / wall:.0f} docs/s; {mb / cpu:.2f} MB per CPU-second "
                      f"(all processes: {cpu:.1f} CPU-s)")
        bench_index(work, args.documents, args.seq_length, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
