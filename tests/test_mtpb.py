"""megagopher.evaluation.mtpb: MTPB's rules (the last value printed, check_equivalence's conversions and
casts, the turn truncation) on crafted cases; the shipped problems in MTPB's format, whose reference
programs pass every test case in the sandbox while wrong ones fail; the command line without a model.
(The end-to-end run with a tiny checkpoint is in test_evaluate.py, beside the model it trains.)"""
import copy
import json
import os

import pytest

from megagopher import evaluate as ev
from megagopher.evaluation import mtpb
from megagopher.evaluation.common import read_jsonl
from megagopher.sandbox import Limits

HERE = os.path.dirname(os.path.abspath(mtpb.__file__))
PROBLEMS, REFERENCE = os.path.join(HERE, "mtpb_problems.jsonl"), os.path.join(HERE, "mtpb_reference.jsonl")
LIMITS = Limits(wall_s=5.0)
# Each program (a process importing numpy) must finish within 5 s: no other test runs meanwhile
# (tests/machine_share.py).
pytestmark = pytest.mark.alone


def test_check_equivalence_follows_mtpb():
    eq = mtpb.check_equivalence
    assert eq(3, 3) and not eq(3, 4)
    assert eq("5", 5) and eq(5.7, 5)                      # cast to the expected type (int(5.7) == 5)
    assert eq(True, True) and eq("True", True) and not eq(1, True) and not eq("False", True)  # as strings
    assert eq(0.1 + 0.2, 0.3) and eq(0.3 + 5e-7, 0.3) and not eq(0.3 + 2e-6, 0.3)            # within 1e-6
    assert eq(4, 4.0) and eq((1, 2), [1, 2]) and eq([(1, 2), (3, 4)], [[1, 2], [3, 4]])
    assert eq({1, 2}, {2, 1}) and not eq([1, 2], [2, 1])
    assert not eq("abc", 1) and not eq(None, 1)            # a failed cast fails the case
    assert not eq({"a": 1}, {"a": 1})                      # MTPB: "Unsupported type"
    assert eq([1.0, 2.0000001], [1, 2], is_array=True) and not eq([1.0, 2.1], [1, 2], is_array=True)


def test_print_last_value_and_truncate_follow_mtpb():
    assert mtpb.print_last_value("def f(a):\n    return a ** 2\nf(2)") == "def f(a):\n    return a ** 2\nprint(f(2))"
    assert mtpb.print_last_value("x = 1\nprint(x)") == "x = 1\nprint(x)"
    assert mtpb.print_last_value("x = 1\ny = x + 1") == "x = 1\ny = print(x + 1)"   # the right side, as MTPB
    assert mtpb.print_last_value("for i in range(3):\n    pass") == "for i in range(3):\n    pass"
    assert mtpb.print_last_value("def f(:") == "def f(:"
    # mtpb_sample.py's own test, then each terminal and the second print / def.
    assert mtpb.truncate("\nif len_a > len_b:\n    result = a\nelse:\n    result = b\n\n\n\n#") == \
        "\nif len_a > len_b:\n    result = a\nelse:\n    result = b"
    assert mtpb.truncate("x = 1\n# next turn\ny = 2") == "x = 1\n"
    assert mtpb.truncate("x = 1\n'''doc'''") == "x = 1\n" and mtpb.truncate('x = 1\n"""doc"""') == "x = 1\n"
    assert mtpb.truncate("print(1)\nprint(2)") == "print(1)\n"
    assert mtpb.truncate("def f():\n    pass\ndef g():\n    pass") == "def f():\n    pass\n"
    assert mtpb.assemble(["Set x.", "Print x."], ["x = 1", "print(x)\n# more"]) == \
        mtpb.PREFIX + "# Set x.\nx = 1\n\n# Print x.\nprint(x)\n\n\n"


def test_the_shipped_problems_are_in_mtpb_format():
    problems = read_jsonl(PROBLEMS)
    assert 8 <= len(problems) <= 12 and len({p["id"] for p in problems}) == len(problems)
    for i, p in enumerate(problems):
        mtpb.check_problem(p, i)
        assert set(p) == {"id", "name", "description", "category", "prompts", "inputs", "outputs", "max_gen_length"}
        assert len(p["inputs"]) == len(p["outputs"]) == 5
        assert "{" in "".join(p["prompts"])  # templated: the inputs fill placeholders
        assert len({tuple(mtpb.filled_prompts(p, k)) for k in range(5)}) == 5


def _cases(problem, keep):
    """``problem`` with only the test cases ``keep`` (indices), renumbered from 0."""
    p = copy.deepcopy(problem)
    p["inputs"], p["outputs"] = [p["inputs"][k] for k in keep], [p["outputs"][k] for k in keep]
    return p


def test_reference_programs_pass_and_wrong_ones_fail():
    # Every problem's first and last test case (each program is a process that imports numpy, so all
    # 50 cost ~10 s; the CLI test below and docs/evaluation.md's command run all of a problem's cases).
    problems = read_jsonl(PROBLEMS)
    samples = {(str(r["id"]), r["input_index"]): r["turns"] for r in read_jsonl(REFERENCE)}
    ends = [_cases(p, [0, 4]) for p in problems]
    seen = []
    result = mtpb.score_programs(ends, lambda p, k, prompts: samples[(str(p["id"]), 4 * k)], LIMITS,
                                 on_case=seen.append, jobs=2)
    failed = [(c["id"], c["input_index"], c["error"]) for c in result["cases"] if not c["passed"]]
    assert result["pass_rate"] == 1.0, failed
    assert set(result["problems"].values()) == {1.0} and result["test_cases"] == 2 * len(problems) == len(seen)
    by_id = {str(p["id"]): p for p in problems}
    wrong = {"1": ["nums = [1, 2, 3]", "squares = nums", "total = sum(squares)", "print(total)"],      # 6, not 14
             "2": ["sentence = 'hello world'", "words = sentence.split()", "raise ValueError('no')", "print(1)"],
             "6": ["word = 'Racecar'", "cleaned = word", "cleaned == cleaned[::-1]"],                     # False
             "9": ["items = [3, 1, 3, 2]", "distinct = items", "unique = tuple(distinct)", "print(unique)"]}
    trimmed = [_cases(by_id[pid], [0]) for pid in wrong]
    bad = mtpb.score_programs(trimmed, lambda p, k, prompts: wrong[str(p["id"])], LIMITS, jobs=2)
    assert bad["pass_rate"] == 0.0 and bad["problems"] == {pid: 0.0 for pid in wrong}
    errors = {c["id"]: c for c in bad["cases"]}
    assert errors["2"]["status"] == "error" and "ValueError" in errors["2"]["error"]
    assert errors["6"]["printed"] == "False" and errors["1"]["printed"] == "6"


def test_bad_problems_and_samples_are_named(tmp_path):
    problem = {"id": 7, "prompts": ["Set x to {x}."], "inputs": [{"x": 1}, {"y": 2}], "outputs": [1, 2]}
    with pytest.raises(ValueError, match="problem 7 input 1: its prompts cannot be filled in"):
        mtpb.check_problem(problem)
    with pytest.raises(ValueError, match="one value per input"):
        mtpb.check_problem(dict(problem, outputs=[1]))
    with pytest.raises(ValueError, match="missing \\['prompts'\\]"):
        mtpb.check_problem({"id": 1, "inputs": [], "outputs": []})
    good = dict(problem, inputs=[{"x": 1}, {"x": 2}])
    with pytest.raises(ValueError, match="no sample for problem 7 input_index 1"):
        mtpb.samples_lookup([{"id": 7, "input_index": 0, "turns": ["x = 1"]}], [good])
    with pytest.raises(ValueError, match="has 2 turns; the problem has 1 prompts"):
        mtpb.samples_lookup([{"id": 7, "input_index": k, "turns": ["x = 1", "y"]} for k in range(2)], [good])


def test_cli_scores_samples_without_a_model(tmp_path, capsys):
    out, metrics = tmp_path / "r" / "mtpb.json", tmp_path / "metrics.jsonl"
    assert ev.main(["--task", "mtpb", "--samples", REFERENCE, "--limit", "1", "--output", str(out), "--jobs", "2",
                    "--metrics", str(metrics), "--show", "1", "--timeout", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    shown = json.loads(printed[0])
    assert shown["index"] == 0 and shown["passed"] and shown["program"].startswith(mtpb.PREFIX)
    assert "pass rate 1.0000 (5/5 test cases)" in printed[-1]
    result = json.loads(out.read_text())
    assert result["pass_rate"] == 1.0 and result["problems"] == {"1": 1.0} and len(result["cases"]) == 5
    (line,) = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert line["event"] == "eval" and line["task"] == "mtpb" and line["pass_rate"] == 1.0
    assert line["checkpoint"] is None and "cases" not in line and line["answers"] == REFERENCE
    assert ev.main(["--task", "mtpb"]) == 2
    assert "--task mtpb needs --checkpoint DIR (or --samples S.jsonl)" in capsys.readouterr().err
    assert ev.main(["--task", "math", "--samples", REFERENCE, "--data", PROBLEMS]) == 2
    assert "--samples is for --task mtpb only" in capsys.readouterr().err
