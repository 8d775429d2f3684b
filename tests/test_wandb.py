"""wandb as a metrics sink (megagopher/training/wandb_sink.py), checked against what wandb itself recorded:
the offline runs' .wandb transaction logs, read with wandb's own protobuf Record (wandb.proto) framed as
wandb writes them (LevelDB's log format behind a ":W&B" header; wandb 0.31 ships no Python reader).
No network: WANDB_MODE=offline, wandb's config, cache and data directories and the run directory in tmp.

One training story shared by the file (each run starts an interpreter and wandb's service: seconds): a run
stopped after its checkpoint at iteration 2, then the same run resumed with a learning rate of 1e30, so that
step 3's update overflows the weights and step 4's loss is NaN: it ends with exit status 3.
"""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from wandb.proto import wandb_internal_pb2  # the optional extra, in the test extra

from megagopher.config import ConfigError, load_config, parse_overrides, to_tables
from megagopher.training import wandb_sink
from train_utils import ROOT, read_metrics, run_train, write_config

BASE = ("--run.wandb_project=megagopher-test", "--training.train_iters=4", "--training.eval_interval=2")


def wandb_records(path):
    """The protobuf Records of one .wandb file: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB
    log records in 32 KiB blocks (7-byte header: crc32c, length, type full/first/middle/last)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), (path, data[:7])
    pos, block, parts, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4) and parts:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def read_wandb_run(path):
    """{"id", "config", "history": [(step, {key: value})], "exit_code"} of one offline run's .wandb file."""
    out = {"history": [], "config": {}, "exit_code": None}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out["history"].append((items["_step"], {k: v for k, v in items.items() if not k.startswith("_")}))
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["config"].pop("_wandb", None)
    return out


def wandb_runs(run_dir):
    """The offline runs under run_dir, in the order they logged (by first step)."""
    runs = [read_wandb_run(p) for p in glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb"))]
    return sorted(runs, key=lambda r: r["history"][0][0] if r["history"] else -1)


def expected_rows(run_dir):
    """metrics.jsonl as wandb should hold it: {iteration: {train/key or eval/key: value}}."""
    rows = {}
    for event, prefix in (("train", "train"), ("eval", "eval")):
        for row in read_metrics(run_dir, event):
            rows.setdefault(row["iteration"], {}).update({f"{prefix}/{k}": v for k, v in row.items() if k != "event"})
    return rows


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID",
                     "WANDB_RESUME", "WANDB_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(tmp / name.lower()))
        mp.setenv("NETRC", str(tmp / "no-netrc"))
        config, run_dir, ckpt = write_config(tmp), str(tmp / "run"), str(tmp / "ckpt")
        resume = (*BASE, f"--checkpoint.dir={ckpt}", "--checkpoint.load=auto")
        first = run_train(config, run_dir, *resume, "--training.exit_after_iters=2", launcher="process")
        second = run_train(config, run_dir, *resume, "--optimizer.lr=1e30", launcher="process", check=False)
    return {"tmp": tmp, "run_dir": run_dir, "procs": (first, second)}


def test_wandb_holds_the_metrics_rows_and_resumes_the_same_run(story):
    run_dir = story["run_dir"]
    resumed = story["procs"][1]
    assert resumed.returncode == 3 and "non-finite loss nan at iteration 4" in resumed.stderr, resumed.stderr[-3000:]
    runs = wandb_runs(run_dir)
    assert len(runs) == 2, [r.get("id") for r in runs]
    with open(os.path.join(run_dir, "wandb_run_id")) as f:
        stored = f.read().strip()
    assert [r["id"] for r in runs] == [stored, stored]
    # The stopped run logged steps 1-2, the resumed one continues at 3: no step twice, none missing.
    assert [[step for step, _ in r["history"]] for r in runs] == [[1, 2], [3]]
    got = {step: row for r in runs for step, row in r["history"]}
    want = expected_rows(run_dir)
    assert sorted(want) == [1, 2, 3] and "eval/loss" in want[2] and "train/loss" in want[2]
    assert got == want
    # The stop after the checkpoint finished cleanly; the NaN ended the resumed run as it ended the process.
    assert [r["exit_code"] for r in runs] == [0, 3]
    # The run's files go under the run directory (dir=), not WANDB_DIR nor the working directory.
    assert not os.path.exists(os.path.join(ROOT, "wandb"))
    assert not os.path.exists(os.path.join(story["tmp"], "wandb_dir", "wandb"))


def test_wandb_config_is_the_resolved_run_config(story):
    run_dir = story["run_dir"]
    stopped, resumed = wandb_runs(run_dir)
    # config.toml is the resolved config of the last (resumed) run; the stopped one had exit_after_iters = 2
    # and the learning rate of the file.
    want = to_tables(load_config(os.path.join(run_dir, "config.toml")))
    assert resumed["config"] == want and want["optimizer"]["lr"] == 1e30
    want["training"]["exit_after_iters"], want["optimizer"]["lr"] = 2, 3e-3
    assert stopped["config"] == want
    assert want["run"]["wandb_project"] == "megagopher-test" and want["stages"][0]["train_iters"] == 4


def test_missing_wandb_is_a_config_error_before_anything_runs(tmp_path):
    """run.wandb_project set where wandb cannot be imported (sys.modules["wandb"] = None, as if not
    installed): one line naming the key and the install command, exit status 2, nothing written."""
    run_dir = tmp_path / "run"
    code = ("import sys; sys.modules['wandb'] = None; from megagopher.train import main; "
            f"sys.exit(main(['--config', {write_config(tmp_path)!r}, '--run.dir={run_dir}', "
            "'--run.wandb_project=p']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "megagopher.train: config error: run.wandb_project = 'p' needs the wandb package, which is not installed: "
        "pip install megagopher[wandb] (or set run.wandb_project = \"\")"]
    assert not run_dir.exists()


def test_the_sink_itself_refuses_a_missing_wandb(monkeypatch, tmp_path):
    from megagopher.config import RunConfig
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = RunConfig(wandb_project="p")
    with pytest.raises(ConfigError, match=r"pip install megagopher\[wandb\]"):
        wandb_sink.require_wandb(cfg)
    with pytest.raises(ConfigError, match=r"run.wandb_project = 'p': cannot import wandb .*megagopher\[wandb\]"):
        wandb_sink.WandbSink(cfg, str(tmp_path), {})
    wandb_sink.require_wandb(RunConfig())  # no project: wandb is not needed


def test_bad_wandb_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"run.wandb_mode = 'cloud'; valid: 'auto', 'online', 'offline'"):
        load_config(write_config(tmp_path), parse_overrides(["--run.wandb_mode=cloud"]))


def test_auto_mode_is_offline_unless_logged_in(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    other = tmp_path / "other"
    other.write_text("machine example.com\n  login user\n  password k3y\n")
    missing = str(tmp_path / "missing")
    resolve = wandb_sink.resolve_mode
    assert resolve("auto", {}, missing) == "offline"
    assert resolve("auto", {}, str(other)) == "offline"
    assert resolve("auto", {}, str(netrc)) == "online"
    assert resolve("auto", {"WANDB_API_KEY": "k3y"}, missing) == "online"
    assert resolve("auto", {"NETRC": str(netrc)}) == "online"
    assert resolve("auto", {"WANDB_BASE_URL": "https://example.com"}, str(other)) == "online"
    assert resolve("auto", {"WANDB_BASE_URL": "https://example.com"}, str(netrc)) == "offline"
    # An explicit WANDB_MODE is the user's choice in auto; an explicit run.wandb_mode is the config's.
    assert resolve("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k3y"}, missing) == "disabled"
    assert resolve("offline", {"WANDB_API_KEY": "k3y"}, str(netrc)) == "offline"
    assert resolve("online", {"WANDB_MODE": "offline"}, missing) == "online"


def test_the_run_id_is_kept_for_a_resume_and_renewed_for_a_fresh_start(tmp_path):
    ids = iter(["first", "second", "third"])
    run_dir = str(tmp_path)
    assert wandb_sink.run_id_for(run_dir, 0, lambda: next(ids)) == ("first", False)
    assert wandb_sink.run_id_for(run_dir, 5, lambda: next(ids)) == ("first", True)
    assert wandb_sink.run_id_for(run_dir, 0, lambda: next(ids)) == ("second", False)  # a fresh start
    os.remove(os.path.join(run_dir, "wandb_run_id"))
    assert wandb_sink.run_id_for(run_dir, 5, lambda: next(ids)) == ("third", False)  # wandb switched on mid-run
    assert sorted(os.listdir(run_dir)) == ["wandb_run_id"]  # no temporary file left


def test_rows_the_resumed_wandb_run_holds_are_not_logged_again():
    """An online resume starts at the step after the server's last (wandb's run.starting_step): rows below it
    were logged before a crash, past the checkpoint resumed from, and the resumed run repeats them."""
    class Recorder:
        def __init__(self):
            self.steps = []

        def log(self, row, step):
            self.steps.append((step, sorted(row)))
    sink = object.__new__(wandb_sink.WandbSink)
    sink.run, sink.first_step = Recorder(), 4
    for iteration in (3, 4, 5):
        sink.log("train", {"iteration": iteration, "loss": 1.0})
    sink.log("eval", {"event": "eval", "iteration": 5, "loss": 2.0})
    assert sink.run.steps == [(4, ["train/iteration", "train/loss"]), (5, ["train/iteration", "train/loss"]),
                              (5, ["eval/iteration", "eval/loss"])]
