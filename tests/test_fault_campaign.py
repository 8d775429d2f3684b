"""The fault-injection campaign for what a run writes and reads back (docs/reliability.md has the table):
every checkpoint artifact damaged every way, signals at every phase, a disk that fills up. Data, tokenizer
and config files are damaged in tests/test_input_faults.py.

Documented outcomes:
  - a damaged checkpoint (metadata.json or a rank's shard) is reported in one line naming it, and the run
    resumes bit-exact from the previous complete one;
  - ``latest``, a half-written ``iter_N.tmp`` and metrics.jsonl damage nothing: the newest complete
    checkpoint is used (unreadable metrics lines are dropped, the file kept as metrics.jsonl.damaged);
    metrics.jsonl replaced by a directory ends the run with status 2 and one line;
  - SIGTERM/SIGINT: a complete checkpoint of the step it stopped after and exit 0, or, before the first
    step, exit 0 with nothing written; SIGKILL: the next run resumes bit-exact;
  - a save that cannot be written leaves the previous checkpoint intact and says so; the run stops with
    status 4 (checkpoint.on_save_error = "stop") or trains on ("continue").
Adding an artifact or a damage to the lists below adds it to the campaign, randomised draw included.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from megagopher.training import checkpoint as ckpt
from train_utils import ROOT, TINY, read_metrics, run_train, write_config

CAMPAIGN = TINY.replace("train_iters = 4\n", "eval_interval = 2\neval_iters = 1\n") + """
[checkpoint]
save_interval = 2
[[stages]]
name = "first"
train_iters = 3
[[stages]]
name = "second"
train_iters = 3
"""
ARGS = ("--model.dropout=0.1",)
INJECT = os.path.join(ROOT, "tests", "fault_injection.py")
RNG_SEED = 20261201


def _run(cfg, run_dir, ckpt_dir, *extra, fault=(), timeout=240):
    """A run with an injected fault (a signal) is a real process; the others, which read damaged artifacts
    and report them, run the trainer's entry point on a pooled rank (tests/pooled_train.py)."""
    args = (f"--checkpoint.dir={ckpt_dir}", "--checkpoint.load=auto", *ARGS, *extra)
    if not fault:
        return run_train(cfg, run_dir, *args, check=False, timeout=timeout)
    cmd = [sys.executable, INJECT, *fault, "--config", cfg, f"--run.dir={run_dir}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _losses(run_dir):
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (checkpoints at 2, 3 (the stage end), 4 and 6) and its losses."""
    tmp = tmp_path_factory.mktemp("campaign")
    cfg = write_config(tmp, CAMPAIGN)
    proc = _run(cfg, str(tmp / "run"), str(tmp / "ckpt"))
    assert proc.returncode == 0, proc.stderr
    assert ckpt.list_checkpoints(str(tmp / "ckpt")) == [2, 3, 4, 6]
    return {"cfg": cfg, "dir": tmp, "losses": _losses(str(tmp / "run"))}


def _resumable(reference, tmp_path, newest=4):
    """A copy of the reference's checkpoints up to ``newest`` and its metrics up to there: a run killed then."""
    root, run_dir = str(tmp_path / "ckpt"), str(tmp_path / "run")
    shutil.copytree(str(reference["dir"] / "ckpt"), root)
    for it in ckpt.list_checkpoints(root):
        if it > newest:
            shutil.rmtree(ckpt.iter_dir(root, it))
    ckpt.write_latest(root)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in read_metrics(str(reference["dir"] / "run")) if r["iteration"] <= newest)
    return root, run_dir


# -- damages ----------------------------------------------------------------------------------------------
def flip_bit(path, rng):
    _xor(path, rng.randrange(os.path.getsize(path)), 1 << rng.randrange(8))


def flip_byte(path, rng):
    _xor(path, rng.randrange(os.path.getsize(path)), rng.randrange(1, 256))


def truncate(path, rng):
    os.truncate(path, rng.randrange(os.path.getsize(path)))


def zero_fill(path, rng):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * size)


def delete(path, rng):
    os.remove(path)


def replace_by_dir(path, rng):
    os.remove(path)
    os.mkdir(path)


def no_permission(path, rng):
    os.chmod(path, 0)


def _xor(path, offset, mask):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


DAMAGES = [flip_bit, flip_byte, truncate, zero_fill, delete, replace_by_dir, no_permission]


def _readable(path):
    return os.path.isfile(path) and os.access(path, os.R_OK)  # root reads files whatever their mode


# -- artifacts: (name, path in a resumable copy, what a resume must show) ----------------------------------
ARTIFACTS = {
    "metadata.json": lambda root, run: os.path.join(ckpt.iter_dir(root, 4), "metadata.json"),
    "rank shard": lambda root, run: os.path.join(ckpt.iter_dir(root, 4), "rank_00000.safetensors"),
    "latest": lambda root, run: os.path.join(root, "latest"),
    "metrics.jsonl": lambda root, run: os.path.join(run, "metrics.jsonl"),
}
FALLS_BACK = {"metadata.json", "rank shard"}


def _expect_resume(reference, proc, run_dir, artifact, damage, path):
    """Checks the documented outcome of a resume after ``damage`` to ``artifact``."""
    lines = (proc.stdout + proc.stderr).splitlines()
    if artifact == "metrics.jsonl" and damage is replace_by_dir:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert [line for line in proc.stderr.splitlines() if line.strip()] == [
            f"megagopher.train: {path}: cannot read the metrics file to resume it (Is a directory)"]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    fell_back = any("cannot be used" in line and ckpt.iter_dir("", 4).strip("/") in line for line in lines)
    harmless = artifact not in FALLS_BACK or (damage is no_permission and _readable(path))
    if artifact in FALLS_BACK and not harmless:
        messages = [line for line in lines if "cannot be used" in line]
        assert len(messages) == 1 and os.path.basename(path) in messages[0], messages
        assert "resumed from" in proc.stdout and "iter_0000003" in proc.stdout
    else:
        assert not fell_back, lines
    new = [r for r in _losses(run_dir) if r[0] > (3 if fell_back else 4)]
    assert new == [r for r in reference["losses"] if r[0] > (3 if fell_back else 4)]


def _damage_and_resume(reference, tmp_path, artifact, damage, seed):
    root, run_dir = _resumable(reference, tmp_path)
    path = ARTIFACTS[artifact](root, run_dir)
    damage(path, random.Random(seed))
    proc = _run(reference["cfg"], run_dir, root)
    _expect_resume(reference, proc, run_dir, artifact, damage, path)


@pytest.mark.parametrize("artifact", sorted(FALLS_BACK))
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_every_checkpoint_damage_is_caught_before_use(reference, tmp_path, artifact, damage):
    """In-process, every artifact x damage: the reader refuses the damaged checkpoint naming the file, or
    the damage left it readable and equal (root ignores permissions; a byte of metadata.json that stays JSON
    whitespace). A rank shard's sha256 leaves no other way: any changed byte of it must be caught."""
    root = str(tmp_path / "ckpt")
    shutil.copytree(str(reference["dir"] / "ckpt"), root)
    original = ckpt.CheckpointReader(ckpt.iter_dir(root, 4)).meta
    path = ARTIFACTS[artifact](root, None)
    before = open(path, "rb").read()
    damage(path, random.Random(RNG_SEED))
    assert ckpt.find_checkpoints(root)[1] == ckpt.iter_dir(root, 4)  # still a candidate: reported, not skipped
    try:
        reader = ckpt.CheckpointReader(ckpt.iter_dir(root, 4))
        for file in reader.meta["files"]:
            reader.verify(file)
    except ckpt.CheckpointCorrupt as e:
        assert ckpt.iter_dir(root, 4) in str(e)
        return
    assert reader.meta == original, damage.__name__
    if damage is no_permission:
        assert _readable(path)  # root reads it whatever its mode
    else:
        assert artifact == "metadata.json" and _only_whitespace_changed(before, open(path, "rb").read()), (
            f"{damage.__name__} of the {artifact} went undetected")


def _only_whitespace_changed(before, after):
    """Whether every byte that differs is JSON whitespace on both sides (the parsed document is the same)."""
    space = b" \t\n\r"
    return len(before) == len(after) and before != after and all(
        a in space and b in space for a, b in zip(before, after) if a != b)


@pytest.mark.parametrize("artifact, damage", [("metadata.json", flip_byte), ("rank shard", truncate),
                                              ("latest", replace_by_dir), ("metrics.jsonl", zero_fill),
                                              ("metrics.jsonl", replace_by_dir)],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_resume_after_damage(reference, tmp_path, artifact, damage):
    _damage_and_resume(reference, tmp_path, artifact, damage, RNG_SEED)


def test_randomised_draw(reference, tmp_path):
    """A seeded draw of (artifact, damage) pairs, end to end; a new artifact or damage joins it by being listed."""
    rng = random.Random(RNG_SEED)
    for i in range(3):
        artifact, damage = rng.choice(sorted(ARTIFACTS)), rng.choice(DAMAGES)
        _damage_and_resume(reference, tmp_path / f"draw{i}", artifact, damage, rng.randrange(2 ** 32))


def test_metadata_invalid_utf8_falls_back(reference, tmp_path):
    """Regression: one byte making metadata.json invalid UTF-8 crashed the resume with UnicodeDecodeError."""
    root, run_dir = _resumable(reference, tmp_path)
    path = ARTIFACTS["metadata.json"](root, run_dir)
    _xor(path, 2, 0xC0)  # a space becomes 0xE0: a UTF-8 lead byte followed by ASCII
    proc = _run(reference["cfg"], run_dir, root)
    assert "UnicodeDecodeError" in proc.stdout and "Traceback" not in proc.stderr
    _expect_resume(reference, proc, run_dir, "metadata.json", flip_byte, path)


def test_damaged_optimizer_piece_falls_back_before_commit(reference, tmp_path):
    """Regression: a damaged optimizer shard of a mid-stage checkpoint was found only after the trainer had
    committed to it. The optimizer's pieces are verified with the weights, before the choice is made."""
    from megagopher.training.ckpt_files import read_header
    root, run_dir = _resumable(reference, tmp_path)
    path = ARTIFACTS["rank shard"](root, run_dir)
    header = read_header(path)
    key = next(k for k in header if k.startswith("exp_avg_sq/"))
    _xor(path, header[key][2] + 5, 0x40)
    proc = _run(reference["cfg"], run_dir, root)
    assert "checksum mismatch" in proc.stdout
    _expect_resume(reference, proc, run_dir, "rank shard", flip_byte, path)


def test_half_written_temporary_directory_is_ignored(reference, tmp_path):
    root, run_dir = _resumable(reference, tmp_path)
    shutil.copytree(ckpt.iter_dir(root, 4), ckpt.iter_dir(root, 5) + ".tmp")
    os.remove(os.path.join(ckpt.iter_dir(root, 5) + ".tmp", "metadata.json"))
    proc = _run(reference["cfg"], run_dir, root)
    _expect_resume(reference, proc, run_dir, "latest", delete, "")  # resumed from iter_4, bit-exact


# -- signals at every phase ---------------------------------------------------------------------------------
PHASES = ["startup", "data", "step", "eval", "save", "boundary"]
BEFORE_FIRST_STEP = {"startup", "data"}
# SIGINT takes SIGTERM's path; it runs where the save is asynchronous, and before the first step.
SIGNAL_CASES = [(p, "TERM") for p in PHASES] + [("save", "INT"), ("data", "INT")] + [(p, "KILL") for p in PHASES]


@pytest.mark.parametrize("phase, name", SIGNAL_CASES, ids=lambda v: v)
def test_signal_at_every_phase(reference, tmp_path, phase, name):
    root, run_dir = str(tmp_path / "ckpt"), str(tmp_path / "run")
    extra = ("--checkpoint.async_save=true",) if phase == "save" and name == "INT" else ()
    proc = _run(reference["cfg"], run_dir, root, *extra, fault=("signal-at", phase, name))
    leftovers = [n for n in os.listdir(root) if n.endswith(".tmp")] if os.path.isdir(root) else []
    if name == "KILL":
        assert proc.returncode == -9, proc.stderr[-2000:]
        proc = _run(reference["cfg"], run_dir, root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _losses(run_dir) == reference["losses"], phase
        return
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not leftovers, leftovers
    if phase in BEFORE_FIRST_STEP:
        assert "stopping before the first step" in proc.stdout
        assert ckpt.list_checkpoints(root) == [] and read_metrics(run_dir) == []
        return
    stopped_at = read_metrics(run_dir)[-1]["iteration"] if phase != "boundary" else 3
    assert ckpt.list_checkpoints(root)[-1] == stopped_at
    assert open(os.path.join(root, "latest")).read().strip() == str(stopped_at)
    reader = ckpt.CheckpointReader(ckpt.iter_dir(root, stopped_at))
    for file in reader.meta["files"]:
        reader.verify(file)


# -- a disk that fills up ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_save_that_cannot_be_written(reference, tmp_path, policy):
    """From iteration 4's save on, files may not grow past 64 KiB (RLIMIT_FSIZE: writes fail with EFBIG, as
    ENOSPC would); a shard is larger. The checkpoint of iteration 3 stays the newest complete one."""
    root, run_dir = str(tmp_path / "ckpt"), str(tmp_path / "run")
    proc = _run(reference["cfg"], run_dir, root, f"--checkpoint.on_save_error={policy}",
                fault=("fsize-limit-at", "4", str(64 * 1024)))
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ckpt.list_checkpoints(root) == [2, 3] and not any(n.endswith(".tmp") for n in os.listdir(root))
    reader = ckpt.CheckpointReader(ckpt.iter_dir(root, 3))
    for file in reader.meta["files"]:
        reader.verify(file)
    if policy == "stop":
        assert proc.returncode == 4
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "File too large" in errors[0] and "iter_0000003 is intact" in errors[0], errors
        assert read_metrics(run_dir)[-1]["iteration"] == 4
    else:
        assert proc.returncode == 0
        assert "training continues" in proc.stdout and "iter_0000003 is intact" in proc.stdout
        assert _losses(run_dir) == reference["losses"]
