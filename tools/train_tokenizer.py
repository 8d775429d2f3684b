#!/usr/bin/env python3
"""Train a tokenizer on a JSONL corpus: our GPT-2-style byte-level BPE (vocab.json + merges.txt, the default)
or a SentencePiece model (tokenizer.model, as Gopher: unigram or BPE, byte fallback).

    python tools/train_tokenizer.py --input DOCS.jsonl [--json-key text] --vocab-size N --output-dir DIR
    python tools/train_tokenizer.py --kind sentencepiece [--model-type unigram|bpe] --input DOCS.jsonl \
        --vocab-size 32000 --output-dir DIR

--kind bpe: the vocabulary is the 256 byte tokens, then one token per learnt merge, then <|endoftext|> (and any
--special-tokens), N in all, or fewer if the corpus runs out of pairs seen --min-frequency times.
Counting pre-tokens can use several processes (--workers); merge learning is incremental (see
megagopher/data/bpe_trainer.py), so tens of MB take minutes on one core.

--kind sentencepiece: the sentencepiece library's trainer reads the documents' lines from an iterator and
writes DIR/tokenizer.model (megagopher/data/sp_trainer.py: byte fallback, no normalisation, ids 0/1/2 =
<unk> <s> </s>, --special-tokens as control symbols after them); load_tokenizer reads it as "sentencepiece".
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
from megagopher.data.sp_trainer import MODEL_TYPES, document_sentences, train_sentencepiece, write_model  # noqa: E402
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


def _documents(path, key, bad):
    """The texts of a JSONL file; malformed lines are recorded in ``bad`` and skipped."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield parse_document(line, key)
                except ValueError as e:
                    bad.append(f"line {line_no}: {e}")


def _report_bad(path, bad):
    for message in bad[:20]:
        print(f"{path}: {message} (skipped)", file=sys.stderr)


def _train_sentencepiece(args, p, start):
    bad = []
    sentences = document_sentences(_documents(args.input, args.json_key, bad), args.max_sentence_length)
    try:
        model = train_sentencepiece(sentences, args.vocab_size, args.model_type, args.special_tokens,
                                    args.workers, args.character_coverage, args.max_sentence_length)
    except ValueError as e:
        p.error(f"{args.input}: {e}")
    _report_bad(args.input, bad)
    path = write_model(args.output_dir, model)
    print(f"wrote {path}: {args.model_type} SentencePiece model, {args.vocab_size} tokens with byte fallback, "
          f"{len(bad)} malformed line(s) skipped, {time.perf_counter() - start:.1f} s")
    return 0


def _train_bpe(args, p, start):
    counts, bad = Counter(), []
    batches = _line_batches(args.input, args.json_key)
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
    results = ordered_map(pool, _count_batch, batches, 4 * args.workers) if pool else map(_count_batch, batches)
    for c, b in results:
        counts.update(c)
        bad.extend(b)
    if pool:
        pool.close()
    _report_bad(args.input, bad)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe",
                   help="bpe: GPT-2 byte-level BPE (vocab.json + merges.txt); sentencepiece: tokenizer.model")
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-key", default="text")
    p.add_argument("--vocab-size", type=int, required=True, help="total ids, special tokens included")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--min-frequency", type=int, default=2, help="bpe: stop when the best pair is rarer than this")
    p.add_argument("--special-tokens", nargs="*", default=[],
                   help=f"extra special tokens (bpe: after {EOD_TOKEN}; sentencepiece: after <unk> <s> </s>)")
    p.add_argument("--workers", type=int, default=1, help="processes counting pre-tokens (bpe) or threads "
                   "training (sentencepiece)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default=None,
                   help="sentencepiece: the segmentation model (default unigram, as Gopher)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="sentencepiece: share of characters given their own piece; the rest fall back to bytes")
    p.add_argument("--max-sentence-length", type=int, default=16384,
                   help="sentencepiece: longest line in bytes it learns from (longer lines are cut)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} does not exist")
    if args.kind == "bpe" and args.model_type:
        p.error("--model-type applies to --kind sentencepiece (--kind bpe is our GPT-2 byte-level BPE)")
    start = time.perf_counter()
    if args.kind == "sentencepiece":
        args.model_type = args.model_type or "unigram"
        return _train_sentencepiece(args, p, start)
    return _train_bpe(args, p, start)


if __name__ == "__main__":
    sys.exit(main())
