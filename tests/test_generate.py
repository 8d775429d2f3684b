"""megagopher.generate on a tiny trained checkpoint: the command line at tp 1 and tp 2 (torchrun) against a
greedy decode computed here from GPTModel's own logits, the KV cache against full recomputation, sampling
(seeded, top-p, never a padding id, the same on every TP rank), stopping at eod, and score(). generate()
drives GPTModel.forward itself (a forward hook sees every step), with the model's KVCache, on rope + GQA and
learned-position models, flash and unfused attention."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from megagopher import generate as gen
from megagopher.model import GPTConfig, GPTModel
from megagopher.model.attention import KVCache
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


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    """TINY with every MLP a MoE layer of 4 experts, top-2, trained 2 steps."""
    tmp = tmp_path_factory.mktemp("gen_moe")
    run_train(write_config(tmp), str(tmp / "run"), f"--checkpoint.dir={tmp / 'ckpt'}", "--training.train_iters=2",
              "--model.num_layers=2", "--model.init_std=0.5", "--model.num_experts=4", "--model.moe_top_k=2")
    return str(tmp / "ckpt")


def test_moe_generation_serial_and_tp2_x_ep2_match_the_model_logits(moe_ckpt):
    """A MoE checkpoint generates the reference greedy tokens alone and under tp2 x ep2 (4 processes: each
    expert-parallel rank holds 2 of the 4 experts of every layer, the tokens reach them by all-to-all)."""
    model = reference_model(moe_ckpt)
    assert type(model.layers["0"].mlp).__name__ == "MoELayer"
    expected = reference_greedy(model, PROMPT, NEW)
    args = ["--checkpoint", moe_ckpt, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW)]
    assert last_ids(run_cli(args)) == expected
    parallel = run_cli(args + ["--tp", "2", "--ep", "2"], nproc=4)
    assert last_ids(parallel) == expected and "tp 2, ep 2" in parallel.stderr


def cached_logits(model, ids, prefill):
    """Full-vocabulary logits at positions prefill - 1 .. len(ids) - 1 through GPTModel.forward's KV cache:
    one causal pass over ids[:prefill], then one token at a time."""
    cache = KVCache()
    with torch.no_grad():
        out = [model(torch.tensor([ids[:prefill]]), kv_cache=cache, last_only=True)]
        out += [model(torch.tensor([[t]]), kv_cache=cache, position_offset=pos, last_only=True)
                for pos, t in enumerate(ids[prefill:], start=prefill)]
    assert len(cache) == len(ids) and all(o.shape[:2] == (1, 1) for o in out)
    return [model.gather_logits(o)[0, -1] for o in out]


def check_generate_steps(model, prompt, n, use_cache=True, **sampling):
    """generate() on a GPTModel, watched by a forward hook: every step is one GPTModel.forward call (the
    prompt, then one new token against the one KVCache; or the whole sequence without the cache), and its
    logits equal the uncached full forward's at that position to fp32 rounding. Returns the new ids."""
    calls = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs, out)),
                                       with_kwargs=True)
    try:
        new = gen.generate(model, prompt, n, eod=None, use_cache=use_cache, **sampling)
    finally:
        hook.remove()
    assert len(new) == n and len(calls) == n  # the prompt's pass and one per new token but the last
    with torch.no_grad():
        full = model.gather_logits(model(torch.tensor([prompt + new])))[0].float()
    caches = {id(kwargs["kv_cache"]) for _, kwargs, _ in calls}
    assert len(caches) == 1 and (calls[0][1]["kv_cache"] is not None) == use_cache
    for i, (args, kwargs, out) in enumerate(calls):
        pos = len(prompt) - 1 + i  # the position whose logits choose new[i]
        if use_cache:
            assert args[0].tolist() == [(prompt + new)[:pos + 1] if i == 0 else [new[i - 1]]]
            assert kwargs["position_offset"] == (0 if i == 0 else pos)
        else:
            assert args[0].tolist() == [(prompt + new)[:pos + 1]]
        assert kwargs["last_only"] and out.shape[:2] == (1, 1)
        torch.testing.assert_close(model.gather_logits(out)[0, -1].float(), full[pos], rtol=1e-5, atol=1e-5)
        if not sampling:
            assert new[i] == int(torch.argmax(full[pos]))
    return new


def test_kv_cache_equals_full_recompute_and_model_forward(ckpt):
    lm = gen.load_model(ckpt)
    model = reference_model(ckpt)
    ids = PROMPT + [11, 12, 13]
    # In float64, so that the comparison sees the cache's logic and not fp32 rounding (logits near 10).
    cached_model, full_model = copy.deepcopy(lm.model).double(), copy.deepcopy(model).double()
    with torch.no_grad():
        full = full_model(torch.tensor([ids]))[0, :, :model.cfg.vocab_size]
    first, *steps = cached_logits(cached_model, ids, 4)
    torch.testing.assert_close(first, full[3], rtol=1e-10, atol=1e-10)
    for pos, logits in enumerate(steps, start=4):
        torch.testing.assert_close(logits, full[pos], rtol=1e-10, atol=1e-10)
    assert first.shape == (model.cfg.vocab_size,) and model.padded_vocab_size > model.cfg.vocab_size
    check_generate_steps(cached_model, PROMPT, NEW)
    check_generate_steps(cached_model, PROMPT, NEW, use_cache=False)
    check_generate_steps(cached_model, PROMPT, NEW, greedy=False, temperature=0.9, top_p=0.95, seed=3)
    assert "core_attention" not in vars(lm.model.layers["0"].attention)  # nothing is patched into the model
    greedy = gen.generate(lm, PROMPT, NEW)
    assert greedy == gen.generate(lm, PROMPT, NEW, use_cache=False) == reference_greedy(model, PROMPT, NEW)
    sampled = dict(greedy=False, temperature=0.9, top_p=0.95, seed=3)
    assert gen.generate(lm, PROMPT, NEW, **sampled) == gen.generate(lm, PROMPT, NEW, use_cache=False, **sampled)


MODELS = {  # GPTConfig overrides of a small random model; init_std 0.5 keeps the logits far from zero
    "learned": dict(position_embedding="learned", recompute="full"),
    "learned-unfused-parallel-residual": dict(position_embedding="learned", core_attention="unfused",
                                              parallel_residual=True, recompute="selective"),
    "rope-gqa-partial-unfused": dict(position_embedding="rope", rotary_percent=0.5, num_query_groups=2,
                                     normalization="rmsnorm", activation="swiglu", core_attention="unfused"),
}


def small_model(position_embedding, recompute="none", **overrides):
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=90, seq_length=16,
                    make_vocab_size_divisible_by=8, init_std=0.5, position_embedding=position_embedding,
                    **overrides)
    return GPTModel(cfg, recompute=recompute).initialize(seed=5).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_kv_cache_on_learned_positions_and_unfused_attention(name):
    # In float64, as above: with logits near 10, fp32 rounding differs by up to ~2e-5 between the cached one-row
    # GEMMs and the full pass (seen on AMD EPYC), which is not the cache's logic.
    model = small_model(**MODELS[name]).double()
    ids = [3, 80, 14, 14, 59, 1, 27, 60, 8, 33, 2, 71]
    with torch.no_grad():
        full = model.gather_logits(model(torch.tensor([ids])))[0]
    for prefill in (1, 5):
        for pos, logits in enumerate(cached_logits(model, ids, prefill), start=prefill - 1):
            torch.testing.assert_close(logits, full[pos], rtol=1e-5, atol=1e-5)
    new = check_generate_steps(model, ids[:5], 16 - 5)  # to the end of the context
    assert new == check_generate_steps(model, ids[:5], 16 - 5, use_cache=False)
    assert new == reference_greedy(model, ids[:5], 16 - 5)


def test_kv_cache_errors():
    model = small_model("learned")
    cache = KVCache()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        with pytest.raises(ValueError, match="one token at a time"):
            model(torch.tensor([[4, 5]]), kv_cache=cache, position_offset=3)
        assert len(cache) == 3 and all(len(s) == 3 for s in cache.slots.values())  # nothing half-appended
        with pytest.raises(ValueError, match="holds 3 positions"):
            model(torch.tensor([[4]]), kv_cache=cache, position_offset=2)
        with pytest.raises(ValueError, match="max_position_embeddings 16"):
            model(torch.tensor([[4, 5]]), position_offset=15)
        with pytest.raises(ValueError, match="not a loss"):
            model(torch.tensor([[4, 5]]), labels=torch.tensor([[5, 6]]), last_only=True)
        with pytest.raises(ValueError, match="not both"):
            model(torch.tensor([[4]]), position_ids=torch.tensor([[3]]), position_offset=3)


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
    check_generate_steps(lm.model, PROMPT, NEW)  # the cached steps under TP: copy_to_tp_region, gathered logits
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
    fails(["--checkpoint", ckpt, "--prompt-ids", "1", "--ep", "2"], "model.num_experts = 0")
    fails(["--checkpoint", ckpt, "--prompt-ids", "1,x"], "comma-separated integers")
    fails(["--checkpoint", ckpt, "--prompt-ids", ",".join(["1"] * 16)], "leaving no room")
