"""Batched generation and scoring: many prompts through one forward per step (docs/ARCHITECTURE.md 4.6).

generate_batch. The prompts are sorted by length (longest first) and cut into groups of ``batch_size``, so
a group's rows differ little in length and padding stays small. A group's prompts are right-aligned
(padded on the left, as transformers and lm-evaluation-harness batch a decoder's prompts) and run as one
prefill into a padded KVCache (megagopher.model.attention): each row carries its own position ids, so its
tokens sit at the positions they would hold alone, and every query sees only its own row's real keys (the
flash kernel's key-bounds mask, or the unfused path's masked softmax). Each decoding step then runs every
live row's newest token in one forward. A row finishes at the end-of-document id (not part of the
output), after its budget (``max_new_tokens``, and the room left in the model's context), or when its stop
callable says so; finished rows leave the batch at once (KVCache.keep drops their keys and values and the
padding no live row needs), so late steps cost only what the live rows cost. Greedy rows equal
``generate`` row by row; sampled rows each use their own Sampler seeded with ``seed``, as ``generate`` on
that row alone would. Memory is bounded by ``batch_size`` rows of at most the model's context.

Under tensor (and expert) parallelism every rank runs the same rows; the tokens of all live rows are
chosen on TP rank 0 (global rank 0 under EP) and sent in one broadcast per step, so every rank drops the
same rows at the same step. ``batch_size`` 1 runs ``generate`` itself, one prompt at a time.

score_tokens_batch. Every (context, continuation) row, cut as ``score`` cuts it, runs without a cache:
padded on the right, where causal attention keeps a row's real positions from ever seeing the padding, so
the training forward itself serves (grouped by length, ``batch_size`` rows at a time). A MoE model with a
capacity factor routes the batch's tokens together (as in training), so its results can differ from one
row at a time.
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.model.attention import KVCache

from .core import LoadedModel, Sampler, _check_ids, _unwrap, context_limit, generate


def _row_stops(stop, n):
    """One stop callable (or None) per row from None, one callable, or a list of n."""
    if stop is None or callable(stop):
        return [stop] * n
    stops = list(stop)
    if len(stops) != n or not all(s is None or callable(s) for s in stops):
        raise ValueError(f"stop: give one callable for every prompt or a list of {n} callables (or None), "
                         f"got {len(stops)} items")
    return stops


def _row_budgets(max_new_tokens, n):
    """One new-token limit per row from one int or a list of n."""
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or not all(isinstance(b, int) and b >= 0 for b in budgets):
        raise ValueError(f"max_new_tokens = {max_new_tokens!r}: give one integer >= 0, or a list of {n}")
    return budgets


def _checked_prompts(model, prompts):
    limit = context_limit(model)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        _check_ids(model, ids, f"prompt {i}")
        if len(ids) >= limit:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context is {limit}, leaving no room "
                             "for a new token")
        rows.append(ids)
    return rows


# Scoring holds a group's full-vocabulary logits at once (rows x longest row x vocabulary): at most this
# many elements (1 GiB in fp32), so a Llama-3-sized vocabulary and long documents cut the group instead of
# exhausting memory; one row is always allowed.
SCORE_LOGITS_ELEMENTS = 1 << 28


def _groups(lengths, batch_size, max_tokens=None):
    """Row indices by decreasing length (ties in input order), at most ``batch_size`` at a time and, when
    ``max_tokens`` is given, at most that many padded tokens (rows x the group's longest row) per group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, group = [], []
    for i in order:
        # A group's first row is its longest (decreasing order), so its padded size is rows x that length.
        full = len(group) == batch_size or (max_tokens is not None and group
                                            and (len(group) + 1) * lengths[group[0]] > max_tokens)
        if full:
            groups.append(group)
            group = []
        group.append(i)
    return groups + ([group] if group else [])


def _agree_batch(tokens, device):
    """Every rank continues every row with rank 0's tokens: one broadcast for the whole batch (core._agree)."""
    if ps.get_tp_size() == 1 and ps.get_ep_size() == 1:
        return tokens
    t = torch.tensor(tokens, dtype=torch.long, device=device)
    if ps.get_ep_size() > 1:
        dist.broadcast(t, src=0)
    else:
        dist.broadcast(t, src=ps.get_tp_ranks()[0], group=ps.get_tp_group())
    return t.tolist()


def _forward(gpt, tokens, positions, cache):
    """fp32 full-vocabulary logits [b, vocab] of each row's last token through the padded cache."""
    device = gpt.embedding.word.weight.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    return gpt.gather_logits(gpt(ids, kv_cache=cache, position_ids=pos, last_only=True))[:, -1].float()


def _prefill(gpt, prompts):
    """The group's prompts right-aligned in one causal pass: (padded cache, next-token logits [b, vocab])."""
    longest = max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    tokens = [[0] * k + p for k, p in zip(pad, prompts)]  # id 0 fills the padding: any id would do, it is masked
    positions = [[max(j - k, 0) for j in range(longest)] for k in pad]
    cache = KVCache(pad=pad)
    return cache, _forward(gpt, tokens, positions, cache)


def _choose(logits, samplers):
    """The live rows' tokens: argmax in float64 as Sampler does, or each row's own sampler."""
    if samplers is None:
        return logits.double().argmax(dim=-1).tolist()
    return [sampler(row) for sampler, row in zip(samplers, logits)]


def _generate_group(gpt, prompts, budgets, stops, samplers, eod, finished):
    """The new ids of one group's rows; ``finished()`` is called as each row ends."""
    device = gpt.embedding.word.weight.device
    new = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the group's rows still generating, in the cache's row order
    cache, logits = _prefill(gpt, prompts)
    while live:
        chosen = _agree_batch(_choose(logits, None if samplers is None else [samplers[r] for r in live]), device)
        keep = []
        for slot, (row, token) in enumerate(zip(live, chosen)):
            done = token == eod
            if not done:
                new[row].append(token)
                done = len(new[row]) >= budgets[row] or (stops[row] is not None and bool(stops[row](new[row])))
            if done:
                finished()
            else:
                keep.append(slot)
        if len(keep) < len(live):
            live = [live[s] for s in keep]
            if not live:
                break
            cache.keep(keep)
        logits = _forward(gpt, [[new[r][-1]] for r in live],
                          [[len(prompts[r]) + len(new[r]) - 1] for r in live], cache)
    return new


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens=64, eod=None, stop=None, greedy=True, temperature=1.0,
                   top_p=1.0, top_k=0, seed=0, batch_size=32, progress=None):
    """The new ids of every prompt, in order (collective under TP/EP: every rank calls it with the same
    arguments). ``max_new_tokens``: one limit, or a list with one per prompt. ``stop``: None, one callable
    ``stop(new_ids) -> bool`` for all rows, or a list with one callable (or None) per prompt.
    ``progress(done)``: called with the number of prompts finished so far. ``model``: a LoadedModel (``eod``
    defaults to its tokenizer's) or a GPTModel. See the module docstring."""
    if isinstance(model, LoadedModel) and eod is None:
        eod = model.eod
    gpt = _unwrap(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} must be a positive integer")
    rows, stops = _checked_prompts(gpt, prompts), _row_stops(stop, len(prompts))
    wanted = _row_budgets(max_new_tokens, len(rows))
    Sampler(greedy, temperature, top_p, top_k, seed)  # bad sampling arguments fail before any work
    done = [0]

    def finished():
        done[0] += 1
        if progress is not None:
            progress(done[0])

    if batch_size == 1:  # one at a time: generate itself, the reference the batched path is tested against
        out = []
        for ids, n, row_stop in zip(rows, wanted, stops):
            out.append(generate(gpt, ids, n, greedy, temperature, top_p, top_k, seed, eod, row_stop))
            finished()
        return out
    limit = context_limit(gpt)
    budgets = [min(n, limit - len(ids)) for ids, n in zip(rows, wanted)]
    out = [[] for _ in rows]
    for _ in (i for i, b in enumerate(budgets) if b == 0):
        finished()
    for group in _groups([len(ids) for ids in rows], batch_size):
        group = [i for i in group if budgets[i] > 0]
        if not group:
            continue
        sampling = not (greedy or temperature == 0)
        samplers = [Sampler(False, temperature, top_p, top_k, seed) for _ in group] if sampling else None
        new = _generate_group(gpt, [rows[i] for i in group], [budgets[i] for i in group],
                              [stops[i] for i in group], samplers, eod, finished)
        for i, ids in zip(group, new):
            out[i] = ids
    return out


def _checked_pair(model, context_ids, continuation_ids, index):
    """(context, continuation) as ``score`` takes them: a context too long loses its oldest tokens."""
    context, continuation = [int(i) for i in context_ids], [int(i) for i in continuation_ids]
    if not context or not continuation:
        raise ValueError(f"pair {index}: scoring needs at least one context token (e.g. the end-of-document id) "
                         "and one continuation token")
    _check_ids(model, context + continuation, f"pair {index}")
    limit = context_limit(model)
    if len(continuation) >= limit:
        raise ValueError(f"pair {index}: a continuation of {len(continuation)} tokens does not fit the model's "
                         f"context {limit}")
    if len(context) + len(continuation) > limit:
        context = context[-(limit - len(continuation)):]
    return context, continuation


def _score_group(gpt, pairs):
    """[(sum of log-probabilities, every token the argmax)] of right-padded rows in one forward."""
    inputs = [(c + x)[:-1] for c, x in pairs]
    longest = max(len(s) for s in inputs)
    device = gpt.embedding.word.weight.device
    ids = torch.tensor([s + [0] * (longest - len(s)) for s in inputs], dtype=torch.long, device=device)
    logits = gpt.gather_logits(gpt(ids))
    out = []
    for r, (context, continuation) in enumerate(pairs):
        rows = logits[r, len(context) - 1:len(context) - 1 + len(continuation)].float()
        targets = torch.tensor(continuation, device=rows.device)
        logprobs = torch.log_softmax(rows, dim=-1)
        total = float(logprobs[torch.arange(len(continuation), device=rows.device), targets].double().sum())
        out.append((total, bool((rows.argmax(dim=-1) == targets).all())))
    return out


@torch.no_grad()
def score_tokens_batch(model, pairs, batch_size=32, progress=None):
    """[(log P(continuation | context) summed over its tokens, whether every continuation token is the argmax
    of its position's logits)] for each (context_ids, continuation_ids), each sum equal to ``score``."""
    gpt = _unwrap(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} must be a positive integer")
    checked = [_checked_pair(gpt, c, x, i) for i, (c, x) in enumerate(pairs)]
    out = [None] * len(checked)
    done = 0
    max_tokens = max(1, SCORE_LOGITS_ELEMENTS // gpt.cfg.vocab_size)
    for group in _groups([len(c) + len(x) - 1 for c, x in checked], batch_size, max_tokens):
        for i, result in zip(group, _score_group(gpt, [checked[i] for i in group])):
            out[i] = result
        done += len(group)
        if progress is not None:
            progress(done)
    return out


def score_batch(model, pairs, batch_size=32, progress=None):
    """[score(model, context, continuation) for each (context, continuation) pair], batched."""
    return [total for total, _ in score_tokens_batch(model, pairs, batch_size, progress)]
