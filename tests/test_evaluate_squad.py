"""megagopher.evaluation.squad against SQuAD v1.1's official evaluate-v1.1.py, whose normalize_answer,
f1_score and exact_match_score are restated below as the independent reference, on hand-made cases
(articles, punctuation, case, several gold answers, empty and missing predictions); the command line
scoring a predictions file with no model. (The run with a tiny checkpoint is in test_evaluate.py.)"""
import json
import re
import string
from collections import Counter

import pytest

from megagopher import evaluate as ev
from megagopher.evaluation import squad


# -- SQuAD v1.1's evaluate-v1.1.py (Rajpurkar et al.), as published ----------------------------------------
def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_em(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_evaluate(rows, predictions):
    f1 = exact_match = 0
    for row in rows:
        if row["id"] not in predictions:
            continue  # "Unanswered question ... will receive score 0."
        prediction = predictions[row["id"]]
        exact_match += max(official_em(prediction, gt) for gt in row["answers"])
        f1 += max(official_f1(prediction, gt) for gt in row["answers"])
    return {"exact_match": 100.0 * exact_match / len(rows), "f1": 100.0 * f1 / len(rows)}


CASES = [  # (prediction, gold answers)
    ("The Eiffel Tower", ["Eiffel Tower"]),                        # article dropped: exact
    ("eiffel tower!", ["the Eiffel Tower."]),                       # case and punctuation
    ("an apple a day", ["apple day"]),                             # every article, mid-sentence too
    ("in 1889", ["1889", "in the year 1889", "1887"]),              # best of several golds
    ("Paris, France", ["Paris"]),                                   # partial overlap: F1 only
    ("", ["Paris"]),                                                # empty prediction
    ("the", ["a"]),                                                 # both normalise to empty
    ("New   York\tCity", ["new york city"]),                       # whitespace collapsed
    ("theatre anthem", ["the atre an them"]),                      # articles only as whole words
    ("the the the cat", ["cat cat"]),                              # bag-of-words counts
    ("U.S. army's 3rd-division", ["US armys 3rddivision"]),        # punctuation inside words
]


def test_normalisation_and_scores_match_the_official_script():
    for prediction, golds in CASES:
        assert squad.normalize_answer(prediction) == official_normalize_answer(prediction)
        for gold in golds:
            assert squad.exact_match(prediction, gold) == float(official_em(prediction, gold)), (prediction, gold)
            assert squad.f1(prediction, gold) == pytest.approx(official_f1(prediction, gold), abs=1e-12)
    assert squad.f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert squad.exact_match("the", "a") == 1.0 and squad.f1("the", "a") == 0.0


def test_scores_average_the_best_gold_answer_in_percent():
    rows = [{"id": f"q{i}", "context": "c", "question": "q", "answers": golds} for i, (_, golds) in enumerate(CASES)]
    predictions = {f"q{i}": p for i, (p, _) in enumerate(CASES)}
    del predictions["q3"]  # one unanswered question
    seen = []
    result = squad.squad_scores(rows, squad.predictions_lookup(predictions), seen.append)
    reference = official_evaluate(rows, predictions)
    assert result["exact_match"] == pytest.approx(reference["exact_match"], abs=1e-9)
    assert result["f1"] == pytest.approx(reference["f1"], abs=1e-9)
    assert result["examples"] == len(CASES) and result["unanswered"] == 1
    assert seen[3]["predicted"] is None and seen[3]["f1"] == 0.0 and seen[0]["exact_match"] == 1.0


def test_answer_forms_and_bad_rows():
    row = {"id": 1, "context": "c", "question": "q"}
    for answers in (["a", "b"], {"text": ["a", "b"], "answer_start": [0, 2]}, [{"text": "a"}, {"text": "b"}]):
        assert squad.gold_answers(dict(row, answers=answers)) == ["a", "b"]
    with pytest.raises(ValueError, match="row 2: 'answers' must be a non-empty list of strings"):
        squad.check_squad_row(dict(row, answers=[]), 2)
    with pytest.raises(ValueError, match="missing \\['context'\\]"):
        squad.check_squad_row({"id": 1, "question": "q", "answers": ["a"]})
    with pytest.raises(ValueError, match="the answers of \\['x'\\] are not strings"):
        squad.predictions_lookup({"x": 3})
    assert squad.squad_prompt(dict(row, context="Ctx.")) == "Ctx.\nQuestion: q\nAnswer:"


def test_cli_scores_a_predictions_file(tmp_path, capsys):
    rows = [{"id": "a", "context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]},
            {"id": "b", "context": "It opened in 1889.", "question": "When?", "answers": ["1889", "in 1889"]}]
    data, preds, metrics = tmp_path / "squad.jsonl", tmp_path / "preds.json", tmp_path / "m" / "metrics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds.write_text(json.dumps({"a": "in France", "b": "1889"}))
    assert ev.main(["--task", "squad", "--data", str(data), "--predictions", str(preds),
                    "--metrics", str(metrics)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "exact match 50.00, F1 83.33 (percent) over 2 examples" in last
    (line,) = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert line["event"] == "eval" and line["task"] == "squad" and line["exact_match"] == 50.0
    assert line["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2) and line["answers"] == str(preds)
    preds.write_text("[1, 2]")
    assert ev.main(["--task", "squad", "--data", str(data), "--predictions", str(preds)]) == 2
    assert "expected a JSON object {id: answer}" in capsys.readouterr().err
    assert ev.main(["--task", "squad", "--data", str(data)]) == 2
    assert "needs --checkpoint DIR (or --predictions P.json)" in capsys.readouterr().err
