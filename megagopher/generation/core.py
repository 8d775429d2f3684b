"""The one-sequence core of generation (megagopher.generate re-exports it): the forward passes, choosing a
token (greedy or sampled), the agreement of tensor- and expert-parallel ranks on it, ``generate`` (one
prompt, KV cache) and ``score`` (one continuation's log-likelihood). The batched forms are in
megagopher.generation.batch; the design is in megagopher/generate.py's docstring and docs/ARCHITECTURE.md 4.6.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.model.attention import KVCache


@dataclass
class LoadedModel:
    """A GPTModel in eval mode with what a caller needs around it."""
    model: torch.nn.Module
    config: object            # GPTConfig
    tokenizer: object         # megagopher.data.tokenizer.Tokenizer, or None when the run had none
    eod: object               # the end-of-document id generation stops at, or None
    iteration: int
    path: str                 # the iter_NNNNNNN directory
    device: torch.device


def _unwrap(model):
    """The GPTModel of a LoadedModel, or the model itself."""
    return model.model if isinstance(model, LoadedModel) else model


# -- the forward passes generation uses -------------------------------------------------------------------
def _next_logits(model, ids, cache=None, offset=0):
    """fp32 logits (real vocabulary) for the token after ``ids``, which sit at positions offset, offset+1...:
    GPTModel.forward with the head on the last position only, extending ``cache`` (a KVCache) when given."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.embedding.word.weight.device)
    logits = model(input_ids, kv_cache=cache, position_offset=offset, last_only=True)  # [1, 1, vocab / tp]
    return model.gather_logits(logits)[0, -1].float()


def full_logits(model, ids):
    """fp32 logits [len(ids), vocab] of GPTModel.forward on one sequence (padding dropped)."""
    model = _unwrap(model)
    device = model.embedding.word.weight.device
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long, device=device))
    return model.gather_logits(out)[0].float()


# -- choosing tokens ----------------------------------------------------------------------------------------
class Sampler:
    """Greedy, or sampling with temperature, top-k and nucleus (top-p, Holtzman et al. 2020) filtering."""

    def __init__(self, greedy=True, temperature=1.0, top_p=1.0, top_k=0, seed=0):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"temperature = {temperature} must be >= 0, top_p = {top_p} in (0, 1], "
                             f"top_k = {top_k} >= 0")
        self.greedy = greedy or temperature == 0
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits):
        logits = logits.detach().double().cpu()
        if self.greedy:
            return int(torch.argmax(logits))
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= self.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _agree(token, device):
    """Every TP rank continues with TP rank 0's token; under expert parallelism every rank with global
    rank 0's (the ranks of an expert-parallel group must run the same steps, all-to-all for all-to-all)."""
    if ps.get_tp_size() == 1 and ps.get_ep_size() == 1:
        return token
    t = torch.tensor([token], dtype=torch.long, device=device)
    if ps.get_ep_size() > 1:
        dist.broadcast(t, src=0)
    else:
        dist.broadcast(t, src=ps.get_tp_ranks()[0], group=ps.get_tp_group())
    return int(t.item())


def context_limit(model):
    """The longest sequence the model was trained for (its position table for learned positions)."""
    return _unwrap(model).cfg.max_position_embeddings


def _check_ids(model, ids, what):
    vocab = model.cfg.vocab_size
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{what} has token ids outside [0, {vocab}): {bad[:5]}")


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens=64, greedy=True, temperature=1.0, top_p=1.0, top_k=0, seed=0,
             eod=None, stop=None, use_cache=True):
    """The new token ids after ``prompt_ids`` (collective under TP: every rank calls it with the same
    arguments and gets the same ids). Stops at ``eod`` (not included), after ``max_new_tokens``, when the
    context is full, or when ``stop(new_ids)`` is true. ``model``: a LoadedModel (``eod`` defaults to its
    tokenizer's) or a GPTModel."""
    if isinstance(model, LoadedModel) and eod is None:
        eod = model.eod
    model = _unwrap(model)
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    _check_ids(model, ids, "the prompt")
    limit = context_limit(model)
    if len(ids) >= limit:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {limit}, leaving no room "
                         "for a new token")
    budget = min(max_new_tokens, limit - len(ids))
    sampler = Sampler(greedy, temperature, top_p, top_k, seed)
    device = model.embedding.word.weight.device
    new = []
    cache = KVCache() if use_cache else None
    logits = _next_logits(model, ids, cache)
    while len(new) < budget:
        token = _agree(sampler(logits), device)
        if token == eod:
            break
        new.append(token)
        if len(new) == budget or (stop is not None and stop(new)):
            break
        # With the cache only the new token runs, at its position; without, the whole sequence again.
        logits = _next_logits(model, [token], cache, len(ids) + len(new) - 1) if use_cache \
            else _next_logits(model, ids + new)
    return new


@torch.no_grad()
def score(model, context_ids, continuation_ids):
    """log P(continuation | context), summed over the continuation's tokens (fp32 log-softmax over the real
    vocabulary). A context too long for the model loses its oldest tokens."""
    model = _unwrap(model)
    context, continuation = [int(i) for i in context_ids], [int(i) for i in continuation_ids]
    if not context or not continuation:
        raise ValueError("score needs at least one context token (e.g. the end-of-document id) and one "
                         "continuation token")
    _check_ids(model, context + continuation, "the input")
    limit = context_limit(model)
    if len(continuation) >= limit:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's context {limit}")
    context = context[-(limit - len(continuation)):] if len(context) + len(continuation) > limit else context
    seq = context + continuation
    logprobs = torch.log_softmax(full_logits(model, seq[:-1]), dim=-1)
    targets = torch.tensor(continuation, device=logprobs.device)
    rows = torch.arange(len(context) - 1, len(seq) - 1, device=logprobs.device)
    return float(logprobs[rows, targets].double().sum())
