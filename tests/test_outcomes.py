"""Outcomes and exit statuses have one home, megagopher/errors.py: each ending error maps to its status
(the statuses README and ARCHITECTURE 4.1 name: 2 input, 3 non-finite loss, 4 failed save, 5 lost peer),
and no entry point spells a status as a bare number (an AST scan of megagopher/ and tools/)."""
import ast
import os

import pytest

from megagopher import errors
from megagopher.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMED = {2, 3, 4, 5}  # the statuses errors.py names; 0 (done) and 1 (Python's own failure) stay literal
EXITS = {"exit", "_exit", "SystemExit"}  # sys.exit, os._exit / posix._exit, raise SystemExit
ENTRY_FUNCTIONS = {"main", "_run", "run_command"}  # functions whose return value is a process's exit status


def test_each_ending_error_has_its_status():
    assert (errors.EXIT_INPUT_ERROR, errors.EXIT_NON_FINITE, errors.EXIT_SAVE_FAILED, errors.EXIT_PEER_LOST) == \
        (2, 3, 4, 5)
    assert errors.exit_status(errors.NonFiniteLoss("nan at 7")) == errors.EXIT_NON_FINITE
    assert errors.exit_status(errors.InputError("bad.bin")) == errors.EXIT_INPUT_ERROR
    assert errors.exit_status(ConfigError("model.x = 1")) == errors.EXIT_INPUT_ERROR  # a config error is input
    assert errors.exit_status(errors.SaveFailed("disk full")) == errors.EXIT_SAVE_FAILED
    with pytest.raises(TypeError, match="RuntimeError is not an ending outcome; valid: NonFiniteLoss"):
        errors.exit_status(RuntimeError("other"))


def _literal_statuses(tree):
    """(line, what) of every bare-number status in ``tree``: an exit call with a literal, or a literal
    returned or assigned to ``status`` by a function whose return value is an exit status."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in EXITS and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in NAMED:
                yield node.lineno, f"{name}({node.args[0].value})"
        if isinstance(node, ast.FunctionDef) and node.name in ENTRY_FUNCTIONS:
            for sub in ast.walk(node):
                value = sub.value if isinstance(sub, (ast.Return, ast.Assign)) else None
                if isinstance(value, ast.Constant) and value.value in NAMED and not isinstance(value.value, bool):
                    yield sub.lineno, f"{node.name}: {value.value}"


def test_no_entry_point_spells_a_status_as_a_number():
    bad = []
    for top in ("megagopher", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                path = os.path.join(dirpath, f)
                if not f.endswith(".py") or path.endswith(os.path.join("megagopher", "errors.py")):
                    continue
                tree = ast.parse(open(path, encoding="utf-8").read())
                bad += [f"{os.path.relpath(path, ROOT)}:{line}: {what}" for line, what in _literal_statuses(tree)]
    assert not bad, "exit statuses are megagopher/errors.py's names (EXIT_INPUT_ERROR, ...):\n" + "\n".join(bad)
