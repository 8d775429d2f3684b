"""Evaluating a checkpoint (or given answers): math word problems, multiple choice, SQuAD-style QA,
MTPB-style multi-turn program synthesis and held-out loss.

    python -m megagopher.evaluate --task math   --data F.jsonl --checkpoint DIR [--limit N] [--max-new-tokens N]
    python -m megagopher.evaluate --task choice --data F.jsonl --checkpoint DIR
    python -m megagopher.evaluate --task squad  --data F.jsonl (--checkpoint DIR | --predictions P.json)
    python -m megagopher.evaluate --task mtpb  [--data F.jsonl] (--checkpoint DIR | --samples S.jsonl) [--output R.json]
    python -m megagopher.evaluate --task loss   --data F.jsonl --checkpoint DIR
    (every task: [--limit N] [--batch-size B] [--metrics RUN_DIR/metrics.jsonl] [--show N])

math: final-answer accuracy (GSM8K-style), split by the rows' ``steps`` when they have it.
choice: accuracy and per-byte accuracy of the most likely choice (OpenBookQA/ARC-style).
squad: exact match and F1 in percent, SQuAD v1.1's normalisation, the best gold answer of each row.
mtpb: pass rate of the programs written turn by turn, each run in megagopher.sandbox (default data: the
problem set shipped in megagopher/evaluation/mtpb_problems.jsonl).
loss: mean per-token NLL of each document after the end-of-document id, token-weighted, and perplexity.
The formats, prompts and rules: megagopher/evaluation/<task>.py and docs/evaluation.md. The model runs
--batch-size prompts (or scored sequences) a forward (megagopher.generate.generate_batch / score_batch;
--batch-size 1 runs them one at a time, with the same answers), and prints a progress line (done/total,
rate, ETA) on stderr every few seconds.

With --metrics, one line {"event": "eval", "task", <the task's numbers>, "iteration", ...} is appended to
that metrics.jsonl (docs/ARCHITECTURE.md 4.3). Under torchrun with --tp N every rank computes and rank 0
reports. --checkpoint is needed only when a model is: squad with --predictions and mtpb with --samples
score without one.
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import DEVICES, PRECISIONS
from megagopher.errors import EXIT_INPUT_ERROR
from megagopher.evaluation import mtpb
from megagopher.evaluation.choice import choice_accuracy, model_loglik, parse_choice_row  # noqa: F401 (API)
from megagopher.evaluation.common import append_metrics, read_json, read_jsonl, write_json_atomic
from megagopher.evaluation.loss import check_loss_row, model_loss
from megagopher.evaluation.math_task import math_accuracy, math_completer, math_prompt  # noqa: F401 (API)
from megagopher.evaluation.squad import check_squad_row, model_predictor, predictions_lookup, squad_scores
from megagopher.sandbox import Limits

TASKS = ("math", "choice", "squad", "mtpb", "loss")
DEFAULT_MTPB = os.path.join(os.path.dirname(os.path.abspath(mtpb.__file__)), "mtpb_problems.jsonl")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m megagopher.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--checkpoint", default=None, help="checkpoint root (with latest) or an iter_ directory")
    p.add_argument("--data", default=None, help="JSONL file of examples (mtpb: default the shipped problems)")
    p.add_argument("--predictions", default=None, help="squad: a JSON object {id: answer} to score, no model")
    p.add_argument("--samples", default=None, help="mtpb: JSONL {id, input_index, turns} to run, no model")
    p.add_argument("--output", default=None, help="mtpb: write {pass_rate, problems, cases} to this JSON file")
    p.add_argument("--timeout", type=float, default=10.0, help="mtpb: wall-clock seconds per program")
    p.add_argument("--memory-mb", type=int, default=1024, help="mtpb: address-space limit per program")
    p.add_argument("--jobs", type=int, default=1, help="mtpb: programs run at the same time")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples (problems) only")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="math, squad: longest generation (default 128); mtpb: caps each turn's max_gen_length")
    p.add_argument("--batch-size", type=int, default=32,
                   help="prompts (sequences) a forward; memory grows with it (default 32; 1: one at a time)")
    p.add_argument("--metrics", default=None, help="append the result to this metrics.jsonl")
    p.add_argument("--show", type=int, default=0, help="print the first N examples")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the number of processes)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default: the run's data.tokenizer_dir)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="fp32", choices=PRECISIONS)
    return p


def _check_args(args):
    """The data path and whether a model is needed; a bad combination raises ValueError."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    _sandbox_limits(args)  # --timeout and --memory-mb in range
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    for flag, task in (("predictions", "squad"), ("samples", "mtpb"), ("output", "mtpb")):
        if getattr(args, flag) is not None and args.task != task:
            raise ValueError(f"--{flag} is for --task {task} only")
    given = args.predictions if args.task == "squad" else args.samples if args.task == "mtpb" else None
    if given is not None and args.checkpoint is not None:
        flag = "predictions" if args.task == "squad" else "samples"
        raise ValueError(f"--checkpoint and --{flag} exclude each other")
    if given is None and args.checkpoint is None:
        extra = {"squad": " (or --predictions P.json)", "mtpb": " (or --samples S.jsonl)"}.get(args.task, "")
        raise ValueError(f"--task {args.task} needs --checkpoint DIR{extra}")
    data = args.data or (DEFAULT_MTPB if args.task == "mtpb" else None)
    if data is None:
        raise ValueError(f"--task {args.task} needs --data FILE.jsonl")
    return data, given is None


def _sandbox_limits(args):
    return Limits(wall_s=args.timeout, memory_mb=args.memory_mb)


_ROW_CHECKS = {"math": math_prompt, "choice": parse_choice_row, "squad": check_squad_row,
               "mtpb": mtpb.check_problem, "loss": check_loss_row}


def _run_task(args, rows, lm, show):
    """The task's result dict (the model, when one is loaded, is ``lm``)."""
    if args.task == "math":
        return math_accuracy(rows, math_completer(lm, args.max_new_tokens or 128, args.batch_size), show)
    if args.task == "choice":
        return choice_accuracy(rows, model_loglik(lm, args.batch_size), show)
    if args.task == "squad":
        predict = model_predictor(lm, args.max_new_tokens or 128, args.batch_size) if lm is not None else \
            predictions_lookup(read_json(args.predictions), args.predictions)
        return squad_scores(rows, predict, show)
    if args.task == "loss":
        return model_loss(lm, rows, show, args.batch_size)
    turns_for = mtpb.model_turns(lm, args.max_new_tokens, args.batch_size) if lm is not None else \
        mtpb.samples_lookup(read_jsonl(args.samples), rows, args.samples)
    index = itertools.count()
    return mtpb.score_programs(rows, turns_for, _sandbox_limits(args),
                               on_case=lambda case: show({"index": next(index), **case}), jobs=args.jobs)


def _summary(task, result):
    """The result in words: one line, then any per-group lines."""
    if task == "squad":
        text = (f"exact match {result['exact_match']:.2f}, F1 {result['f1']:.2f} (percent) "
                f"over {result['examples']} examples")
        return text + (f", {result['unanswered']} unanswered" if result["unanswered"] else ""), []
    if task == "mtpb":
        lines = [f"  problem {pid}: pass rate {frac:.2f}" for pid, frac in result["problems"].items()]
        return f"pass rate {result['pass_rate']:.4f} ({result['passed']}/{result['test_cases']} test cases)", lines
    if task == "loss":
        return (f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
                f"of {result['examples']} documents"), []
    text = f"accuracy {result['accuracy']:.4f}"
    if "accuracy_norm" in result:
        text += f", accuracy_norm {result['accuracy_norm']:.4f}"
    lines = [f"  steps {steps}: accuracy {r['accuracy']:.4f} ({r['correct']}/{r['examples']})"
             for steps, r in result.get("by_steps", {}).items()]
    return f"{text} over {result['examples']} examples", lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    from megagopher.generate import load_model
    try:
        data, needs_model = _check_args(args)
        rows = read_jsonl(data, args.limit)
        for i, row in enumerate(rows):  # a malformed row fails now, not after the model has run
            _ROW_CHECKS[args.task](row, i)
        if args.task == "mtpb" and args.samples is not None:
            mtpb.samples_lookup(read_jsonl(args.samples), rows, args.samples)
        if args.task == "squad" and args.predictions is not None:
            predictions_lookup(read_json(args.predictions), args.predictions)
        lm = load_model(args.checkpoint, tp=args.tp, device=args.device, dtype=args.dtype,
                        tokenizer_dir=args.tokenizer_dir, need_tokenizer=True) if needs_model else None
    except (ValueError, FileNotFoundError, KeyError, IsADirectoryError) as e:
        print(f"megagopher.evaluate: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    leader = not dist.is_initialized() or dist.get_rank() == 0

    def show(record):
        if leader and record["index"] < args.show:
            print(json.dumps(record), flush=True)

    start = time.perf_counter()
    result = _run_task(args, rows, lm, show)
    source = {"checkpoint": lm.path, "iteration": lm.iteration} if lm is not None else \
        {"checkpoint": None, "iteration": None, "answers": args.predictions or args.samples}
    record = {"event": "eval", "task": args.task, **{k: v for k, v in result.items() if k != "cases"}, **source,
              "data": data, "eval_time_s": time.perf_counter() - start}
    if leader:
        where = f"checkpoint {lm.path}, iteration {lm.iteration}" if lm is not None else f"answers {source['answers']}"
        headline, lines = _summary(args.task, result)
        print("\n".join(lines + [f"megagopher.evaluate: {args.task} on {data}: {headline} ({where})"]), flush=True)
        if args.output:
            write_json_atomic(args.output, result)
        if args.metrics:
            append_metrics(args.metrics, record)
    ps.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
