"""Multiple choice (OpenBookQA/ARC-style, scored as in Brown et al. 2020 and lm-evaluation-harness).

Each choice's tokens are scored by their log-likelihood given the question; the prediction is the most
likely choice ("accuracy") or the most likely per UTF-8 byte of its continuation, a space and the choice
text ("accuracy_norm", lm-evaluation-harness's acc_norm, which does not favour short answers). The context
is the tokenizer's document prefix (the end-of-document id for GPT-2 BPE, BOS where the tokenizer adds one)
and the question; the continuation is encoded on its own. Every row's choices are scored together,
``--batch-size`` sequences a forward (megagopher.generate.score_batch). Rows may be
{"question", "choices": [...] or {"text": [...], "label": [...]}, "answer" or "answerKey"}, or the original
OpenBookQA/ARC form {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}; the answer is a
label, a 0-based index or the choice's text.
"""
from megagopher.evaluation.common import call_batch, check_batch_size, document_prefix, progress_line, with_batch


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
    parsed = [parse_choice_row(row, i) for i, row in enumerate(rows)]  # malformed rows fail first
    correct = correct_norm = 0
    pairs = [(question, choice_continuation(t)) for question, texts, _ in parsed for t in texts]
    all_scores = iter(call_batch(loglik, pairs))
    for i, (question, texts, answer) in enumerate(parsed):
        continuations = [choice_continuation(t) for t in texts]
        scores = [next(all_scores) for _ in texts]
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


def model_loglik(lm, batch_size=32):
    """``loglik(context, continuation)`` for choice_accuracy, with ``loglik.batch``: the model's
    log-likelihood of the continuation's tokens given the document prefix and the context."""
    from megagopher.generate import score_batch
    tok = lm.tokenizer
    check_batch_size(batch_size)

    def loglik_all(items):
        pairs = [(document_prefix(tok) + tok.encode(context), tok.encode(continuation))
                 for context, continuation in items]
        return score_batch(lm, pairs, batch_size, progress=progress_line("choice", len(pairs), "choices"))
    return with_batch(lambda context, continuation: loglik_all([(context, continuation)])[0], loglik_all)
