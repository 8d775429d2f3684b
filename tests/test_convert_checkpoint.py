"""tools/convert_checkpoint.py: resharding tp1 -> tp2 -> tp1 and onto pipeline layouts keeps every full
tensor (weights and optimizer state) bit for bit, the files follow save_checkpoint's structure and
stages.py's layer split, and a tp2 run resumed from the converted checkpoint logs the losses the
unconverted run logged and saves its per-parameter gradients, weights and Adam moments."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from megagopher.export.convert import convert, to_full
from megagopher.pipeline_parallel.stages import stage_layer_ranges
from megagopher.training.checkpoint import CheckpointReader
from train_utils import (GOLDEN, GRAD_RTOL, STATE_RTOL, ROOT, assert_same_training_state, read_metrics, run_train,
                         write_config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of TINY (4 layers, tied embeddings, vocab 90 padded per TP), a checkpoint after every step;
    the one of step 2 is converted."""
    tmp = tmp_path_factory.mktemp("convert")
    run_train(write_config(tmp), str(tmp / "run"), *GOLDEN, f"--checkpoint.dir={tmp / 'ckpt'}",
              "--checkpoint.save_interval=1")
    return tmp, str(tmp / "ckpt" / "iter_0000002")


def assert_same_tensors(a, b):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        assert torch.equal(ra.full_tensor(name), rb.full_tensor(name)), name
        assert ra.meta["has_optimizer"] == rb.meta["has_optimizer"]
        for kind in ("master", "exp_avg", "exp_avg_sq") if ra.meta["has_optimizer"] else ():
            assert torch.equal(ra.full_tensor(name, kind), rb.full_tensor(name, kind)), (name, kind)


def names_in(path):
    """The parameter names of the pieces in one shard file (keys are kind/name/tp_rank/lo)."""
    with safe_open(path, "pt") as f:
        return {key.split("/")[1] for key in f.keys()}


def test_tp1_to_tp2_and_back_is_exact(trained):
    tmp, source = trained
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--checkpoint", source,
                           "--output", str(tmp / "tp2"), "--tp", "2", "--pp", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tp2 = str(tmp / "tp2" / "iter_0000002")
    assert open(tmp / "tp2" / "latest").read().strip() == "2"
    files = sorted(os.listdir(tp2))
    assert files == ["metadata.json", "shard_tp00_pp00.safetensors", "shard_tp01_pp00.safetensors"]
    meta = json.load(open(os.path.join(tp2, "metadata.json")))
    assert meta["layout"]["tp"] == 2 and meta["layout"]["dp"] is None and "dropped" in meta["rng"]
    for f in files[1:]:
        assert meta["files"][f]["sha256"] == hashlib.sha256(open(os.path.join(tp2, f), "rb").read()).hexdigest()
        assert meta["files"][f]["bytes"] == os.path.getsize(os.path.join(tp2, f))
    tensors = meta["tensors"]
    assert tensors["embedding.word.weight"]["local_shapes"]["1"] == [48, 32]  # vocab 90 padded to 96 = 8 * tp2 * 6
    assert tensors["layers.0.attention.qkv.weight"]["local_shapes"]["1"] == [32, 32]  # one of two query groups
    norm = "layers.0.input_norm.weight"  # replicated: TP rank 0 writes the one copy
    assert list(tensors[norm]["pieces"]["param"]) == ["0"]
    assert norm in names_in(os.path.join(tp2, "shard_tp00_pp00.safetensors"))
    assert norm not in names_in(os.path.join(tp2, "shard_tp01_pp00.safetensors"))
    with safe_open(os.path.join(tp2, "shard_tp01_pp00.safetensors"), "pt") as f:  # a plain safetensors file
        embedding = f.get_tensor("param/embedding.word.weight/1/0").view(48, 32)
    assert torch.equal(embedding[:42], CheckpointReader(source).full_tensor("embedding.word.weight")[48:])
    assert_same_tensors(source, tp2)
    back = convert(tp2, str(tmp / "tp1"), tp=1, pp=1)
    assert_same_tensors(source, back)
    assert names_in(os.path.join(back, "shard_tp00_pp00.safetensors")) == set(CheckpointReader(source).names())


def test_pipeline_layouts_follow_the_stage_split(trained):
    tmp, source = trained
    for pp, vpp, pp_layers in ((2, 1, None), (2, 1, [1, 3]), (2, 2, None)):
        path = convert(source, str(tmp / f"pp{pp}vpp{vpp}{pp_layers}"), tp=2, pp=pp, vpp=vpp, pp_layers=pp_layers)
        assert_same_tensors(source, path)
        ranges = stage_layer_ranges(4, pp, vpp, pp_layers)
        for pp_rank in range(pp):
            names = names_in(os.path.join(path, f"shard_tp00_pp{pp_rank:02d}.safetensors"))
            layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
            assert layers == [i for v, (a, b) in enumerate(ranges) if v % pp == pp_rank for i in range(a, b)]
            # Tied embeddings: the first stage writes them; the last stage's copy reads them from there.
            assert ("embedding.word.weight" in names) == (pp_rank == 0)
            assert ("final_norm.weight" in names) == (pp_rank == pp - 1)
        meta = json.load(open(os.path.join(path, "metadata.json")))
        assert meta["layout"] == {"tp": 2, "pp": pp, "dp": None, "vpp": vpp, "cp": 1, "world": None}
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
    run_train(write_config(tmp), run_dir, *GOLDEN, f"--checkpoint.load={converted}", "--parallel.tp=2",
              f"--checkpoint.dir={tmp / 'resumed_ckpt'}", "--checkpoint.save_interval=1", nproc=2)
    original = {r["iteration"]: r for r in read_metrics(str(tmp / "run"))}
    resumed = read_metrics(run_dir)
    assert [r["iteration"] for r in resumed] == [3, 4]
    # Step 3's loss checks the weights; step 4's the optimizer state that made step 3's update.
    for r in resumed:
        assert r["loss"] == pytest.approx(original[r["iteration"]]["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(original[r["iteration"]]["grad_norm"], rel=1e-4)
    # Step 3 starts from the converted state bit for bit, so its exp_avg (beta1 m + (1 - beta1) g) compares
    # step 3's per-parameter gradients with the unconverted run's; step 4's checkpoint the whole state.
    resumed, unconverted = tmp / "resumed_ckpt", tmp / "ckpt"
    assert_same_training_state(resumed, unconverted, 3, GRAD_RTOL, kinds=("exp_avg",), what="tp2")
    assert_same_training_state(resumed, unconverted, 4, STATE_RTOL, kinds=("param", "exp_avg", "exp_avg_sq"),
                               what="tp2")
