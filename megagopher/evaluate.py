"""Evaluating a checkpoint: final-answer accuracy on math word problems, and multiple-choice question
answering scored by log-likelihood (the two evaluations SEEDS.md asks for).

    python -m megagopher.evaluate --checkpoint DIR --task math --data math_eval.jsonl \\
           [--limit N] [--max-new-tokens N] [--metrics RUN_DIR/metrics.jsonl]
    python -m megagopher.evaluate --checkpoint DIR --task choice --data FILE.jsonl [--limit N] [--metrics ...]

Math (GSM8K-style, Cobbe et al. 2021): the prompt is the question and a newline, as the question opens its
document in the math corpus (``question\\nsolution...\\nThe answer is N.``), after the end-of-document id
that precedes every document in training. The model writes a solution greedily until the end-of-document
id, the line after "The answer is", or --max-new-tokens; megagopher.data.math_problems.extract_answer
reads its final number, and it is right when it equals the row's ``answer`` (both normalised).

Multiple choice (OpenBookQA/ARC-style, scored as in Brown et al. 2020 and lm-evaluation-harness): each
choice's tokens are scored by their log-likelihood given the question; the prediction is the most likely
choice ("accuracy") or the most likely per UTF-8 byte of its continuation, a space and the choice text
("accuracy_norm", lm-evaluation-harness's acc_norm, which does not favour short answers). The context is
the end-of-document id and the question; the continuation is encoded on its own. Rows may be
{"question", "choices": [...] or {"text": [...], "label": [...]}, "answer" or "answerKey"}, or the original
OpenBookQA/ARC form {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}; the answer is a
label, a 0-based index or the choice's text.

With --metrics, one line {"event": "eval", "task", "accuracy", "iteration", ...} is appended to that
metrics.jsonl (docs/ARCHITECTURE.md 4.3). Under torchrun with --tp N every rank computes and rank 0 reports.
"""
import argparse
import json
import os
import re
import sys
import time

import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.data.math_problems import extract_answer, normalize_number

_ANSWER_LINE = re.compile(r"answer is[^\n]*\n", re.IGNORECASE)


def read_jsonl(path, limit=None):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not JSON ({e})") from None
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


# -- math word problems -----------------------------------------------------------------------------------
def math_prompt(row, index=0):
    if "question" not in row or "answer" not in row:
        raise ValueError(f"row {index}: a math row needs 'question' and 'answer' keys, got {sorted(row)}")
    return row["question"] + "\n"


def math_accuracy(rows, complete, on_example=None):
    """Final-answer accuracy. ``complete(prompt) -> generated text``; ``on_example(record)`` sees each
    scored example (for printing)."""
    correct = 0
    for i, row in enumerate(rows):
        text = complete(math_prompt(row, i))
        predicted, expected = extract_answer(text), normalize_number(str(row["answer"]))
        ok = predicted is not None and predicted == expected
        correct += ok
        if on_example is not None:
            on_example({"index": i, "question": row["question"], "generated": text, "predicted": predicted,
                        "expected": expected, "correct": ok})
    return {"accuracy": correct / len(rows), "correct": correct, "examples": len(rows)}


def math_completer(lm, max_new_tokens):
    """``complete(prompt)`` for math_accuracy: greedy, stopping after the "The answer is ..." line."""
    from megagopher.generate import context_limit, generate
    tok = lm.tokenizer
    limit = context_limit(lm)
    room = min(max_new_tokens, limit // 2)

    def stop(new_ids):
        return bool(_ANSWER_LINE.search(tok.decode(new_ids)))

    def complete(prompt):
        ids = ([tok.eod] if tok.eod is not None else []) + tok.encode(prompt)
        ids = ids[-(limit - room):]  # a question too long for the model keeps its end
        return tok.decode(generate(lm, ids, max_new_tokens, greedy=True, eod=tok.eod, stop=stop))
    return complete


# -- multiple choice ------------------------------------------------------------------------------------
def parse_choice_row(row, index=0):
    """(question, [choice texts], index of the right choice) from one row (see the module docstring)."""
    where = f"row {index}"
    question, choices = row.get("question"), row.get("choices")
    if isinstance(question, dict):  # OpenBookQA/ARC original: the choices sit inside the question
        choices = choices if choices is not None else question.get("choices")
        question = question.get("stem")
    if question is None:
        question = row.get("question_stem", row.get("stem"))
    if not isinstance(question, str):
        raise ValueError(f"{where}: no question text (keys 'question', 'question_stem' or question.stem)")
    labels = None
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        texts, labels = [c.get("text") for c in choices], [c.get("label") for c in choices]
    else:
        texts = choices
    if not isinstance(texts, list) or len(texts) < 2 or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{where}: 'choices' must hold at least two texts, as a list or {{'text': [...], "
                         f"'label': [...]}}, got {choices!r}")
    labels = [str(lab) for lab in labels] if labels else [chr(ord("A") + i) for i in range(len(texts))]
    answer = next((row[k] for k in ("answerKey", "answer", "label") if k in row), None)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(texts):
        return question, texts, answer
    if isinstance(answer, str):
        answer = answer.strip()
        if answer in labels:
            return question, texts, labels.index(answer)
        if answer in texts:
            return question, texts, texts.index(answer)
    raise ValueError(f"{where}: answer {answer!r} is none of the labels {labels}, an index below {len(texts)} "
                     "or a choice's text (keys 'answerKey', 'answer' or 'label')")


def choice_continuation(text):
    return " " + text


def choice_accuracy(rows, loglik, on_example=None):
    """Accuracy and byte-length-normalised accuracy. ``loglik(context, continuation) -> float``."""
    correct = correct_norm = 0
    for i, row in enumerate(rows):
        question, texts, answer = parse_choice_row(row, i)
        continuations = [choice_continuation(t) for t in texts]
        scores = [loglik(question, c) for c in continuations]
        normed = [s / len(c.encode("utf-8")) for s, c in zip(scores, continuations)]
        pick = max(range(len(texts)), key=lambda j: scores[j])
        pick_norm = max(range(len(texts)), key=lambda j: normed[j])
        correct += pick == answer
        correct_norm += pick_norm == answer
        if on_example is not None:
            on_example({"index": i, "question": question, "scores": scores, "predicted": pick,
                        "predicted_norm": pick_norm, "expected": answer})
    n = len(rows)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "correct": correct,
            "correct_norm": correct_norm, "examples": n}


def model_loglik(lm):
    """``loglik(context, continuation)`` for choice_accuracy: the model's log-likelihood of the
    continuation's tokens given the end-of-document id and the context."""
    from megagopher.generate import score
    tok = lm.tokenizer

    def loglik(context, continuation):
        ids = ([tok.eod] if tok.eod is not None else []) + tok.encode(context)
        return score(lm, ids, tok.encode(continuation))
    return loglik


# -- reporting ------------------------------------------------------------------------------------------
def append_metrics(path, record):
    """Appends one JSON line to ``path`` and flushes it."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_parser():
    p = argparse.ArgumentParser(prog="python -m megagopher.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (with latest) or an iter_ directory")
    p.add_argument("--task", required=True, choices=("math", "choice"))
    p.add_argument("--data", required=True, help="JSONL file of examples")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--max-new-tokens", type=int, default=128, help="math: longest generated solution")
    p.add_argument("--metrics", default=None, help="append the result to this metrics.jsonl")
    p.add_argument("--show", type=int, default=0, help="print the first N examples")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the number of processes)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default: the run's data.tokenizer_dir)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from megagopher.generate import load_model
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit} must be >= 1")
        rows = read_jsonl(args.data, args.limit)
        for i, row in enumerate(rows):  # a malformed row fails now, not after the model has run
            math_prompt(row, i) if args.task == "math" else parse_choice_row(row, i)
        lm = load_model(args.checkpoint, tp=args.tp, device=args.device, dtype=args.dtype,
                        tokenizer_dir=args.tokenizer_dir, need_tokenizer=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"megagopher.evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    leader = not dist.is_initialized() or dist.get_rank() == 0

    def show(record):
        if leader and record["index"] < args.show:
            print(json.dumps(record), flush=True)

    start = time.perf_counter()
    if args.task == "math":
        result = math_accuracy(rows, math_completer(lm, args.max_new_tokens), show)
    else:
        result = choice_accuracy(rows, model_loglik(lm), show)
    record = {"event": "eval", "task": args.task, **result, "iteration": lm.iteration,
              "checkpoint": lm.path, "data": args.data, "eval_time_s": time.perf_counter() - start}
    if leader:
        extra = f", accuracy_norm {result['accuracy_norm']:.4f}" if "accuracy_norm" in result else ""
        print(f"megagopher.evaluate: {args.task} on {args.data}: accuracy {result['accuracy']:.4f}{extra} "
              f"over {result['examples']} examples (checkpoint {lm.path}, iteration {lm.iteration})", flush=True)
        if args.metrics:
            append_metrics(args.metrics, record)
    ps.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
