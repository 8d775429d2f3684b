"""The lm-evaluation-harness adapter (megagopher/evaluation/lm_eval_adapter.py, megagopher/lm_eval.py) against
our own evaluation and one-at-a-time generation: three lm_eval tasks defined on local JSONL files (multiple
choice, generate_until, loglikelihood_rolling) run through lm_eval.simple_evaluate with the model found by
name in lm_eval's registry, offline; and once through ``python -m megagopher.lm_eval``."""
import functools
import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import lm_eval  # the test extra installs it (setup.py extras "eval" and "test")
import pytest
from lm_eval.tasks import TaskManager

import megagopher.evaluation.lm_eval_adapter  # noqa: F401  registers the model "megagopher" with lm_eval
from megagopher.data.math_problems import make_math_splits
from megagopher.data.tokenizer import load_tokenizer
from megagopher.evaluation.choice import choice_accuracy, model_loglik
from megagopher.evaluation.loss import model_loss
from megagopher.generate import generate, load_model
from train_utils import ROOT, bpe_tokenizer_dir, run_train, write_config

CONTEXT = 128         # the model's seq_length: the long document below needs several windows
MAX_GEN = 12
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
TOL = {"rel": 1e-5, "abs": 1e-5}  # batched vs one-at-a-time fp32 sums of a few dozen log-probabilities

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: {output_type}
"""
CHOICE = """doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN = """doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [{until}]
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
  - metric: exact_match
"""
ROLLING = """doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
"""


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def pick_stop(text):
    """A two-character stop string first found halfway through ``text``, so generation stops early."""
    for k in range(len(text) // 2, len(text) - 1):
        if text[k:k + 2].strip() and text.find(text[k:k + 2]) == k:
            return text[k:k + 2]
    raise AssertionError(f"no stop string in {text!r}")


def write_tasks(tmp, lm, questions, math_rows):
    """The three task YAMLs and their data; returns (task dir, the rows of each task, the stop string)."""
    choice = [{"question": q, "choices": [r["answer"] + " dollars", "blue", "the " + r["answer"]], "answer": i % 3}
              for i, (q, r) in enumerate(zip(questions, math_rows))]
    gen = [{"question": q, "answer": r["answer"]} for q, r in zip(questions, math_rows)]
    long_doc = " ".join(r["text"] for r in math_rows)
    rolling = [{"text": questions[0]}, {"text": long_doc}, {"text": questions[1]}]
    tok = lm.tokenizer
    assert len(tok.encode(long_doc)) > 3 * CONTEXT  # several windows
    full = tok.decode(generate(lm, tok.document_prefix + tok.encode(questions[0]), MAX_GEN))
    until = pick_stop(full)
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, rows, output_type, body in (
            ("mg_choice", choice, "multiple_choice", CHOICE),
            ("mg_gen", gen, "generate_until", GEN.format(until=json.dumps(until), max_gen=MAX_GEN)),
            ("mg_rolling", rolling, "loglikelihood_rolling", ROLLING)):
        data = write_jsonl(tmp / f"{name}.jsonl", rows)
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data, output_type=output_type,
                                                      cache=tmp / "hf_datasets") + body)
    return str(tasks), {"mg_choice": choice, "mg_gen": gen, "mg_rolling": rolling}, until


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A 2-step run with a BPE tokenizer trained here, the three tasks, and lm_eval's results on them."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    train, heldout = make_math_splits(40, 6, seed=3)
    tok_dir = bpe_tokenizer_dir(str(tmp / "tok"), (r["text"] for r in train), 300)
    ckpt = str(tmp / "ckpt")
    run_train(write_config(tmp), str(tmp / "run"), f"--checkpoint.dir={ckpt}", "--training.train_iters=2",
              "--model.num_layers=2", f"--model.seq_length={CONTEXT}", "--model.init_std=0.3",
              f"--model.vocab_size={load_tokenizer(tok_dir).vocab_size}", f"--data.tokenizer_dir={tok_dir}")
    lm = load_model(ckpt, need_tokenizer=True)
    tasks, rows, until = write_tasks(tmp, lm, [r["question"] for r in heldout], heldout)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        results = lm_eval.simple_evaluate(
            model="megagopher", model_args={"checkpoint": ckpt, "batch_size": 4, "device": "cpu"},
            tasks=["mg_choice", "mg_gen", "mg_rolling"], log_samples=True,
            task_manager=TaskManager(include_path=tasks, include_defaults=False))  # skips indexing lm_eval's own
    samples = {name: sorted(s, key=lambda s: s["doc_id"]) for name, s in results["samples"].items()}
    return SimpleNamespace(tmp=tmp, ckpt=ckpt, lm=lm, tasks=tasks, rows=rows, until=until, results=results,
                           samples=samples)


def test_loglikelihoods_equal_the_choice_task(harness):
    rows, samples = harness.rows["mg_choice"], harness.samples["mg_choice"]
    seen = []
    ours = choice_accuracy(rows, model_loglik(harness.lm), seen.append)
    assert len(samples) == len(rows) == len(seen)
    for sample, row, record in zip(samples, rows, seen):
        assert [tuple(a) for a in sample["arguments"]] == [(row["question"], " " + c) for c in row["choices"]]
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(record["scores"], **TOL)
    assert harness.results["results"]["mg_choice"]["acc,none"] == ours["accuracy"]


def test_is_greedy_against_greedy_generation(harness):
    """loglikelihood's second value: true exactly when greedy decoding produces the continuation."""
    from megagopher.evaluation.lm_eval_adapter import MegagopherLM
    adapter = MegagopherLM(checkpoint=harness.ckpt, device="cpu", batch_size=2)
    tok = harness.lm.tokenizer
    context = harness.rows["mg_gen"][0]["question"]
    greedy = generate(harness.lm.model, tok.document_prefix + tok.encode(context), 4)  # no end-of-document stop
    other = greedy[:-1] + [(greedy[-1] + 1) % tok.vocab_size]
    pairs = [(context, tok.decode(ids)) for ids in (greedy, other)]
    assert [adapter.encode_pairs([p])[0][1] for p in pairs] == [greedy, other]  # the text round-trips to the ids
    results = adapter.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    assert [r[1] for r in results] == [True, False]
    expected = model_loglik(harness.lm)
    assert [r[0] for r in results] == pytest.approx([expected(*p) for p in pairs], **TOL)


def test_rolling_loglikelihood_equals_the_loss_task(harness):
    rows, samples = harness.rows["mg_rolling"], harness.samples["mg_rolling"]
    seen = []
    model_loss(harness.lm, rows, seen.append)
    assert len(samples) == len(rows) and max(r["tokens"] for r in seen) > 3 * CONTEXT
    nll = [r["loss"] * r["tokens"] for r in seen]
    assert [-s["resps"][0][0] for s in samples] == pytest.approx(nll, **TOL)


def test_generate_until_equals_one_at_a_time_generation_cut_at_the_stop(harness):
    rows, samples, until = harness.rows["mg_gen"], harness.samples["mg_gen"], harness.until
    tok, cut = harness.lm.tokenizer, 0
    for sample, row in zip(samples, rows):
        assert sample["arguments"][0][0] == row["question"]
        full = tok.decode(generate(harness.lm, tok.document_prefix + tok.encode(row["question"]), MAX_GEN))
        assert sample["resps"][0][0] == full.split(until)[0]
        cut += until in full
    assert cut >= 1  # the stop string ended at least one row early


def _tp2_worker(rank, world, ckpt, tasks):
    results = lm_eval.simple_evaluate(
        model="megagopher", model_args={"checkpoint": ckpt, "tp": 2, "batch_size": 4, "device": "cpu"},
        tasks=["mg_choice", "mg_gen", "mg_rolling"], log_samples=True,
        task_manager=TaskManager(include_path=tasks, include_defaults=False))
    if results is None:  # lm_eval builds the results on LOCAL_RANK 0 only
        return None
    return {name: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for name, samples in results["samples"].items()}


def test_tp2_every_rank_runs_every_request_and_rank_0_reports(harness):
    from megagopher.testing import spawn
    r0, r1 = spawn(_tp2_worker, 2, harness.ckpt, harness.tasks)
    assert r1 is None and sorted(r0) == ["mg_choice", "mg_gen", "mg_rolling"]
    for name in r0:
        serial = [s["resps"] for s in harness.samples[name]]
        assert len(r0[name]) == len(serial)
        for tp_resps, resps in zip(r0[name], serial):
            if name == "mg_gen":
                assert tp_resps == resps
            elif name == "mg_choice":  # TP sums the logits' partial products in another order
                assert [r[0][0] for r in tp_resps] == pytest.approx([r[0][0] for r in resps], abs=1e-4)
            else:
                assert tp_resps[0][0] == pytest.approx(resps[0][0], abs=1e-4)


def test_cli_writes_the_results(harness):
    out = harness.tmp / "cli_out"
    proc = subprocess.run(
        [sys.executable, "-m", "megagopher.lm_eval", "--model", "megagopher", "--model_args",
         f"checkpoint={harness.ckpt},batch_size=4", "--tasks", "mg_choice", "--include_path", harness.tasks,
         "--output_path", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", **OFFLINE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        written = json.load(f)
    assert written["results"]["mg_choice"]["acc,none"] == harness.results["results"]["mg_choice"]["acc,none"]
    assert written["config"]["model"] == "megagopher"


def test_model_args_bad_input_and_a_missing_harness(harness, tmp_path, capsys, monkeypatch):
    from megagopher import lm_eval as cli
    from megagopher.evaluation.lm_eval_adapter import MegagopherLM
    # model_args win over the harness's own --batch_size (text on the command line, 1 when not given).
    assert MegagopherLM.create_from_arg_string(f"checkpoint={harness.ckpt},batch_size=5",
                                               {"batch_size": 1, "device": "cpu"}).batch_size == 5
    assert MegagopherLM.create_from_arg_obj({"checkpoint": harness.ckpt}, {"batch_size": "3"}).batch_size == 3
    for args, message in (({}, "checkpoint=DIR is required"), ({"dtype": "fp8"}, "dtype='fp8'"),
                          ({"batch_size": "auto"}, "batch_size='auto'"), ({"device": "tpu"}, "device='tpu'"),
                          ({"max_length": 10 ** 6}, "the model's context is")):
        with pytest.raises(ValueError, match=message):
            MegagopherLM(**({"checkpoint": harness.ckpt} if args else {}), **args)
    # The command line: one error line and status 2. (Indexing lm_eval's thousands of own tasks, which it
    # does before making the model, is left out here: test_cli_writes_the_results runs the whole CLI.)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    args = ["--model", "megagopher", "--tasks", "mg_choice", "--include_path", harness.tasks, "--device", "cpu"]
    assert cli.main(args + ["--model_args", f"checkpoint={tmp_path / 'none'}"]) == 2
    assert any(line.startswith("megagopher.lm_eval: error:") and "none" in line
               for line in capsys.readouterr().err.splitlines())
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm_eval not installed
    monkeypatch.delitem(sys.modules, "megagopher.evaluation.lm_eval_adapter")
    assert cli.main(args) == 2
    assert "pip install megagopher[eval]" in capsys.readouterr().err
