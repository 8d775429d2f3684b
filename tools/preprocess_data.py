#!/usr/bin/env python3
"""Tokenise a JSONL corpus into Megatron's indexed format (PREFIX_text_document.bin / .idx).

    python tools/preprocess_data.py --input DOCS.jsonl [--json-key text] --tokenizer-dir DIR \
        --output-prefix PREFIX [--workers N] [--append-eod] [--strict]

Tokens are stored as uint16 when the vocabulary fits (<= 65536 ids), int32 otherwise. A malformed line
(bad JSON, missing or non-string field) is reported with its line number and skipped, or stops the run
with --strict. Output is written under temporary names and renamed at the end.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher.data.preprocess import preprocess, progress_line  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--tokenizer-dir", required=True, help="directory with vocab.json and merges.txt")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<json-key>_document.bin/.idx")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.add_argument("--append-eod", action="store_true", help="end every document with <|endoftext|>")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line instead of skipping it")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} does not exist")
    try:
        stats = preprocess(args.input, args.tokenizer_dir, args.output_prefix, args.json_key, args.workers,
                           args.append_eod, args.strict, args.log_interval)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(progress_line(stats, stats["seconds"], args.workers), file=sys.stderr)
    print(f"wrote {stats['prefix']}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens; "
          f"skipped {stats['skipped']} malformed line(s), {stats['empty']} empty document(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
