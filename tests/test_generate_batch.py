"""Batched generation and scoring (megagopher.generation.batch) against one prompt at a time: generate_batch
equals generate row by row, token for token, greedy and sampled, on learned-position, rope + GQA + partial
rotary, flash and unfused, parallel-residual models, with rows of different lengths that stop at the
end-of-document id, at a stop callable, at their own max_new_tokens or at the end of the context, at
different steps, more rows than --batch-size; the padded KV cache's logits equal the full forward of each
row alone; finished rows leave the batch; score_batch / score_tokens_batch equal score; and the same at tp 2
(one pooled spawn), where every rank gets the same ids."""
import pytest
import torch

from megagopher import generate as gen
from megagopher import parallel_state as ps
from megagopher.model import GPTConfig, GPTModel
from megagopher.model.attention import KVCache
from megagopher.testing import spawn

MODELS = {  # GPTConfig overrides of a small random model; init_std 0.5 keeps the logits far from ties
    "learned-flash": dict(position_embedding="learned"),
    "learned-unfused-parallel-residual": dict(position_embedding="learned", core_attention="unfused",
                                              parallel_residual=True),
    "rope-gqa-partial-unfused": dict(position_embedding="rope", rotary_percent=0.5, num_query_groups=2,
                                     normalization="rmsnorm", activation="swiglu", core_attention="unfused"),
    "rope-gqa-flash": dict(position_embedding="rope", num_query_groups=2),
}
PROMPTS = [[3, 80, 14], [5], [14, 59, 1, 27, 60, 8, 33], [2, 71, 9, 9], list(range(1, 13)), [40, 41],
           [7, 7, 7, 7, 7], [88, 2]]  # 8 rows, lengths 1..12 (the 12-token one reaches the 16-token context)


def small_model(position_embedding, **overrides):
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=90, seq_length=16,
                    make_vocab_size_divisible_by=8, init_std=0.5, position_embedding=position_embedding,
                    **overrides)
    return GPTModel(cfg).initialize(seed=5).eval()


def one_at_a_time(model, prompts, budgets, eod=None, stops=None, **sampling):
    stops = stops or [None] * len(prompts)
    return [gen.generate(model, p, n, eod=eod, stop=s, **sampling) for p, n, s in zip(prompts, budgets, stops)]


def check_cases(model):
    """Every case of the module docstring on ``model``; returns the batched results (for the TP test)."""
    n = len(PROMPTS)
    free = one_at_a_time(model, PROMPTS, [10] * n)
    assert len({len(f) for f in free}) > 1  # the context's end cuts one row short
    # eod: a token the free rows reach at different steps (or never)
    eod = max(range(90), key=lambda t: len({f.index(t) for f in free if t in f}))
    stops = [None, lambda new: len(new) == 2, lambda new: new[-1] == free[2][4], None] * 2
    budgets = [10, 3, 10, 1, 0, 6, 9, 10]
    out = {}
    for name, kwargs, expected in (
            ("free", dict(max_new_tokens=10), free),
            ("eod", dict(max_new_tokens=10, eod=eod), one_at_a_time(model, PROMPTS, [10] * n, eod=eod)),
            ("stops", dict(max_new_tokens=10, stop=stops), one_at_a_time(model, PROMPTS, [10] * n, stops=stops)),
            ("budgets", dict(max_new_tokens=budgets, eod=eod), one_at_a_time(model, PROMPTS, budgets, eod=eod))):
        done = []
        got = gen.generate_batch(model, PROMPTS, batch_size=3, progress=done.append, **kwargs)
        assert got == expected, name
        assert done == list(range(1, n + 1)), name  # every row reported once
        out[name] = got
    assert len({len(r) for r in out["eod"]}) > 2 and len({len(r) for r in out["stops"]}) > 2
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_generate_batch_equals_one_at_a_time(name):
    check_cases(small_model(**MODELS[name]))


def test_sampled_rows_equal_one_at_a_time():
    model = small_model(**MODELS["rope-gqa-flash"]).double()  # float64: the draws see the same probabilities
    hot = dict(greedy=False, temperature=1.5, top_p=0.9, top_k=40, seed=3)
    expected = one_at_a_time(model, PROMPTS, [8] * len(PROMPTS), **hot)
    assert gen.generate_batch(model, PROMPTS, 8, batch_size=4, **hot) == expected
    assert expected != one_at_a_time(model, PROMPTS, [8] * len(PROMPTS))  # it did sample


@pytest.mark.parametrize("name", ["learned-flash", "rope-gqa-partial-unfused"])
def test_padded_cache_logits_equal_each_row_alone(name):
    """Prefill of right-aligned rows, then two decoding steps and a dropped row: each row's logits equal its
    own uncached full forward (float64, so that the comparison sees the mask and positions, not rounding)."""
    model = small_model(**MODELS[name]).double()
    rows = [[3, 80, 14, 14, 59], [5, 6], [60, 8, 33, 2]]
    pad = [0, 3, 1]
    cache = KVCache(pad=pad)
    ids = torch.tensor([[0] * k + r for k, r in zip(pad, rows)])
    pos = torch.tensor([[max(j - k, 0) for j in range(5)] for k in pad])

    def full(row):
        with torch.no_grad():
            return model.gather_logits(model(torch.tensor([row])))[0, -1]
    with torch.no_grad():
        logits = model.gather_logits(model(ids, kv_cache=cache, position_ids=pos, last_only=True))[:, -1]
        for r, row in enumerate(rows):
            torch.testing.assert_close(logits[r], full(row), rtol=1e-10, atol=1e-10)
        for step, new in enumerate(([11, 12, 13], [21, 22, 23])):
            rows = [row + [t] for row, t in zip(rows, new)]
            logits = model.gather_logits(model(torch.tensor([[t] for t in new]), kv_cache=cache, last_only=True,
                                               position_ids=torch.tensor([[len(r) - 1] for r in rows])))[:, -1]
            for r, row in enumerate(rows):
                torch.testing.assert_close(logits[r], full(row), rtol=1e-10, atol=1e-10)
        cache.keep([0, 2])  # row 1 (3 pads) leaves; row 2's single pad is now the batch's only padding
        rows = [rows[0] + [31], rows[2] + [32]]
        assert len(cache) == 7 and cache.pad.tolist() == [0, 1]
        logits = model.gather_logits(model(torch.tensor([[31], [32]]), kv_cache=cache, last_only=True,
                                           position_ids=torch.tensor([[7], [6]])))[:, -1]
        for r, row in enumerate(rows):
            torch.testing.assert_close(logits[r], full(row), rtol=1e-10, atol=1e-10)
        cache.keep([1])
        assert len(cache) == 7 and cache.pad.tolist() == [0]  # the leading padding no live row needs is gone
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.tensor([[1]]), kv_cache=KVCache(pad=[0]))


def test_finished_rows_leave_the_batch():
    model = small_model(**MODELS["rope-gqa-flash"])
    sizes = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: sizes.append(tuple(args[0].shape)),
                                       with_kwargs=True)
    try:
        new = gen.generate_batch(model, PROMPTS[:4], [1, 3, 5, 7], batch_size=4)
    finally:
        hook.remove()
    assert [len(n) for n in new] == [1, 3, 5, 7]
    assert sizes == [(4, 7), (3, 1), (3, 1), (2, 1), (2, 1), (1, 1), (1, 1)]  # one prefill, then live rows only


def test_score_batch_equals_score():
    model = small_model(**MODELS["rope-gqa-partial-unfused"])
    pairs = [(p, [7, 8, 9][:1 + i % 3]) for i, p in enumerate(PROMPTS)] + [(list(range(20)), [4, 5])]  # cut
    expected = [gen.score(model, c, x) for c, x in pairs]
    done = []
    got = gen.score_tokens_batch(model, pairs, batch_size=3, progress=done.append)
    assert [s for s, _ in got] == pytest.approx(expected, abs=1e-5) and done == [3, 6, 9]
    assert gen.score_batch(model, pairs, batch_size=4) == pytest.approx(expected, abs=1e-5)
    for (context, continuation), (_, greedy) in zip(pairs, got):  # is_greedy: every token the argmax
        seq = (context + continuation)[-16:]
        steps = [gen.generate(model, seq[:len(seq) - len(continuation) + i], 1)[0] for i in range(len(continuation))]
        assert greedy == (steps == continuation)
    context = PROMPTS[2]
    best = gen.generate(model, context, 3)
    assert gen.score_tokens_batch(model, [(context, best)])[0][1] is True


def test_scoring_groups_stay_under_the_logits_budget(monkeypatch):
    """A group's full-vocabulary logits are bounded: with a budget of 3 rows of the longest length, groups are
    cut by padded tokens before batch_size, and the scores are unchanged."""
    from megagopher.generation import batch
    lengths = [5, 9, 9, 2, 4, 7, 1]
    groups = batch._groups(lengths, 4, max_tokens=20)
    assert sum(groups, []) == sorted(range(7), key=lambda i: -lengths[i])
    assert all(len(g) <= 4 and len(g) * lengths[g[0]] <= 20 or len(g) == 1 for g in groups)
    assert [len(g) for g in groups] == [2, 2, 3]   # 9+9 | 7+5 | 4+2+1 (a third 9-long row would pass 20)
    model = small_model(**MODELS["rope-gqa-partial-unfused"])
    pairs = [(p, [7, 8, 9][:1 + i % 3]) for i, p in enumerate(PROMPTS)]
    expected = gen.score_batch(model, pairs, batch_size=8)
    seen = []   # (rows, padded tokens) of every forward
    real = batch._score_group
    monkeypatch.setattr(batch, "_score_group", lambda gpt, rows: seen.append(
        (len(rows), len(rows) * max(len(c) + len(x) - 1 for c, x in rows))) or real(gpt, rows))
    monkeypatch.setattr(batch, "SCORE_LOGITS_ELEMENTS", 12 * model.cfg.vocab_size)  # 12 tokens of logits
    assert gen.score_batch(model, pairs, batch_size=8) == pytest.approx(expected, abs=1e-5)
    assert len(seen) > 1 and all(rows == 1 or tokens <= 12 for rows, tokens in seen), seen


def test_batch_errors():
    model = small_model(**MODELS["learned-flash"])
    for kwargs, message in ((dict(prompts=[[1], []]), "prompt 1 is empty"),
                            (dict(prompts=[[1], [95]]), r"prompt 1 has token ids outside \[0, 90\)"),
                            (dict(prompts=[[1], [1] * 16]), "prompt 1 has 16 tokens"),
                            (dict(prompts=[[1]], stop=[None, None]), "one callable for every prompt"),
                            (dict(prompts=[[1]], max_new_tokens=[1, 2]), "a list of 1"),
                            (dict(prompts=[[1]], batch_size=0), "batch_size")):
        with pytest.raises(ValueError, match=message):
            gen.generate_batch(model, **kwargs)
    with pytest.raises(ValueError, match="pair 1: scoring needs"):
        gen.score_batch(model, [([1], [2]), ([], [3])])
    assert gen.generate_batch(model, []) == [] and gen.score_batch(model, []) == []


def _tp2_worker(rank, world):
    gen.setup_tensor_parallel(2, torch.device("cpu"))
    assert ps.get_tp_size() == 2
    results = {}
    for name in ("learned-unfused-parallel-residual", "rope-gqa-flash"):
        model = small_model(**MODELS[name])  # the same weights as at tp 1 (layout-independent init)
        results[name] = check_cases(model)
        results[name]["score"] = gen.score_batch(model, [(p, [7, 8]) for p in PROMPTS], batch_size=3)
    return results


def test_tp2_batched_equals_one_at_a_time_and_tp1():
    r0, r1 = spawn(_tp2_worker, 2)
    assert r0 == r1  # every rank holds the same ids and scores
    for name in ("learned-unfused-parallel-residual", "rope-gqa-flash"):
        model = small_model(**MODELS[name])
        expected = [gen.score(model, p, [7, 8]) for p in PROMPTS]
        assert r0[name].pop("score") == pytest.approx(expected, abs=1e-4)
        assert r0[name]["free"] == one_at_a_time(model, PROMPTS, [10] * len(PROMPTS))
