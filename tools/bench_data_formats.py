#!/usr/bin/env python3
"""The Hugging Face backend and Parquet input halves of tools/bench_data.py (issue 25): preprocessing
throughput against `tokenizers`' own ``encode_batch`` on the same documents, and peak memory against input
size under a 1 GiB address-space (or data-segment) cap.

Each measurement runs in a child process (``python tools/bench_data_formats.py child KIND ...``) so that
RAYON_NUM_THREADS=1 takes effect before `tokenizers` starts its thread pool, and so that the memory cap
(resource.setrlimit) and ru_maxrss cover exactly one run. Throughput is reported per CPU-second (what a
core delivers, whatever else the machine runs) and per wall-second.
"""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 1 << 30
EOD = "<|endoftext|>"


def train_hf_tokenizer(texts, directory, vocab_size):
    """A byte-level BPE tokenizer.json (GPT-2's recipe) trained with `tokenizers` on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


def word_level_tokenizer(directory, words):
    """A word-level tokenizer.json (whitespace split, one id per word) for the memory runs: it tokenises
    tens of MB/s, so a many-GB input is read in minutes; memory does not depend on the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(list(words) + ["[UNK]", EOD])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


def write_texts_parquet(path, texts, row_group_size=1000):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path, row_group_size=row_group_size)
    return path


def write_generated_parquet(path, nbytes, words, seed=0, group_mb=16):
    """A Parquet file of about ``nbytes`` of uncompressed text (compression off, so the file is as large as its
    text), streamed one row group at a time: a pool of generated documents, rotated per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    vocab = np.array(words)
    pool, size = [], 0
    while size < group_mb * 1e6:
        text = " ".join(vocab[rng.integers(0, len(vocab), int(rng.integers(100, 1500)))])
        pool.append(text)
        size += len(text)
    table = pa.table({"text": pa.array(pool, pa.string())})
    written, group = 0, 0
    with pq.ParquetWriter(path, table.schema, compression="none") as writer:
        while written < nbytes:
            k = group * 7919 % len(pool)
            writer.write_table(pa.concat_tables([table.slice(k), table.slice(0, k)]), row_group_size=len(pool))
            written += size
            group += 1
    return os.path.getsize(path)


def _cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child_reference(parquet, tok_dir, repeat):
    """`tokenizers`' own encode_batch / encode_batch_fast on the Parquet file's texts, 256 per call."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer
    texts = pq.read_table(parquet, columns=["text"]).column("text").to_pylist()
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        best = None
        for _ in range(repeat):
            # A fresh tokenizer each run (untimed), as each preprocess run loads one: the BPE word cache
            # starts cold in both.
            encode = getattr(Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")), name)
            cpu, wall, tokens = _cpu(), time.perf_counter(), 0
            for i in range(0, len(texts), 256):
                tokens += sum(len(e.ids) for e in encode(texts[i:i + 256], add_special_tokens=False))
            run = {"cpu": _cpu() - cpu, "wall": time.perf_counter() - wall, "mb": mb, "tokens": tokens}
            best = run if best is None or run["cpu"] < best["cpu"] else best
        out[name] = best
    return out


def child_preprocess(parquet, tok_dir, workers, repeat, work):
    """Our preprocessing of the Parquet file (bos/eod as the tokenizer says, --append-eod), best of ``repeat``."""
    from megagopher.data.preprocess import preprocess
    best = None
    for _ in range(repeat):
        cpu = _cpu()
        stats = preprocess(parquet, tok_dir, os.path.join(work, f"ours-w{workers}"), workers=workers,
                           append_eod=True, log_interval=0)
        run = {"cpu": _cpu() - cpu, "wall": stats["seconds"], "mb": stats["text_bytes"] / 1e6,
               "tokens": stats["tokens"], "documents": stats["documents"]}
        best = run if best is None or run["cpu"] < best["cpu"] else best
    return best


def child_memory(parquet, tok_dir, workers, work):
    from megagopher.data.preprocess import preprocess
    stats = preprocess(parquet, tok_dir, os.path.join(work, "memory"), workers=workers, append_eod=True,
                       log_interval=0)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"maxrss_mib": own.ru_maxrss / 1024, "worker_maxrss_mib": kids.ru_maxrss / 1024,
            "seconds": stats["seconds"], "mb": stats["text_bytes"] / 1e6, "documents": stats["documents"]}


def run_child(args, env=None, limit=None):
    """Run ``child ARGS`` in a fresh interpreter; ``limit`` = (resource name, bytes) caps it from the start."""
    def cap():
        kind = getattr(resource, limit[0])
        resource.setrlimit(kind, (limit[1], limit[1]))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "child", *map(str, args)], capture_output=True,
                       text=True, env=dict(os.environ, **(env or {})), preexec_fn=cap if limit else None)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["exit status %d" % r.returncode])[-1]
    return json.loads(r.stdout.strip().splitlines()[-1]), None


def bench_hf(work, texts, vocab_size, workers_list, repeat):
    """Rows (label, MB/CPU-s, MB/s wall, tokens, ratio note) comparing us with tokenizers, one thread each."""
    tok_dir = train_hf_tokenizer(texts, os.path.join(work, "hf-tokenizer"), vocab_size)
    parquet = write_texts_parquet(os.path.join(work, "hf.parquet"), texts)
    one_thread = {"RAYON_NUM_THREADS": "1"}
    ref, error = run_child(["reference", parquet, tok_dir, repeat], one_thread)
    if error:
        raise RuntimeError(f"reference run failed: {error}")
    rows = [(f"tokenizers {name}, 1 thread", r) for name, r in ref.items()]
    for workers in workers_list:
        ours, error = run_child(["preprocess", parquet, tok_dir, workers, repeat, work], one_thread)
        if error:
            raise RuntimeError(f"preprocess run ({workers} workers) failed: {error}")
        rows.append((f"preprocess_data, Parquet, {workers} worker(s)", ours))
    return rows


def bench_memory(work, small_mb, large_gib, workers, cap_gib=1.0):
    """Peak RSS of preprocessing a small and a large generated Parquet file under a cap; the limit kind
    (RLIMIT_AS, else RLIMIT_DATA) is the first this process can run under."""
    words = [f"{i:x}".rjust(9, "w") for i in range(20000)]
    tok_dir = word_level_tokenizer(os.path.join(work, "word-tokenizer"), words)
    sizes = [("small", small_mb * 1e6), ("large", large_gib * GIB)]
    rows, chosen = [], None
    for name, nbytes in sizes:
        path = os.path.join(work, f"{name}.parquet")
        start = time.perf_counter()
        file_bytes = write_generated_parquet(path, nbytes, words)
        print(f"memory: wrote {path} ({file_bytes / GIB:.2f} GiB) in {time.perf_counter() - start:.0f} s", flush=True)
        for kind in ([chosen] if chosen else ["RLIMIT_AS", "RLIMIT_DATA"]):
            result, error = run_child(["memory", path, tok_dir, workers, work], limit=(kind, int(cap_gib * GIB)))
            if result is None:
                print(f"memory: {name} under {kind} = {cap_gib} GiB failed: {error}", flush=True)
                continue
            chosen = kind
            rows.append((name, file_bytes, kind, result))
            break
        os.remove(path)
    return rows


def markdown_table(hf_rows, memory_rows, cap_gib=1.0):
    """The README's table: throughput rows (ratio to tokenizers' encode_batch_fast and encode_batch, per
    CPU-second) and memory rows."""
    lines = ["| run | MB of text | MB/s per CPU-second | MB/s wall | tokens | vs encode_batch_fast | "
             "vs encode_batch |", "|---|---|---|---|---|---|---|"]
    ref = {label: r["mb"] / r["cpu"] for label, r in hf_rows if label.startswith("tokenizers")}
    fast, plain = ref.get("tokenizers encode_batch_fast, 1 thread"), ref.get("tokenizers encode_batch, 1 thread")
    for label, r in hf_rows:
        rate = r["mb"] / r["cpu"]   # per CPU-second: per core, whatever the worker count
        lines.append(f"| {label} | {r['mb']:.1f} | {rate:.2f} | {r['mb'] / r['wall']:.2f} | {r['tokens']} | "
                     f"{rate / fast:.2f} | {rate / plain:.2f} |")
    if memory_rows:
        lines += ["", f"| input (generated Parquet, uncompressed) | cap ({cap_gib:g} GiB) | peak RSS, main process | "
                      "peak RSS, largest worker | MB of text | seconds |", "|---|---|---|---|---|---|"]
        for name, file_bytes, kind, r in memory_rows:
            lines.append(f"| {name}: {file_bytes / GIB:.2f} GiB | {kind} | {r['maxrss_mib']:.0f} MiB | "
                         f"{r['worker_maxrss_mib']:.0f} MiB | {r['mb']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def child_main(argv):
    kind, args = argv[0], argv[1:]
    if kind == "reference":
        result = child_reference(args[0], args[1], int(args[2]))
    elif kind == "preprocess":
        result = child_preprocess(args[0], args[1], int(args[2]), int(args[3]), args[4])
    elif kind == "memory":
        result = child_memory(args[0], args[1], int(args[2]), args[3])
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        raise SystemExit("run tools/bench_data.py; this module holds its Hugging Face and Parquet measurements")
    child_main(sys.argv[2:])
