"""megagopher.generate on a tiny trained checkpoint: the command line at tp 1 and tp 2 (torchrun) against a
greedy decode computed here from GPTModel's own logits, the KV cache against full recomputation, sampling
(seeded, top-p, never a padding id, the same on every TP rank), stopping at eod, and score()."""
import os
import subprocess
import sys

import pytest
import torch

from megagopher import generate as gen
from megagopher.model import GPTModel
from megagopher.testing import free_port, spawn
from megagopher.training.checkpoint import CheckpointReader, load_weights
from train_utils import ROOT, run_train, write_config

PROMPT = [5, 17, 42, 3, 8]
NEW = 10  # prompt + new tokens fit the 16-token context


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """TINY (rmsnorm, swiglu, rope, GQA, vocab 90 padded to 96) trained 2 steps; a wide initialisation keeps
    its greedy continuations varied (a barely trained model of normal width repeats one token)."""
    tmp = tmp_path_factory.mktemp("gen")
    run_train(write_config(tmp), str(tmp / "run"), f"--checkpoint.dir={tmp / 'ckpt'}", "--training.train_iters=2",
              "--model.num_layers=2", "--model.init_std=0.5")
    return str(tmp / "ckpt")


def reference_model(ckpt):
    """A GPTModel loaded here without megagopher.generate."""
    reader = CheckpointReader(os.path.join(ckpt, f"iter_{int(open(os.path.join(ckpt, 'latest')).read()):07d}"))
    from megagopher.export.loading import model_config_of
    model = GPTModel(model_config_of(reader))
    load_weights(reader, [model])
    return model.eval()


def reference_greedy(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1, :model.cfg.vocab_size]
            out.append(int(torch.argmax(logits)))
    return out


def run_cli(args, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "megagopher.generate", *args]
    else:
        cmd = [sys.executable, "-m", "megagopher.generate", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def last_ids(proc):
    return [int(t) for t in proc.stdout.strip().splitlines()[-1].split()]


def test_cli_greedy_tp1_and_tp2_match_the_model_logits(ckpt):
    expected = reference_greedy(reference_model(ckpt), PROMPT, NEW)
    args = ["--checkpoint", ckpt, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--greedy"]
    assert last_ids(run_cli(args)) == expected
    tp2 = run_cli(args + ["--tp", "2"], nproc=2)
    assert last_ids(tp2) == expected
    assert len(tp2.stdout.strip().splitlines()) == 1  # rank 0 alone prints


def test_kv_cache_equals_full_recompute_and_model_forward(ckpt):
    lm = gen.load_model(ckpt)
    model = reference_model(ckpt)
    ids = PROMPT + [11, 12, 13]
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0, :, :model.cfg.vocab_size]
        with gen.kv_cache(lm.model):
            first = gen._forward_last(lm.model, ids[:4])
            steps = [gen._forward_last(lm.model, [t], pos) for pos, t in enumerate(ids[4:], start=4)]
    torch.testing.assert_close(first, full[3], rtol=1e-5, atol=1e-5)
    for pos, logits in enumerate(steps, start=4):
        torch.testing.assert_close(logits, full[pos], rtol=1e-5, atol=1e-5)
    assert first.shape == (model.cfg.vocab_size,) and model.padded_vocab_size > model.cfg.vocab_size
    assert "core_attention" not in vars(lm.model.layers["0"].attention)  # the cache is uninstalled
    greedy = gen.generate(lm, PROMPT, NEW)
    assert greedy == gen.generate(lm, PROMPT, NEW, use_cache=False) == reference_greedy(model, PROMPT, NEW)
    sampled = dict(greedy=False, temperature=0.9, top_p=0.95, seed=3)
    assert gen.generate(lm, PROMPT, NEW, **sampled) == gen.generate(lm, PROMPT, NEW, use_cache=False, **sampled)


def test_sampling_seed_stop_and_padding(ckpt):
    lm = gen.load_model(ckpt)
    hot = dict(greedy=False, temperature=50.0)  # near uniform: would reach padding ids if they were allowed
    a = gen.generate(lm, PROMPT, 10, seed=1, **hot)
    assert a == gen.generate(lm, PROMPT, 10, seed=1, **hot)
    assert a != gen.generate(lm, PROMPT, 10, seed=2, **hot)
    long = gen.generate(lm, [1], gen.context_limit(lm) + 5, seed=4, **hot)
    assert len(long) == gen.context_limit(lm) - 1  # stops when the context is full
    assert all(0 <= t < lm.config.vocab_size for t in long)
    greedy = gen.generate(lm, PROMPT, NEW)
    stop_at = greedy[3]
    cut = gen.generate(lm, PROMPT, NEW, eod=stop_at)
    assert cut == greedy[:greedy.index(stop_at)]  # eod ends the generation and is not part of it
    assert gen.generate(lm, PROMPT, NEW, stop=lambda new: len(new) == 2) == greedy[:2]
    with pytest.raises(ValueError, match="outside"):
        gen.generate(lm, [lm.config.vocab_size], 3)


def test_sampler_top_p_and_top_k():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {gen.Sampler(False, top_p=0.7, seed=s)(logits) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    assert {gen.Sampler(False, top_k=1, seed=s)(logits) for s in range(20)} == {0}
    assert gen.Sampler(True)(torch.tensor([0.0, 2.0, 1.0])) == 1
    with pytest.raises(ValueError, match="top_p"):
        gen.Sampler(False, top_p=0.0)


def test_score_is_the_continuation_log_likelihood(ckpt):
    lm = gen.load_model(ckpt)
    model = reference_model(ckpt)
    context, continuation = [4, 9, 2], [7, 7, 30]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context + continuation]))[0, :, :90].double(), -1)
    manual = sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert gen.score(lm, context, continuation) == pytest.approx(manual, abs=1e-4)


def _tp2_worker(rank, world, ckpt):
    lm = gen.load_model(ckpt, tp=2)
    sampled = gen.generate(lm, PROMPT, NEW, greedy=False, temperature=1.5, top_p=0.9, seed=11)
    return {"sampled": sampled, "greedy": gen.generate(lm, PROMPT, NEW),
            "score": gen.score(lm, [4, 9, 2], [7, 7, 30])}


def test_tp2_ranks_agree_and_match_tp1(ckpt):
    r0, r1 = spawn(_tp2_worker, 2, ckpt)
    assert r0["sampled"] == r1["sampled"] and r0["greedy"] == r1["greedy"] and r0["score"] == r1["score"]
    lm = gen.load_model(ckpt)
    assert r0["greedy"] == gen.generate(lm, PROMPT, NEW)
    assert r0["score"] == pytest.approx(gen.score(lm, [4, 9, 2], [7, 7, 30]), abs=1e-4)


def test_cli_errors(ckpt, tmp_path, capsys):
    def fails(args, message):
        assert gen.main(args) == 2
        assert message in capsys.readouterr().err
    fails(["--checkpoint", ckpt, "--prompt", "hello"], "had no tokenizer")
    fails(["--checkpoint", str(tmp_path / "none"), "--prompt-ids", "1"], "does not exist")
    fails(["--checkpoint", ckpt, "--prompt-ids", "1", "--tp", "2"], "torchrun --nproc-per-node 2")
    fails(["--checkpoint", ckpt, "--prompt-ids", "1,x"], "comma-separated integers")
    fails(["--checkpoint", ckpt, "--prompt-ids", ",".join(["1"] * 16)], "leaving no room")
