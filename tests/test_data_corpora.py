"""Offline corpora: math word problems (every equation re-checked, answers extracted, held-out split)
and the stdlib general-text / code corpora (deduplicated, deterministic), via tools/make_corpora.py."""
import ast
import json
import os
import random
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from megagopher.data.math_problems import (FAMILIES, extract_answer, generate_problem, generate_problems,
                                           make_math_splits)
from megagopher.data.stdlib_corpus import extract_prose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"\$?\d+(?:\.\d+)?"
EQUATION = re.compile(rf"((?:{NUMBER}\s*[-+*/]\s*)+{NUMBER})\s*=\s*\$?(\d+(?:\.\d+)?)")


def check_arithmetic(row):
    """Every solution line holds one equation, each one true in exact arithmetic, the last one giving
    the answer; the text is question, steps, then 'The answer is N.'"""
    lines = row["text"].split("\n")
    assert lines[0] == row["question"] and lines[-1] == f"The answer is {row['answer']}."
    steps = lines[1:-1]
    assert len(steps) == row["steps"], row["text"]
    for line in steps:
        (lhs, rhs), = EQUATION.findall(line)
        value = eval(re.sub(r"\$?(\d+(?:\.\d+)?)", r"Fraction('\1')", lhs), {"Fraction": Fraction})
        assert value == Fraction(rhs), line
    assert Fraction(EQUATION.findall(steps[-1])[0][1]) == Fraction(row["answer"])


def test_every_family_and_level_is_correct():
    for family in FAMILIES:
        for steps in (1, 2, 3, 4):
            for i in range(60):
                row = generate_problem(random.Random(f"{family}-{steps}-{i}"), steps, family)
                assert row["steps"] == steps and row["family"] == family
                check_arithmetic(row)
                assert extract_answer(row["text"]) == row["answer"]
                assert re.fullmatch(r"\d+(\.\d+)?", row["answer"]) and not row["answer"].endswith("0") or \
                    "." not in row["answer"]


def test_generator_is_deterministic_varied_and_held_out():
    a, b = generate_problems(300, seed=1), generate_problems(300, seed=1)
    assert a == b and a != generate_problems(300, seed=2)
    assert {r["family"] for r in a} == set(FAMILIES) and {r["steps"] for r in a} == {1, 2, 3, 4}
    train, held_out = make_math_splits(2000, 300, seed=0)
    assert len(train) == 2000 and len(held_out) == 300
    train_q = [r["question"] for r in train]
    assert len(set(train_q)) == 2000 and not set(train_q) & {r["question"] for r in held_out}
    assert make_math_splits(2000, 300, seed=0) == (train, held_out)


@pytest.mark.parametrize("text, answer", [
    ("Step one.\nThe answer is 42.", "42"),
    ("So the total is $1,200.50.\nThe answer is $1,200.50", "1200.5"),
    ("The answer is 7.0. Later 9 appears", "7"),
    ("the answer is: -3", "-3"),
    ("no marker, but 12 then 3.25 apples", "3.25"),
    ("no digits at all", None),
    ("The answer is 12. Wait, the answer is 15.", "15"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_prose_extraction_skips_strings_and_code():
    src = '''"""Module docstring that explains what this module is for, in words."""
# A comment block that explains the reasoning behind the next function,
# spread over two lines of ordinary English text.
x = """
# not a comment: inside a string literal, long enough to count as prose otherwise
"""
def f():
    """Function docstring describing the behaviour of f in a sentence or two."""
    # y = compute(x) + 1
    return 1
'''
    paragraphs = extract_prose(src, ast.parse(src))
    assert paragraphs[0].startswith("Module docstring")
    assert paragraphs[1] == ("A comment block that explains the reasoning behind the next function, "
                             "spread over two lines of ordinary English text.")
    assert paragraphs[2].startswith("Function docstring")
    assert not any("inside a string" in p for p in paragraphs)


def test_make_corpora_tool(tmp_path):
    outs = []
    for name in ("a", "b"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools/make_corpora.py"), "--output-dir",
                            str(tmp_path / name), "--seed", "3", "--math-train", "300", "--math-eval", "40",
                            "--max-mb", "0.3"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append({f: open(tmp_path / name / f, "rb").read() for f in sorted(os.listdir(tmp_path / name))})
    assert outs[0] == outs[1]                                         # deterministic per seed
    assert sorted(outs[0]) == ["code.jsonl", "general.jsonl", "math_eval.jsonl", "math_train.jsonl"]
    rows = {f[:-6]: [json.loads(line) for line in data.decode().splitlines()] for f, data in outs[0].items()}
    assert len(rows["math_train"]) == 300 and len(rows["math_eval"]) == 40
    for row in rows["math_train"][:50] + rows["math_eval"]:
        check_arithmetic(row)
    for corpus in ("general", "code"):
        texts = [r["text"] for r in rows[corpus]]
        assert len(texts) >= 5 and len(set(texts)) == len(texts)
        assert 0.15e6 < sum(len(t.encode()) for t in texts) <= 0.3e6  # filled up to the cap, not over
    for text in [r["text"] for r in rows["code"]]:
        ast.parse(text)                                               # code rows are real Python
    paragraphs = [" ".join(p.casefold().split()) for r in rows["general"] for p in re.split(r"\n[ \t]*\n", r["text"])]
    long = [p for p in paragraphs if len(p) >= 40]
    assert len(long) > 100 and len(set(long)) == len(long)          # paragraph-level dedup
