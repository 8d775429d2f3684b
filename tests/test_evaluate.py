"""megagopher.evaluate: final-answer accuracy on math word problems from known generations (split by
difficulty), the multiple-choice scorer's row formats and its choice of the most likely answer (raw and
per byte), the loss task's windows, and end-to-end runs on a tiny trained checkpoint (math, choice,
squad, mtpb, loss) that append their "eval" line to the run's metrics.jsonl; every task batched
(--batch-size) against one at a time; the progress line; megagopher.generate --prompts-file."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megagopher import evaluate as ev
from megagopher.evaluation.loss import document_nll, loss_of
from megagopher.evaluation import mtpb
from megagopher.evaluation.common import read_jsonl
from megagopher.evaluation.mtpb import PREFIX
from megagopher.data.math_problems import make_math_splits
from megagopher.data.tokenizer import load_tokenizer
from megagopher.export.loading import model_config_of, open_checkpoint
from megagopher.model import GPTModel
from megagopher.training.checkpoint import load_weights
from train_utils import ROOT, bpe_tokenizer_dir, read_metrics, run_train, write_config


def test_math_accuracy_from_known_generations():
    rows = [{"question": "q1", "answer": "1200.5"}, {"question": "q2", "answer": "7"},
            {"question": "q3", "answer": "3"}, {"question": "q4", "answer": "10"}, {"question": "q5", "answer": "4"}]
    generations = {
        "q1\n": "So 1,000 + 200.50 = $1,200.50.\nThe answer is $1,200.50.\n",  # normalised: right
        "q2\n": "It is 3 + 4 = 7.\nThe answer is 8.",                           # the final answer counts: wrong
        "q3\n": "No number at all",                                             # nothing to extract: wrong
        "q4\n": "Two tens make 10",                                             # the last number: right
        "q5\n": "The answer is 4.0",                                            # 4.0 == 4: right
    }
    seen = []
    result = ev.math_accuracy(rows, lambda prompt: generations[prompt], seen.append)
    assert result == {"accuracy": 3 / 5, "correct": 3, "examples": 5}
    assert [r["correct"] for r in seen] == [True, False, False, True, True]
    assert seen[0]["predicted"] == "1200.5" and seen[2]["predicted"] is None
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        ev.math_accuracy([{"text": "x"}], lambda p: "")


def test_math_accuracy_by_steps():
    rows = [{"question": f"q{i}", "answer": "1", "steps": steps} for i, steps in enumerate([1, 2, 1, 4, 10])]
    right = {"q0", "q3", "q4"}
    result = ev.math_accuracy(rows, lambda prompt: "The answer is 1." if prompt[:-1] in right else "0")
    assert result["accuracy"] == 3 / 5
    assert result["by_steps"] == {"1": {"accuracy": 0.5, "correct": 1, "examples": 2},
                                  "2": {"accuracy": 0.0, "correct": 0, "examples": 1},
                                  "4": {"accuracy": 1.0, "correct": 1, "examples": 1},
                                  "10": {"accuracy": 1.0, "correct": 1, "examples": 1}}


def test_loss_windows_score_every_token_once():
    calls = []

    def score(context, continuation):  # -1 nat per token: the mean loss must come out 1
        calls.append((list(context), list(continuation)))
        return -float(len(continuation))

    nll, n = document_nll(list(range(100, 120)), score, limit=8, eod=0)
    assert (nll, n) == (20.0, 20)
    scored = [t for _, cont in calls for t in cont]
    assert scored == list(range(100, 120))                             # each token once, in order
    assert calls[0][0] == [0] and all(len(c) + len(x) <= 8 for c, x in calls)
    assert all(c == list(range(x[0] - 4, x[0])) for c, x in calls[1:])  # half a context of history
    result = loss_of([{"text": "ab"}, {"text": "abcd"}], score, lambda t: [5] * len(t), 8, eod=0)
    assert result == {"loss": 1.0, "perplexity": pytest.approx(math.e), "tokens": 6, "examples": 2}
    with pytest.raises(ValueError, match="row 1: a loss row needs a non-empty 'text'"):
        loss_of([{"text": "a"}, {"txt": "b"}], score, list, 8)


def test_choice_row_formats():
    expected = ("Which is a metal?", ["wood", "iron", "glass"], 1)
    for row in (
        {"question": "Which is a metal?", "choices": ["wood", "iron", "glass"], "answer": 1},
        {"question": "Which is a metal?", "choices": ["wood", "iron", "glass"], "answer": "B"},
        {"question": "Which is a metal?", "choices": ["wood", "iron", "glass"], "answer": "iron"},
        {"question_stem": "Which is a metal?", "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]},
         "answerKey": "2"},
        {"question": {"stem": "Which is a metal?", "choices": [{"text": "wood", "label": "A"},
                                                               {"text": "iron", "label": "B"},
                                                               {"text": "glass", "label": "C"}]}, "answerKey": "B"},
    ):
        assert ev.parse_choice_row(row) == expected
    with pytest.raises(ValueError, match=r"row 3: answer 'Z' is none of the labels"):
        ev.parse_choice_row({"question": "q", "choices": ["a", "b"], "answer": "Z"}, 3)
    with pytest.raises(ValueError, match="at least two texts"):
        ev.parse_choice_row({"question": "q", "choices": ["a"], "answer": 0})


def test_choice_accuracy_picks_the_most_likely_choice():
    rows = [{"question": "q", "choices": ["a", "a much longer answer"], "answer": 1},
            {"question": "r", "choices": ["x", "y", "z"], "answer": 2}]
    logliks = {("q", " a"): -3.0, ("q", " a much longer answer"): -6.0,            # raw picks 0, per byte picks 1
               ("r", " x"): -5.0, ("r", " y"): -4.0, ("r", " z"): -1.0}
    seen = []
    result = ev.choice_accuracy(rows, lambda c, x: logliks[(c, x)], seen.append)
    assert result["accuracy"] == 0.5 and result["accuracy_norm"] == 1.0 and result["examples"] == 2
    assert [r["predicted"] for r in seen] == [0, 2] and [r["predicted_norm"] for r in seen] == [1, 2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run whose config names a tokenizer trained on the math corpus, plus eval files."""
    tmp = tmp_path_factory.mktemp("eval")
    math_train, math_eval = make_math_splits(60, 3, seed=5)
    tok_dir = bpe_tokenizer_dir(str(tmp / "tok"), (r["text"] for r in math_train), 300)
    vocab = load_tokenizer(tok_dir).vocab_size
    run_dir = str(tmp / "run")
    run_train(write_config(tmp), run_dir, f"--checkpoint.dir={tmp / 'ckpt'}", "--training.train_iters=2",
              "--model.num_layers=2", "--model.seq_length=128", "--model.init_std=0.3",
              f"--model.vocab_size={vocab}", f"--data.tokenizer_dir={tok_dir}")
    with open(tmp / "math_eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in math_eval)
    choice_rows = [
        {"question": "Ava buys 3 pens at $2 each. How much does she spend?", "choices": ["6 dollars", "5", "a lot"],
         "answer": "A"},
        {"question_stem": "The machine makes toys.",
         "choices": {"text": ["toys", "boxes of cups"], "label": ["A", "B"]}, "answerKey": "B"},
    ]
    with open(tmp / "choice.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in choice_rows)
    squad_rows = [{"id": "s1", "context": "Ava buys 3 pens at $2 each.", "question": "How many pens?",
                   "answers": ["3", "three"]},
                  {"id": "s2", "context": "The machine makes 40 toys.", "question": "What does it make?",
                   "answers": ["toys"]}]
    with open(tmp / "squad.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in squad_rows)
    with open(tmp / "heldout.jsonl", "w") as f:  # short documents (one window each), then a long one
        f.writelines(json.dumps({"text": t}) + "\n" for t in [r["question"] for r in math_eval[:2]] + [
            " ".join(r["text"] for r in math_eval)])
    return {"ckpt": str(tmp / "ckpt"), "run_dir": run_dir, "math": str(tmp / "math_eval.jsonl"),
            "choice": str(tmp / "choice.jsonl"), "rows": math_eval, "choice_rows": choice_rows, "tok": tok_dir,
            "squad": str(tmp / "squad.jsonl"), "squad_rows": squad_rows, "heldout": str(tmp / "heldout.jsonl")}


def test_math_end_to_end_writes_the_eval_line(run):
    metrics = os.path.join(run["run_dir"], "metrics.jsonl")
    proc = subprocess.run([sys.executable, "-m", "megagopher.evaluate", "--checkpoint", run["ckpt"], "--task", "math",
                           "--data", run["math"], "--limit", "2", "--max-new-tokens", "6", "--metrics", metrics,
                           "--show", "2"], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(shown) == 2 and "accuracy" in proc.stdout.splitlines()[-1]
    (line,) = read_metrics(run["run_dir"], event="eval")
    assert line["task"] == "math" and line["iteration"] == 2 and line["examples"] == 2
    assert line["accuracy"] == sum(r["correct"] for r in shown) / 2
    levels = {str(r["steps"]) for r in run["rows"][:2]}
    assert set(line["by_steps"]) == levels and sum(v["examples"] for v in line["by_steps"].values()) == 2
    assert all(f"steps {k}: accuracy" in proc.stdout for k in levels)
    # The same generations through the API: greedy after [eod] + question + newline.
    from megagopher.generate import generate, load_model
    lm = load_model(run["ckpt"])
    tok = lm.tokenizer
    for record, row in zip(shown, run["rows"]):
        ids = [tok.eod] + tok.encode(row["question"] + "\n")
        assert record["generated"] == tok.decode(generate(lm, ids, 6, eod=tok.eod))
        assert record["expected"] == row["answer"]


def test_choice_end_to_end_against_manual_log_likelihoods(run, capsys):
    metrics = os.path.join(run["run_dir"], "eval_choice.jsonl")
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "choice", "--data", run["choice"], "--metrics", metrics,
                    "--show", "5"]) == 0
    out = capsys.readouterr().out
    shown = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    reader = open_checkpoint(run["ckpt"])
    model = GPTModel(model_config_of(reader))
    load_weights(reader, [model])
    model.eval()
    tok = load_tokenizer(run["tok"])
    correct = correct_norm = 0
    for record, row in zip(shown, run["choice_rows"]):
        question, texts, answer = ev.parse_choice_row(row)
        manual = []
        for text in texts:
            context, continuation = [tok.eod] + tok.encode(question), tok.encode(" " + text)
            with torch.no_grad():
                logits = model(torch.tensor([context + continuation]))[0, :, :tok.vocab_size].double()
            logp = torch.log_softmax(logits, -1)
            manual.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
        assert record["scores"] == pytest.approx(manual, abs=1e-4)
        assert record["predicted"] == max(range(len(texts)), key=manual.__getitem__)
        per_byte = [m / len((" " + t).encode()) for m, t in zip(manual, texts)]
        correct += record["predicted"] == answer
        correct_norm += max(range(len(texts)), key=per_byte.__getitem__) == answer
    (line,) = [json.loads(s) for s in open(metrics)]
    assert line["event"] == "eval" and line["task"] == "choice" and line["iteration"] == 2
    assert line["accuracy"] == correct / 2 and line["accuracy_norm"] == correct_norm / 2


def test_cli_errors(run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "q"}\n')
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "math", "--data", str(bad)]) == 2
    assert "row 1: a math row needs 'question' and 'answer'" in capsys.readouterr().err
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "choice", "--data", str(bad)]) == 2
    assert "row 0: 'choices' must hold at least two texts" in capsys.readouterr().err
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "math", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "math", "--data", run["math"], "--batch-size", "0"]) == 2
    assert "--batch-size 0 must be >= 1" in capsys.readouterr().err


def test_generate_text_prompt_uses_the_run_tokenizer(run, capsys):
    from megagopher import generate as gen
    assert gen.main(["--checkpoint", run["ckpt"], "--prompt", "Ava buys 3 pens", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    lm = gen.load_model(run["ckpt"])
    new = gen.generate(lm, lm.tokenizer.encode("Ava buys 3 pens"), 5)
    assert printed == lm.tokenizer.decode(new) + "\n"


def test_squad_end_to_end_against_the_api(run, tmp_path, capsys):
    metrics = str(tmp_path / "metrics.jsonl")
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "squad", "--data", run["squad"], "--max-new-tokens", "6",
                    "--metrics", metrics, "--show", "2"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    from megagopher.generate import generate, load_model
    from megagopher.evaluation import squad
    lm = load_model(run["ckpt"])
    tok = lm.tokenizer
    for record, row in zip(shown, run["squad_rows"]):  # greedy after [eod] + the prompt, cut at a newline
        ids = [tok.eod] + tok.encode(f"{row['context']}\nQuestion: {row['question']}\nAnswer:")
        new = generate(lm, ids, 6, eod=tok.eod, stop=lambda n: "\n" in tok.decode(n))
        assert record["predicted"] == tok.decode(new).split("\n")[0].strip()
    (line,) = [json.loads(s) for s in open(metrics)]
    expected = squad.squad_scores(run["squad_rows"], squad.predictions_lookup({r["id"]: r["predicted"] for r in shown}))
    assert line["task"] == "squad" and line["iteration"] == 2 and line["examples"] == 2
    assert line["exact_match"] == expected["exact_match"] and line["f1"] == expected["f1"]


def test_mtpb_end_to_end_generates_and_runs_programs(run, tmp_path, capsys):
    out = tmp_path / "mtpb.json"
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "mtpb", "--limit", "1", "--max-new-tokens", "8",
                    "--output", str(out), "--timeout", "5", "--jobs", "2"]) == 0
    assert "pass rate" in capsys.readouterr().out.splitlines()[-1]
    result = json.loads(out.read_text())
    assert set(result) >= {"pass_rate", "problems", "cases"} and 0.0 <= result["pass_rate"] <= 1.0
    assert list(result["problems"]) == ["1"] and len(result["cases"]) == 5
    for case in result["cases"]:  # each program: the prefix, the four prompts as comments, generated code
        assert case["program"].startswith(PREFIX) and case["program"].count("\n# ") >= 3
        assert case["status"] in ("ok", "error", "timeout", "crashed") and isinstance(case["passed"], bool)
    assert len({c["program"] for c in result["cases"]}) == 5  # the filled-in prompts differ per input
    problem = read_jsonl(ev.DEFAULT_MTPB, 1)[0]
    skeletons = {mtpb.assemble(mtpb.filled_prompts(problem, k), [""] * len(problem["prompts"])) for k in range(5)}
    assert any(case["program"] not in skeletons for case in result["cases"])  # the model wrote code


def test_loss_end_to_end_against_manual_log_likelihoods(run, tmp_path, capsys):
    metrics = str(tmp_path / "metrics.jsonl")
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "loss", "--data", run["heldout"], "--limit", "2",
                    "--metrics", metrics]) == 0
    assert "perplexity" in capsys.readouterr().out.splitlines()[-1]
    assert ev.main(["--checkpoint", run["ckpt"], "--task", "loss", "--data", run["heldout"], "--metrics", metrics]) == 0
    short, everything = [json.loads(s) for s in open(metrics)]
    reader = open_checkpoint(run["ckpt"])
    model = GPTModel(model_config_of(reader))
    load_weights(reader, [model])
    model.eval()
    tok = load_tokenizer(run["tok"])
    total = tokens = 0
    docs = [json.loads(s)["text"] for s in open(run["heldout"])]
    for text in docs[:2]:
        ids = [tok.eod] + tok.encode(text)
        assert len(ids) <= 128  # one window: the plain causal loss of the whole document
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :, :tok.vocab_size].double()
        logp = torch.log_softmax(logits[:-1], -1)
        total -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        tokens += len(ids) - 1
    assert short["task"] == "loss" and short["tokens"] == tokens and short["examples"] == 2
    assert short["loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert short["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-3)
    long_tokens = len(tok.encode(docs[2]))
    assert long_tokens > 3 * 128 and everything["tokens"] == tokens + long_tokens  # windows: each token once


def test_every_task_gives_the_same_result_batched_as_one_at_a_time(run):
    """Each task's model callable at --batch-size 1 (generate / score one at a time) and batched, on rows of
    different lengths: the same generations, programs and picks; the same scores to fp32 rounding."""
    from megagopher.evaluation import choice, loss, math_task, squad
    from megagopher.evaluation.common import call_batch
    from megagopher.generate import load_model
    lm = load_model(run["ckpt"])
    math_rows = read_jsonl(run["math"]) + [{"question": r["question"][:40], "answer": "1"} for r in run["rows"]]
    heldout = read_jsonl(run["heldout"])
    problems = read_jsonl(ev.DEFAULT_MTPB, 2)
    cases = [(p, k, mtpb.filled_prompts(p, k)) for p in problems for k in range(len(p["inputs"]))]
    results = {}
    for batch_size in (1, 4):
        seen = {"math": [], "choice": [], "squad": [], "loss": []}
        results[batch_size] = {
            "math": ev.math_accuracy(math_rows, math_task.math_completer(lm, 24, batch_size), seen["math"].append),
            "choice": ev.choice_accuracy(run["choice_rows"], choice.model_loglik(lm, batch_size),
                                         seen["choice"].append),
            "squad": squad.squad_scores(run["squad_rows"], squad.model_predictor(lm, 12, batch_size),
                                        seen["squad"].append),
            "loss": loss.model_loss(lm, heldout, seen["loss"].append, batch_size),
            "mtpb": call_batch(mtpb.model_turns(lm, 10, batch_size), cases), "seen": seen}
    one, batched = results[1], results[4]
    assert len({len(r["generated"]) for r in one["seen"]["math"]}) > 1  # rows stop at different steps
    for task in ("math", "squad", "mtpb"):
        assert batched[task] == one[task], task
    assert batched["seen"]["math"] == one["seen"]["math"] and batched["seen"]["squad"] == one["seen"]["squad"]
    assert batched["choice"] == one["choice"]
    for a, b in zip(batched["seen"]["choice"], one["seen"]["choice"]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4) and a["predicted"] == b["predicted"]
    assert batched["loss"]["tokens"] == one["loss"]["tokens"]
    assert batched["loss"]["loss"] == pytest.approx(one["loss"]["loss"], rel=1e-5)
    assert any(turn.strip() for turns in one["mtpb"] for turn in turns)  # the model wrote code


def test_progress_line_and_prompt_prefix(capsys):
    import io
    from megagopher.generate import text_prompt_ids
    from megagopher.generation.progress import Progress
    stream = io.StringIO()
    progress = Progress(4, "megagopher.evaluate: math", every=0.0, stream=stream, enabled=True)
    progress(1)
    progress.advance(3)
    first, last = stream.getvalue().splitlines()
    assert first.startswith("megagopher.evaluate: math: 1/4 examples (25%), ") and "examples/s, ETA 0:00:0" in first
    assert last.startswith("megagopher.evaluate: math: 4/4 examples (100%), ") and "done in 0:00:0" in last
    quiet = io.StringIO()
    Progress(2, "x", every=60.0, stream=quiet, enabled=True)(2)
    assert quiet.getvalue() == ""  # a short run prints nothing

    class Tok:
        bos, add_bos = 1, True

        def encode(self, text):
            return [ord(c) for c in text]
    assert text_prompt_ids(Tok(), "ab") == [1, 97, 98]  # BOS first, as AutoTokenizer adds it
    Tok.add_bos = False
    assert text_prompt_ids(Tok(), "ab") == [97, 98]  # GPT-2 BPE: the text alone


def test_generate_prompts_file(run, tmp_path, capsys):
    from megagopher import generate as gen
    lm = gen.load_model(run["ckpt"])
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Ava buys 3 pens"}\n{"prompt_ids": [5, 17, 42]}\n{"prompt": "The machine"}\n')
    assert gen.main(["--checkpoint", run["ckpt"], "--prompts-file", str(path), "--max-new-tokens", "5",
                     "--batch-size", "2"]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    expected = [gen.generate(lm, ids, 5) for ids in (lm.tokenizer.encode("Ava buys 3 pens"), [5, 17, 42],
                                                      lm.tokenizer.encode("The machine"))]
    assert [line["index"] for line in lines] == [0, 1, 2] and [line["new_ids"] for line in lines] == expected
    assert [line["text"] for line in lines] == [lm.tokenizer.decode(ids) for ids in expected]
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert gen.main(["--checkpoint", run["ckpt"], "--prompts-file", str(path)]) == 2
    assert "prompts.jsonl prompt 2: expected" in capsys.readouterr().err
