"""tools/convert_checkpoint.py: resharding tp1 -> tp2 -> tp1 and onto pipeline layouts keeps every full
tensor (weights and optimizer state) bit for bit, the files follow save_checkpoint's structure and
stages.py's layer split, and a tp2 run resumed from the converted checkpoint logs the losses the
unconverted run logged."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from megagopher.export.convert import convert, to_full
from megagopher.pipeline_parallel.stages import stage_layer_ranges
from megagopher.training.checkpoint import CheckpointReader
from train_utils import ROOT, read_metrics, run_train, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of TINY (4 layers, tied embeddings, vocab 90 padded per TP), a checkpoint after step 2."""
    tmp = tmp_path_factory.mktemp("convert")
    run_train(write_config(tmp), str(tmp / "run"), f"--checkpoint.dir={tmp / 'ckpt'}", "--checkpoint.save_interval=2")
    return tmp, str(tmp / "ckpt" / "iter_0000002")


def assert_same_tensors(a, b):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        assert torch.equal(ra.full_tensor(name), rb.full_tensor(name)), name
        if ra.meta["has_optimizer"]:
            assert ra.optimizer_keys(name) == rb.optimizer_keys(name)
            for key in ra.optimizer_keys(name):
                assert torch.equal(ra.full_tensor(name, "optim", key), rb.full_tensor(name, "optim", key)), (name, key)


def test_tp1_to_tp2_and_back_is_exact(trained):
    tmp, source = trained
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--checkpoint", source,
                           "--output", str(tmp / "tp2"), "--tp", "2", "--pp", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tp2 = str(tmp / "tp2" / "iter_0000002")
    assert open(tmp / "tp2" / "latest").read().strip() == "2"
    files = sorted(os.listdir(tp2))
    assert files == ["metadata.json", "model_tp00_pp00.pt", "model_tp01_pp00.pt", "optim_tp00_pp00.pt",
                     "optim_tp01_pp00.pt"]  # no RNG files
    meta = json.load(open(os.path.join(tp2, "metadata.json")))
    assert meta["layout"]["tp"] == 2 and meta["layout"]["dp"] is None and "dropped" in meta["rng"]
    for f in files[1:]:
        assert meta["files"][f] == hashlib.sha256(open(os.path.join(tp2, f), "rb").read()).hexdigest()
    shard = torch.load(os.path.join(tp2, "model_tp01_pp00.pt"))
    assert shard["embedding.word.weight"].shape == (48, 32)  # vocab 90 padded to 96 = 8 * tp2 * 6
    assert shard["layers.0.attention.qkv.weight"].shape == (32, 32)  # one of the two query groups
    norm = "layers.0.input_norm.weight"  # replicated: every TP rank holds it whole
    assert torch.equal(shard[norm], CheckpointReader(source).full_tensor(norm))
    assert_same_tensors(source, tp2)
    back = convert(tp2, str(tmp / "tp1"), tp=1, pp=1)
    assert_same_tensors(source, back)
    original = torch.load(os.path.join(source, "model_tp00_pp00.pt"))
    converted = torch.load(os.path.join(back, "model_tp00_pp00.pt"))
    assert list(converted) == list(original)  # the trainer's own order of names
    assert all(torch.equal(original[n], converted[n]) for n in original)


def test_pipeline_layouts_follow_the_stage_split(trained):
    tmp, source = trained
    for pp, vpp, pp_layers in ((2, 1, None), (2, 1, [1, 3]), (2, 2, None)):
        path = convert(source, str(tmp / f"pp{pp}vpp{vpp}{pp_layers}"), tp=2, pp=pp, vpp=vpp, pp_layers=pp_layers)
        assert_same_tensors(source, path)
        ranges = stage_layer_ranges(4, pp, vpp, pp_layers)
        for pp_rank in range(pp):
            names = list(torch.load(os.path.join(path, f"model_tp01_pp{pp_rank:02d}.pt")))
            layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
            assert layers == [i for v, (a, b) in enumerate(ranges) if v % pp == pp_rank for i in range(a, b)]
            # Tied embeddings: the first stage holds them, the last a copy under the same name.
            assert "embedding.word.weight" in names
            assert ("final_norm.weight" in names) == (pp_rank == pp - 1)
        meta = json.load(open(os.path.join(path, "metadata.json")))
        assert meta["layout"] == {"tp": 2, "pp": pp, "dp": None, "vpp": vpp, "world": None}
    with pytest.raises(ValueError, match=r"num_attention_heads = 4 is not divisible by parallel\.tp = 3"):
        convert(source, str(tmp / "bad"), tp=3, pp=1)
    with pytest.raises(ValueError, match=r"pp_layers = \[1, 2\] sums to 3"):
        convert(source, str(tmp / "bad"), tp=1, pp=2, pp_layers=[1, 2])


def test_to_full(trained, tmp_path):
    _, source = trained
    assert to_full(source, str(tmp_path / "full.pt")) == len(CheckpointReader(source).names())
    full = torch.load(str(tmp_path / "full.pt"))
    reader = CheckpointReader(source)
    assert full["embedding.word.weight"].shape == (90, 32)
    assert all(torch.equal(full[n], reader.full_tensor(n)) for n in reader.names())


def test_resuming_the_converted_checkpoint_at_tp2_continues_the_run(trained):
    tmp, source = trained
    converted = convert(source, str(tmp / "resume_tp2"), tp=2, pp=1)
    run_dir = str(tmp / "resumed")
    run_train(write_config(tmp), run_dir, f"--checkpoint.load={converted}", "--parallel.tp=2", nproc=2)
    original = {r["iteration"]: r for r in read_metrics(str(tmp / "run"))}
    resumed = read_metrics(run_dir)
    assert [r["iteration"] for r in resumed] == [3, 4]
    # Step 3's loss checks the weights; step 4's the optimizer state that made step 3's update.
    for r in resumed:
        assert r["loss"] == pytest.approx(original[r["iteration"]]["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(original[r["iteration"]]["grad_norm"], rel=1e-4)
