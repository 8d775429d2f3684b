"""MTPB-style multi-turn program synthesis (the Multi-Turn Programming Benchmark of CodeGen, Nijkamp et al.
2022; salesforce/CodeGen codegen1/benchmark: mtpb_sample.py writes programs, mtpb_exec.py scores them).

Problems, one JSON object a line, in MTPB's own format: {"id", "name", "description", "category" (these
three optional), "prompts": [turn strings with {placeholders}], "inputs": [dicts placeholder -> value, one
per test case (MTPB has 5)], "outputs": [the expected value of each test case], "max_gen_length": tokens
per turn}. megagopher/evaluation/mtpb_problems.jsonl is a small set written for this project (the default
of --data); mtpb_reference.jsonl holds its reference programs.

A test case's prompts are filled in (``prompt.format(**inputs[k])``). The program starts with MTPB's
prefix ("# Import libraries.\\n\\nimport numpy as np\\n\\n"); each turn appends its prompt as a comment
("# " + prompt + "\\n"), the model writes that turn's code (greedy, up to max_gen_length tokens, stopping
at a line that starts with "#", ''' or \"\"\", at two blank lines or the end-of-document id), the code is cut
as MTPB's ``truncate`` cuts it (also before a second top-level ``print`` or ``def``) and appended with a
blank line. Every test case's turn t is written in one batch (megagopher.generate.generate_batch,
``--batch-size`` rows a forward), turn after turn, since turn t's prompt holds the code of the turns before
it. ``--samples FILE`` gives the turns' code instead, no model: lines {"id", "input_index",
"turns": [code, ...]}, one per test case.

The whole program runs in megagopher.sandbox. As in mtpb_exec.py: when its last statement is not a print
call, its value (a bare expression, or an assignment's right side) is wrapped in ``print``; the first
argument of the last print call is the program's output, and an exception after that print does not
fail the case (MTPB's exec ignores it), while a time-out or a crash does. The output is compared with the
expected value by MTPB's check_equivalence: numpy values become Python ones (a pandas Series is compared
with np.allclose), a list of tuples becomes a list of lists, a value of another type than the expected
one is cast to it (a boolean is compared as a string instead: bool("False") is True), floats match
within 1e-6, and str, int, set, list, bool and tuple compare with ==; other types fail.

The result: ``pass_rate`` (passed test cases / test cases), ``problems`` {id: fraction of its test cases
passed}, and ``cases`` (each one's id, input_index, passed, status, error and printed value).
"""
import ast
import re
from concurrent.futures import ThreadPoolExecutor

from megagopher.evaluation.common import call_batch, check_batch_size, progress_line, prompt_ids, with_batch
from megagopher.sandbox import Limits, run_program

PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"
_TERMINALS = re.compile(r"^#|^'''|^\"\"\"|\n\n\n", re.MULTILINE)
_FLOAT_TOLERANCE = 1e-6


def check_problem(row, index=0):
    where = f"problem {row.get('id', index)!r}"
    missing = [k for k in ("id", "prompts", "inputs", "outputs") if k not in row]
    if missing:
        raise ValueError(f"{where}: an MTPB problem needs 'id', 'prompts', 'inputs' and 'outputs'; missing {missing}")
    prompts, inputs = row["prompts"], row["inputs"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{where}: 'prompts' must be a non-empty list of strings")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(d, dict) for d in inputs):
        raise ValueError(f"{where}: 'inputs' must be a non-empty list of objects (placeholder -> value)")
    if not isinstance(row["outputs"], list) or len(row["outputs"]) != len(inputs):
        raise ValueError(f"{where}: 'outputs' must list one value per input ({len(inputs)})")
    mgl = row.get("max_gen_length", 128)
    if not isinstance(mgl, int) or isinstance(mgl, bool) or mgl < 1:
        raise ValueError(f"{where}: 'max_gen_length' must be a positive integer, got {mgl!r}")
    for k in range(len(inputs)):
        filled_prompts(row, k)


def filled_prompts(problem, k):
    try:
        return [p.format(**problem["inputs"][k]) for p in problem["prompts"]]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"problem {problem['id']!r} input {k}: its prompts cannot be filled in ({e!r})") from None


def comment(prompt):
    return f"# {prompt}\n"


def truncate(completion):
    """MTPB's cut of one turn's generated code: before a second top-level print or def, then before the
    first terminal (a line starting with #, ''' or \"\"\", or two blank lines)."""
    for keyword in ("print", "def"):
        starts = [m.start() for m in re.finditer(f"^{keyword}", completion, re.MULTILINE)]
        if len(starts) > 1:
            completion = completion[:starts[1]]
    match = _TERMINALS.search(completion)
    return completion[:match.start()] if match else completion


def assemble(prompts, turns):
    """The program: MTPB's prefix, then each turn's prompt as a comment and its code and a blank line."""
    return PREFIX + "".join(comment(p) + f"{truncate(t)}\n\n" for p, t in zip(prompts, turns))


def print_last_value(code):
    """mtpb_exec.py's rewrite_ast_with_print: unless the program ends with a print call, the value of its
    last statement (a bare expression, an assignment's right side) is wrapped in print. A program that
    does not parse is returned as it is (running it reports the syntax error)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    if not tree.body:
        return code
    last = tree.body[-1]
    value = getattr(last, "value", None)
    if not isinstance(value, ast.expr):
        return code
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id.startswith("print"):
        return code
    last.value = ast.Call(func=ast.Name(id="print", ctx=ast.Load()), args=[value], keywords=[])
    return ast.unparse(ast.fix_missing_locations(tree))


def check_equivalence(value, expected, is_array=False):
    """mtpb_exec.py's check_equivalence on a Python value (numpy ones are converted in the sandbox)."""
    if is_array:
        import numpy as np
        try:
            return bool(np.allclose(np.asarray(value), np.asarray(expected)))
        except (TypeError, ValueError):
            return False
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        value = [list(t) for t in value]
    if type(value) is not type(expected):
        if type(expected) is bool:
            value, expected = str(value), str(expected)
        else:
            try:
                value = type(expected)(value)
            except (TypeError, ValueError, OverflowError):
                return False
    if type(value) in (str, int, set, list, bool, tuple):
        return value == expected
    if type(value) is float:
        return abs(value - expected) < _FLOAT_TOLERANCE
    return False  # MTPB raises "Unsupported type", which fails the case


def case_passes(result, expected):
    """(passed, why) for one sandbox Result against the expected output."""
    if result.status in ("timeout", "crashed"):
        return False, f"{result.status}: {result.error}"
    if not result.printed:
        return False, result.error or "nothing was printed"
    if result.value_literal:
        return check_equivalence(result.value, expected, result.value_is_array), result.error
    if type(expected) is str:  # a value with no literal repr: its str() is all that came back
        return result.value_str == expected, result.error
    return False, f"the printed value {result.value_str[:200]!r} is no Python literal"


def score_programs(problems, turns_for, limits=None, on_case=None, run=run_program, jobs=1):
    """Runs every test case's program; ``turns_for(problem, k, prompts) -> [code of each turn]``. The
    programs are written first (in order: the model is not shared between threads), then run ``jobs`` at a
    time (each in its own sandboxed process; a thread only waits on it)."""
    for i, problem in enumerate(problems):
        check_problem(problem, i)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs = {jobs!r} must be a positive integer")
    limits = limits or Limits(wall_s=10.0)
    cases = [(problem, k, filled_prompts(problem, k)) for problem in problems for k in range(len(problem["inputs"]))]
    cases_to_run = [(str(problem["id"]), k, problem["outputs"][k], print_last_value(assemble(prompts, turns)))
                    for (problem, k, prompts), turns in zip(cases, call_batch(turns_for, cases))]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda case: run(case[3], limits), cases_to_run)
        cases, per_problem = [], {}
        progress = progress_line("mtpb", len(cases_to_run), "programs")
        for (pid, k, expected, program), result in zip(cases_to_run, results):
            progress.advance()
            passed, why = case_passes(result, expected)
            case = {"id": pid, "input_index": k, "passed": passed, "status": result.status, "error": why,
                    "printed": (result.value_str or "")[:500], "program": program}
            cases.append(case)
            per_problem.setdefault(pid, []).append(passed)
            if on_case is not None:
                on_case(case)
    passed = sum(c["passed"] for c in cases)
    return {"pass_rate": passed / len(cases), "passed": passed, "test_cases": len(cases),
            "problems": {pid: sum(v) / len(v) for pid, v in per_problem.items()}, "cases": cases}


def samples_lookup(rows, problems, path="samples"):
    """``turns_for`` reading MTPB samples {"id", "input_index", "turns"}; every test case of ``problems``
    must have one, with one turn per prompt."""
    by_case = {}
    for i, row in enumerate(rows):
        if "id" not in row or not isinstance(row.get("input_index"), int) or not isinstance(row.get("turns"), list) \
                or not all(isinstance(t, str) for t in row["turns"]):
            raise ValueError(f"{path} line {i + 1}: a sample needs 'id', an integer 'input_index' and 'turns' "
                             f"(a list of code strings), got keys {sorted(row)}")
        by_case[(str(row["id"]), row["input_index"])] = row["turns"]
    for problem in problems:
        for k in range(len(problem["inputs"])):
            turns = by_case.get((str(problem["id"]), k))
            if turns is None:
                raise ValueError(f"{path}: no sample for problem {problem['id']!r} input_index {k}")
            if len(turns) != len(problem["prompts"]):
                raise ValueError(f"{path}: problem {problem['id']!r} input_index {k} has {len(turns)} turns; "
                                 f"the problem has {len(problem['prompts'])} prompts")
    return lambda problem, k, prompts: by_case[(str(problem["id"]), k)]


def model_turns(lm, max_new_tokens=None, batch_size=32):
    """``turns_for(problem, k, prompts)``, with ``turns_for.batch`` over many test cases: each turn written
    greedily with the model (see the module docstring), at most the problem's max_gen_length tokens (and
    ``max_new_tokens`` when given); turn t of every case in one generate_batch call."""
    from megagopher.generate import context_limit, generate_batch
    tok = lm.tokenizer
    limit = context_limit(lm)
    check_batch_size(batch_size)

    def stop(new_ids):
        text = tok.decode(new_ids)
        return truncate(text) != text

    def turns_all(cases):
        rooms = [min(problem.get("max_gen_length", 128), max_new_tokens or limit, limit // 2)
                 for problem, _, _ in cases]
        histories, turns = [PREFIX] * len(cases), [[] for _ in cases]
        progress = progress_line("mtpb", sum(len(prompts) for _, _, prompts in cases), "turns")
        done = 0
        for t in range(max((len(prompts) for _, _, prompts in cases), default=0)):
            live = [i for i, (_, _, prompts) in enumerate(cases) if t < len(prompts)]
            for i in live:
                histories[i] += comment(cases[i][2][t])
            new = generate_batch(lm, [prompt_ids(tok, histories[i], rooms[i], limit) for i in live],
                                 [rooms[i] for i in live], eod=tok.eod, stop=stop, batch_size=batch_size,
                                 progress=lambda n, base=done: progress(base + n))
            done += len(live)
            for i, ids in zip(live, new):
                code = truncate(tok.decode(ids))
                turns[i].append(code)
                histories[i] += f"{code}\n\n"
        return turns
    return with_batch(lambda problem, k, prompts: turns_all([(problem, k, prompts)])[0], turns_all)
