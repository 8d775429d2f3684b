#!/usr/bin/env python3
"""Train a GPT-2-style byte-level BPE tokenizer on a JSONL corpus; write vocab.json + merges.txt.

    python tools/train_tokenizer.py --input DOCS.jsonl [--json-key text] --vocab-size N --output-dir DIR

The vocabulary is the 256 byte tokens, then one token per learnt merge, then <|endoftext|> (and any
--special-tokens), N in all, or fewer if the corpus runs out of pairs seen --min-frequency times.
Counting pre-tokens can use several processes (--workers); merge learning is incremental (see
megagopher/data/bpe_trainer.py), so tens of MB take minutes on one core.
"""
import argparse
import multiprocessing
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files  # noqa: E402
from megagopher.data.preprocess import ordered_map, parse_document  # noqa: E402
from megagopher.data.tokenizer import EOD_TOKEN  # noqa: E402


def _count_batch(args):
    lines, key = args
    texts, bad = [], []
    for line_no, line in lines:
        try:
            texts.append(parse_document(line, key))
        except ValueError as e:
            bad.append(f"line {line_no}: {e}")
    return count_words(texts), bad


def _line_batches(path, key, size=2000):
    with open(path, "rb") as f:
        batch = []
        for line_no, line in enumerate(f, 1):
            if line.strip():
                batch.append((line_no, line))
            if len(batch) == size:
                yield batch, key
                batch = []
        if batch:
            yield batch, key


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-key", default="text")
    p.add_argument("--vocab-size", type=int, required=True, help="total ids, special tokens included")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--min-frequency", type=int, default=2, help="stop when the best pair is rarer than this")
    p.add_argument("--special-tokens", nargs="*", default=[], help=f"extra special tokens after {EOD_TOKEN}")
    p.add_argument("--workers", type=int, default=1, help="processes counting pre-tokens")
    args = p.parse_args(argv)
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} does not exist")

    start = time.perf_counter()
    counts, bad = Counter(), []
    batches = _line_batches(args.input, args.json_key)
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
    results = ordered_map(pool, _count_batch, batches, 4 * args.workers) if pool else map(_count_batch, batches)
    for c, b in results:
        counts.update(c)
        bad.extend(b)
    if pool:
        pool.close()
    for message in bad[:20]:
        print(f"{args.input}: {message} (skipped)", file=sys.stderr)
    print(f"counted {len(counts)} unique pre-tokens ({sum(counts.values())} in all) in "
          f"{time.perf_counter() - start:.1f} s; {len(bad)} malformed line(s) skipped", file=sys.stderr)

    def progress(i, pair, count):
        if i % 1000 == 0:
            print(f"merge {i}: {pair[0]!r} + {pair[1]!r} ({count} times), "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

    try:
        vocab, merges = train_bpe(counts, args.vocab_size, [EOD_TOKEN] + args.special_tokens,
                                  args.min_frequency, progress)
    except ValueError as e:
        p.error(str(e))
    write_tokenizer_files(args.output_dir, vocab, merges)
    note = "" if len(vocab) == args.vocab_size else \
        f" (fewer than the {args.vocab_size} asked: no pair left seen {args.min_frequency}+ times)"
    print(f"wrote {args.output_dir}/vocab.json and merges.txt: {len(vocab)} tokens, {len(merges)} merges{note}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
