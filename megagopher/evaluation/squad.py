"""SQuAD-style extractive question answering (Rajpurkar et al. 2016): exact match and F1.

Rows: {"id", "context", "question", "answers": [str, ...]} (SQuAD's own answer lists {"text": [...]} and
[{"text": ...}, ...] are read too). The prompt, after the tokenizer's document prefix that starts every
document in training (the end-of-document id for GPT-2 BPE, BOS where the tokenizer adds one), is

    <context>
    Question: <question>
    Answer:

and the model writes greedily up to the first newline (or the end-of-document id, or --max-new-tokens); the
prediction is that line, stripped; the rows are generated ``--batch-size`` at a time (generate_batch).
``--predictions FILE`` scores a JSON object {id: answer} instead, with no
model; an id it lacks counts as unanswered (scored 0, as SQuAD's evaluate-v1.1.py does) and is counted in
``unanswered``.

Scoring is SQuAD v1.1's: both texts are normalised (lower case, punctuation removed, the articles a/an/the
removed, whitespace collapsed); exact match is equality of the normalised texts, F1 is the harmonic mean of
the precision and recall of their bags of words (0 when they share none); each example takes the maximum
over its gold answers; both are averaged over the examples and reported in percent.
"""
import re
import string
from collections import Counter

from megagopher.evaluation.common import call_batch, check_batch_size, progress_line, prompt_ids, with_batch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text):
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction, gold):
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(predicted) & Counter(wanted)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(wanted)
    return 2 * precision * recall / (precision + recall)


def gold_answers(row, index=0):
    """The row's gold answer texts (see the module docstring for the forms read)."""
    answers = row.get("answers")
    if isinstance(answers, dict):
        answers = answers.get("text")
    elif isinstance(answers, list) and answers and all(isinstance(a, dict) for a in answers):
        answers = [a.get("text") for a in answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"row {index}: 'answers' must be a non-empty list of strings, got {row.get('answers')!r}")
    return answers


def check_squad_row(row, index=0):
    missing = [k for k in ("id", "context", "question", "answers") if k not in row]
    if missing:
        raise ValueError(f"row {index}: a squad row needs 'id', 'context', 'question' and 'answers'; "
                         f"missing {missing}")
    if not isinstance(row["context"], str) or not isinstance(row["question"], str):
        raise ValueError(f"row {index}: 'context' and 'question' must be strings")
    gold_answers(row, index)


def squad_prompt(row):
    return f"{row['context']}\nQuestion: {row['question']}\nAnswer:"


def squad_scores(rows, predict, on_example=None):
    """{"exact_match", "f1" (percent), "examples", "unanswered"}. ``predict(row)`` -> the answer text, or
    None when there is none (unanswered: 0 on both)."""
    for i, row in enumerate(rows):
        check_squad_row(row, i)
    em_sum = f1_sum = 0.0
    unanswered = 0
    predictions = call_batch(predict, [(row,) for row in rows])
    for i, (row, prediction) in enumerate(zip(rows, predictions)):
        golds = gold_answers(row, i)
        if prediction is None:
            unanswered += 1
            em = f = 0.0
        else:
            em = max(exact_match(prediction, g) for g in golds)
            f = max(f1(prediction, g) for g in golds)
        em_sum, f1_sum = em_sum + em, f1_sum + f
        if on_example is not None:
            on_example({"index": i, "id": row["id"], "question": row["question"], "predicted": prediction,
                        "answers": golds, "exact_match": em, "f1": f})
    n = len(rows)
    return {"exact_match": 100.0 * em_sum / n, "f1": 100.0 * f1_sum / n, "examples": n,
            "unanswered": unanswered}


def predictions_lookup(predictions, path="predictions"):
    """``predict(row)`` reading a {id: answer} object (ids compared as strings)."""
    if not isinstance(predictions, dict):
        raise ValueError(f"{path}: expected a JSON object {{id: answer}}, got {type(predictions).__name__}")
    bad = [k for k, v in predictions.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{path}: the answers of {bad[:5]} are not strings")
    by_id = {str(k): v for k, v in predictions.items()}
    return lambda row: by_id.get(str(row["id"]))


def model_predictor(lm, max_new_tokens, batch_size=32):
    """``predict(row)`` for squad_scores, with ``predict.batch``: greedy generation after the prompt, up to
    the first newline, ``batch_size`` rows at a time."""
    from megagopher.generate import context_limit, generate_batch
    tok = lm.tokenizer
    limit = context_limit(lm)
    room = min(max_new_tokens, limit // 2)
    check_batch_size(batch_size)

    def stop(new_ids):
        return "\n" in tok.decode(new_ids)

    def predict_all(items):
        prompts = [prompt_ids(tok, squad_prompt(row), room, limit) for (row,) in items]
        new = generate_batch(lm, prompts, max_new_tokens, eod=tok.eod, stop=stop, batch_size=batch_size,
                             progress=progress_line("squad", len(prompts)))
        return [tok.decode(ids).split("\n", 1)[0].strip() for ids in new]
    return with_batch(lambda row: predict_all([(row,)])[0], predict_all)
