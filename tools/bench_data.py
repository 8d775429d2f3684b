#!/usr/bin/env python3
"""Benchmark the data pipeline: tokenizer training, preprocessing throughput (MB/s per worker), GPT index
building for a million documents, and (tools/bench_data_formats.py) the Hugging Face backend against
`tokenizers`' own encode_batch and peak memory against Parquet input size under a 1 GiB cap.

    python tools/bench_data.py [--corpus-mb 20] [--vocab-size 32000] [--workers 1,2] [--documents 1000000]
        [--hf-mb 5] [--repeat 2] [--memory-small-mb 64] [--large-gib 1] [--memory-workers 1]
        [--skip-preprocess] [--skip-hf] [--skip-memory] [--skip-index]

Hugging Face throughput: a byte-level BPE tokenizer.json is trained with `tokenizers` on --hf-mb of the
corpus, which is written to Parquet; `tokenizers`' encode_batch and encode_batch_fast (256 documents a call,
RAYON_NUM_THREADS=1) are timed against tools/preprocess_data.py's engine on that Parquet file with 1 worker
(RAYON_NUM_THREADS=1: one thread) and more, each in a child process. Memory: a generated Parquet file of
--memory-small-mb MB and one of --large-gib GiB (uncompressed, written a row group at a time) are each
preprocessed in a child process under a 1 GiB RLIMIT_AS (RLIMIT_DATA where the process cannot start under
RLIMIT_AS) and their peak RSS printed. A markdown table for the README ends the output.

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files  # noqa: E402
from megagopher.data.gpt_dataset import GPTDataset  # noqa: E402
from megagopher.data.indexed_dataset import IndexedDataset, write_index  # noqa: E402
from megagopher.data.math_problems import generate_problems  # noqa: E402
from megagopher.data.preprocess import preprocess  # noqa: E402
from megagopher.data.stdlib_corpus import build_stdlib_corpora  # noqa: E402
from bench_data_formats import bench_hf, bench_memory, markdown_table  # noqa: E402


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


def bench_gpt2_preprocess(work, texts, corpus, vocab_size, workers_list):
    """Our GPT-2 BPE trained on the corpus, then the JSONL corpus preprocessed with each worker count."""
    mb = os.path.getsize(corpus) / 1e6
    start = time.perf_counter()
    vocab, merges = train_bpe(count_words(texts), vocab_size)
    tok_dir = os.path.join(work, "tokenizer")
    write_tokenizer_files(tok_dir, vocab, merges)
    print(f"train_tokenizer: vocab {len(vocab)} on {mb:.1f} MB in {time.perf_counter() - start:.1f} s (one core)")
    for workers in workers_list:
        cpu = cpu_seconds()
        stats = preprocess(corpus, tok_dir, os.path.join(work, f"w{workers}"), workers=workers, append_eod=True,
                           log_interval=0)
        cpu = cpu_seconds() - cpu
        mb, wall = stats["text_bytes"] / 1e6, stats["seconds"]
        # MB per CPU-second does not depend on what else the machine runs; wall-clock rates do.
        print(f"preprocess: {workers} worker(s): {stats['documents']} documents, {stats['tokens']} "
              f"tokens in {wall:.1f} s = {mb / wall:.2f} MB/s of text, {mb / wall / workers:.2f} MB/s per worker, "
              f"{stats['documents'] / wall:.0f} docs/s; {mb / cpu:.2f} MB per CPU-second "
              f"(all processes: {cpu:.1f} CPU-s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=20.0)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    p.add_argument("--documents", type=int, default=1_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--skip-preprocess", action="store_true")
    p.add_argument("--hf-mb", type=float, default=5.0, help="MB of the corpus for the Hugging Face runs")
    p.add_argument("--repeat", type=int, default=2, help="runs per throughput figure (the best is kept)")
    p.add_argument("--memory-small-mb", type=float, default=64.0)
    p.add_argument("--large-gib", type=float, default=1.0, help="size of the large memory-run Parquet file")
    p.add_argument("--memory-workers", type=int, default=1)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    args = p.parse_args(argv)
    workers_list = [int(w) for w in args.workers.split(",")]
    print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}; numpy {np.__version__}; "
          f"python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        hf_rows, memory_rows = [], []
        if not (args.skip_preprocess and args.skip_hf):
            corpus = os.path.join(work, "corpus.jsonl")
            start = time.perf_counter()
            texts = make_corpus(corpus, args.hf_mb if args.skip_preprocess else max(args.corpus_mb, args.hf_mb))
            mb = os.path.getsize(corpus) / 1e6
            print(f"corpus: {len(texts)} documents, {mb:.1f} MB of JSONL in {time.perf_counter() - start:.1f} s")
        if not args.skip_preprocess:
            bench_gpt2_preprocess(work, texts, corpus, args.vocab_size, workers_list)
        if not args.skip_hf:
            hf_rows = bench_hf(work, hf_texts(texts, args.hf_mb), args.vocab_size, workers_list, args.repeat)
            for label, r in hf_rows:
                print(f"hf: {label}: {r['mb']:.1f} MB, {r['tokens']} tokens in {r['wall']:.1f} s wall, "
                      f"{r['cpu']:.1f} CPU-s = {r['mb'] / r['cpu']:.2f} MB per CPU-second", flush=True)
        if not args.skip_memory:
            memory_rows = bench_memory(work, args.memory_small_mb, args.large_gib, args.memory_workers)
            for name, file_bytes, kind, r in memory_rows:
                print(f"memory: {name} ({file_bytes / 2**30:.2f} GiB) under {kind} = 1 GiB: peak RSS "
                      f"{r['maxrss_mib']:.0f} MiB (largest worker {r['worker_maxrss_mib']:.0f} MiB), "
                      f"{r['documents']} documents in {r['seconds']:.0f} s", flush=True)
        if not args.skip_index:
            bench_index(work, args.documents, args.seq_length, args.epochs)
        if hf_rows or memory_rows:
            print(markdown_table(hf_rows, memory_rows))
    return 0


def hf_texts(texts, megabytes):
    """The first documents of the corpus up to ``megabytes`` (UTF-8)."""
    out, size = [], 0
    for text in texts:
        if size >= megabytes * 1e6:
            break
        out.append(text)
        size += len(text.encode("utf-8"))
    return out


if __name__ == "__main__":
    sys.exit(main())
