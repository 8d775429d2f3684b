#!/usr/bin/env python3
"""Build the example corpora offline: general text and code from the Python standard library, and
arithmetic word problems with worked solutions.

    python tools/make_corpora.py --output-dir DIR [--seed S] [--math-train N --math-eval N]
                                                  [--math-levels W1,W2,W3,W4] [--max-mb X]

Writes DIR/general.jsonl and DIR/code.jsonl (rows: text, source) and DIR/math_train.jsonl and
DIR/math_eval.jsonl (rows: text, question, answer, steps, family; no question is in both; --math-levels
weighs the training problems' difficulty levels, the held-out ones are always even). The defaults
make a few MB in all, in seconds; raise --max-mb (per stdlib corpus; the non-test stdlib holds about
12 MB of code) and --math-train for more. Each file is written under a temporary name and renamed.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher.data.math_problems import make_math_splits  # noqa: E402
from megagopher.data.stdlib_corpus import build_stdlib_corpora  # noqa: E402


def write_jsonl(path, rows):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return os.path.getsize(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--math-train", type=int, default=5000, help="training problems (default 5000)")
    p.add_argument("--math-eval", type=int, default=500, help="held-out evaluation problems (default 500)")
    p.add_argument("--math-levels", default=None,
                   help="weights of levels 1-4 among the training problems, e.g. 4,2,1,1 (default: even)")
    p.add_argument("--max-mb", type=float, default=1.5, help="cap for general.jsonl and for code.jsonl, each (MB)")
    p.add_argument("--include-tests", action="store_true", help="also use the stdlib's test suites (more code)")
    args = p.parse_args(argv)
    if args.math_train < 0 or args.math_eval < 0 or args.max_mb <= 0:
        p.error("--math-train and --math-eval must be >= 0 and --max-mb > 0")
    levels = None
    if args.math_levels is not None:
        try:
            levels = [float(w) for w in args.math_levels.split(",")]
        except ValueError:
            p.error(f"--math-levels {args.math_levels!r}: four comma-separated numbers expected")
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    cap = int(args.max_mb * 1e6)
    try:
        train, held_out = make_math_splits(args.math_train, args.math_eval, args.seed, levels)
    except ValueError as e:
        p.error(f"--math-levels: {e}")
    general, code = build_stdlib_corpora(cap, cap, args.seed, args.include_tests)
    for name, rows in (("general", general), ("code", code), ("math_train", train), ("math_eval", held_out)):
        size = write_jsonl(os.path.join(args.output_dir, f"{name}.jsonl"), rows)
        print(f"{args.output_dir}/{name}.jsonl: {len(rows)} documents, {size / 1e6:.2f} MB")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
