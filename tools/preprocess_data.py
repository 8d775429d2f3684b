#!/usr/bin/env python3
"""Tokenise a corpus into Megatron's indexed format (PREFIX_text_document.bin / .idx).

    python tools/preprocess_data.py --input DOCS.jsonl|DOCS.parquet|DIR|'GLOB' [--input ...] \
        [--text-key text [--text-key ...]] --tokenizer-dir DIR [--tokenizer-kind KIND] \
        --output-prefix PREFIX [--output-per-input] [--workers N] [--append-eod] [--strict]

--input takes a file, a directory or a glob (quote it), several times: JSONL (.jsonl/.json, .jsonl.gz,
.jsonl.zst; one JSON object per line), Parquet (.parquet, read one row group at a time), a directory of
such files, or a Hugging Face datasets directory written by save_to_disk. All inputs go into one dataset,
in the order given (a glob or a directory in sorted name order), or one dataset each with
--output-per-input (PREFIX_<input name>_<key>_document). Several --text-key values are joined by a blank
line ("\\n\\n"), e.g. --text-key title --text-key text, into PREFIX_title_text_document (--json-key is the
old name of --text-key). --tokenizer-dir holds GPT-2 vocab.json + merges.txt, a tokenizer.json, or a
SentencePiece or tiktoken tokenizer.model (told apart by content; --tokenizer-kind picks one). Each document
is [bos if the tokenizer adds one] + its tokens + [eod with --append-eod]; texts with no tokens are skipped
and counted. Tokens are stored as uint16 when the vocabulary fits (<= 65536 ids), int32 otherwise.

A malformed document (bad JSON, missing key, null or non-string value) is reported with its line (JSONL,
from 1) or row (Parquet/Arrow, from 0) and skipped, or stops the run with --strict. A file that cannot be
read, an unknown format, a missing column, text that is not valid UTF-8 and an input with no documents stop
the run with one line "error: ..." and exit status 2. Output is written under temporary names and renamed
when complete, so a failed run leaves nothing half-written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher.data.preprocess import preprocess, progress_line  # noqa: E402
from megagopher.data.tokenizer import TOKENIZER_KINDS  # noqa: E402
from megagopher.errors import EXIT_INPUT_ERROR  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, action="append",
                   help="file, directory or glob (JSONL, .jsonl.gz, .jsonl.zst, Parquet, save_to_disk); repeatable")
    p.add_argument("--text-key", "--json-key", dest="text_key", action="append",
                   help="field or column holding the text (default: text); repeat to join several")
    p.add_argument("--tokenizer-dir", required=True,
                   help="vocab.json + merges.txt, tokenizer.json, or a SentencePiece/tiktoken tokenizer.model")
    p.add_argument("--tokenizer-kind", choices=TOKENIZER_KINDS, default=None,
                   help="which tokenizer in --tokenizer-dir (default: detected from its files)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    p.add_argument("--output-per-input", action="store_true",
                   help="one dataset per input file, PREFIX_<input name>_<key>_document")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes, one thread each (default 1)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed document instead of skipping it")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    args.text_key = args.text_key or ["text"]
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        stats = preprocess(args.input, args.tokenizer_dir, args.output_prefix, args.text_key, args.workers,
                           args.append_eod, args.strict, args.log_interval, tokenizer_kind=args.tokenizer_kind,
                           output_per_input=args.output_per_input)
    except (ValueError, OSError) as e:   # DataError, TokenizerError (ValueErrors) and unreadable paths
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(progress_line(stats, stats["seconds"], args.workers), file=sys.stderr)
    for out in stats["outputs"]:
        print(f"wrote {out['prefix']}.bin/.idx: {out['documents']} documents, {out['tokens']} tokens; "
              f"skipped {out['skipped']} malformed line(s), {out['empty']} empty document(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
