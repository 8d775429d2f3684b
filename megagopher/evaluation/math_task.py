"""Final-answer accuracy on math word problems (GSM8K-style, Cobbe et al. 2021).

Rows: {"question", "answer", ["steps": 1-4, ...]} (megagopher.data.math_problems writes them). The prompt is
the question and a newline, as the question opens its document in the math corpus
(``question\\nsolution...\\nThe answer is N.``), after the end-of-document id that precedes every document
in training. The model writes a solution greedily until the end-of-document id, the line after "The answer
is", or --max-new-tokens; megagopher.data.math_problems.extract_answer reads its final number, and it is
right when it equals the row's ``answer`` (both normalised). When rows carry ``steps`` (the difficulty,
the number of solution steps), the result also has ``by_steps``: {"1": {"accuracy", "correct",
"examples"}, ...}, one entry per level present.
"""
import re

from megagopher.data.math_problems import extract_answer, normalize_number
from megagopher.evaluation.common import call_batch, check_batch_size, progress_line, prompt_ids, with_batch

_ANSWER_LINE = re.compile(r"answer is[^\n]*\n", re.IGNORECASE)


def math_prompt(row, index=0):
    if "question" not in row or "answer" not in row:
        raise ValueError(f"row {index}: a math row needs 'question' and 'answer' keys, got {sorted(row)}")
    return row["question"] + "\n"


def _tally(pairs):
    """{"accuracy", "correct", "examples"} of [(key, correct)] per key, keys in order."""
    groups = {}
    for key, ok in pairs:
        groups.setdefault(key, []).append(ok)
    return {key: {"accuracy": sum(oks) / len(oks), "correct": sum(oks), "examples": len(oks)}
            for key, oks in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0]))}


def math_accuracy(rows, complete, on_example=None):
    """Final-answer accuracy. ``complete(prompt) -> generated text``; ``on_example(record)`` sees each
    scored example (for printing)."""
    for i, row in enumerate(rows):  # a malformed row fails before any generation
        math_prompt(row, i)
    correct, by_steps = 0, []
    texts = call_batch(complete, [(math_prompt(row, i),) for i, row in enumerate(rows)])
    for i, (row, text) in enumerate(zip(rows, texts)):
        predicted, expected = extract_answer(text), normalize_number(str(row["answer"]))
        ok = predicted is not None and predicted == expected
        correct += ok
        if "steps" in row:
            by_steps.append((str(row["steps"]), ok))
        if on_example is not None:
            on_example({"index": i, "question": row["question"], "generated": text, "predicted": predicted,
                        "expected": expected, "correct": ok, **({"steps": row["steps"]} if "steps" in row else {})})
    result = {"accuracy": correct / len(rows), "correct": correct, "examples": len(rows)}
    if by_steps:
        result["by_steps"] = _tally(by_steps)
    return result


def math_completer(lm, max_new_tokens, batch_size=32):
    """``complete(prompt)`` for math_accuracy, with ``complete.batch``: greedy, stopping after the "The
    answer is ..." line, ``batch_size`` prompts at a time."""
    from megagopher.generate import context_limit, generate_batch
    tok = lm.tokenizer
    limit = context_limit(lm)
    room = min(max_new_tokens, limit // 2)
    check_batch_size(batch_size)

    def stop(new_ids):
        return bool(_ANSWER_LINE.search(tok.decode(new_ids)))

    def complete_all(items):
        prompts = [prompt_ids(tok, prompt, room, limit) for (prompt,) in items]  # a long question keeps its end
        new = generate_batch(lm, prompts, max_new_tokens, eod=tok.eod, stop=stop, batch_size=batch_size,
                             progress=progress_line("math", len(prompts)))
        return [tok.decode(ids) for ids in new]
    return with_batch(lambda prompt: complete_all([(prompt,)])[0], complete_all)
