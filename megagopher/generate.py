"""Text generation from a checkpoint, alone or tensor-parallel under torchrun (docs/ARCHITECTURE.md 4.6).

    python -m megagopher.generate --checkpoint DIR (--prompt TEXT | --prompt-ids 5,17,42) \\
           [--max-new-tokens N] [--greedy | --temperature T --top-p P [--top-k K]] [--seed S]
    torchrun --nproc-per-node 2 -m megagopher.generate --checkpoint DIR --prompt-ids 5,17,42 --tp 2
    torchrun --nproc-per-node 4 -m megagopher.generate --checkpoint MOE_DIR --prompt-ids 5,17 --tp 2 --ep 2

DIR is a checkpoint root (``latest`` names the newest) or one ``iter_NNNNNNN`` directory. The weights load
into a GPTModel at the requested TP size (pp = 1) from any saved layout. With ``--prompt-ids`` the last
line printed is the new token ids separated by spaces; with ``--prompt`` the run's tokenizer
(data.tokenizer_dir) encodes the prompt and the new text is printed. Decoding is greedy unless
``--temperature``/``--top-p``/``--top-k`` ask for sampling. Generation stops at the end-of-document id
(which is not part of the output), after ``--max-new-tokens``, or when the context reaches the model's
trained length (max_position_embeddings).

KV cache. Each layer's keys and values are kept, so a step runs the model on one new token instead of the
whole sequence: O(n) work per token instead of O(n^2), which matters for evaluation (hundreds of problems
times a hundred tokens). The cache is an argument of the model itself: generation calls GPTModel.forward
with a ``KVCache`` (megagopher.model.gpt; one slot of keys and values per layer), ``position_offset`` (the
first new token's position, for the learned positions and the rotary tables) and ``last_only`` (the output
head on the last position alone). The prompt is one causal pass that fills the cache; a step is one query
against every cached key (no mask needed). ``use_cache=False`` runs the same forward on the full sequence
each step; the tests check both against GPTModel.forward without a cache.

Tensor parallelism. Every rank runs the model on its shards; the vocab-parallel logits are gathered, so all
ranks hold the same full logits. The token is chosen on TP rank 0 (its generator seeded with ``--seed``)
and broadcast, so every rank extends the same sequence whatever the floating-point ties. Logits past the
real vocabulary (TP padding) are dropped before choosing and can never be sampled.

Expert parallelism (a MoE checkpoint, ``--ep``): the world is tp x ep processes, every one running the same
sequence; each expert-parallel rank holds 1/ep of every MoE layer's experts and the tokens reach them by
all-to-all (model/moe_dispatch.py), so a model too large for one device's experts still generates. The
token is then chosen on global rank 0 and broadcast to every rank.

Python API (used by megagopher.evaluate): ``load_model(checkpoint, tp, ep=1)``, ``generate(model, ids, ...)``
-> new ids, ``score(model, context_ids, continuation_ids)`` -> log-likelihood of the continuation.
"""
import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import DEVICES, PRECISION_DTYPES, PRECISIONS, pick_device
from megagopher.errors import EXIT_INPUT_ERROR
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


# -- loading --------------------------------------------------------------------------------------------
def setup_tensor_parallel(tp, device, ep=1):
    """Process groups for ``tp`` x ``ep`` ranks (pp = 1, dp = ep). One process needs none; under torchrun
    the world must be exactly tp * ep processes. Returns the TP size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        world = dist.get_world_size()
    for flag, value in (("--ep", ep), ("--tp", tp)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} {value!r} must be a positive integer")
    tp = world // ep if tp is None else tp
    if tp * ep != world:
        hint = f"run under torchrun --nproc-per-node {tp * ep}" if world == 1 else \
            f"use --tp {world // ep}" if world % ep == 0 else f"--ep {ep} does not divide {world}"
        raise ValueError(f"--tp {tp} --ep {ep} needs {tp * ep} processes but there are {world}: {hint}")
    if ps.is_initialized():
        if ps.get_tp_size() != tp or ps.get_pp_size() != 1 or ps.get_ep_size() != ep:
            raise ValueError(f"parallel state already set up with tp {ps.get_tp_size()}, pp {ps.get_pp_size()}, "
                             f"ep {ps.get_ep_size()}; generation needs tp {tp}, pp 1, ep {ep}")
        return tp
    if world == 1:
        return 1  # one process: the parallel layers need no process group
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ps.initialize_model_parallel(tp=tp, ep=ep)
    return tp


def load_model(checkpoint, tp=None, device="auto", dtype="fp32", tokenizer_dir=None, need_tokenizer=False, ep=1):
    """Builds a GPTModel for ``tp`` x ``ep`` ranks (collective: every rank calls it) and loads the weights
    of ``checkpoint`` (a root with ``latest`` or an iter_ directory), saved under any layout."""
    from megagopher.export.loading import load_run_tokenizer, model_config_of, open_checkpoint
    from megagopher.model import GPTModel
    from megagopher.training.checkpoint import load_weights
    if dtype not in PRECISION_DTYPES:
        raise ValueError(f"dtype {dtype!r}; valid: {', '.join(PRECISIONS)}")
    device = device if isinstance(device, torch.device) else pick_device(device)
    reader = open_checkpoint(checkpoint)
    cfg = model_config_of(reader)
    tokenizer = load_run_tokenizer(reader, tokenizer_dir, required=need_tokenizer)
    if ep > 1 and (not cfg.num_experts or cfg.num_experts % ep):
        raise ValueError(f"--ep {ep}: the checkpoint's model has model.num_experts = {cfg.num_experts}, which "
                         "must be a positive multiple of it")
    tp = setup_tensor_parallel(tp, device, ep)
    if cfg.num_query_groups % tp or cfg.num_attention_heads % tp:
        raise ValueError(f"--tp {tp}: model.num_query_groups = {cfg.num_query_groups} and "
                         f"model.num_attention_heads = {cfg.num_attention_heads} must be divisible by it")
    model = GPTModel(cfg)
    load_weights(reader, [model])
    model.to(device=device, dtype=PRECISION_DTYPES[dtype]).eval()
    return LoadedModel(model, cfg, tokenizer, tokenizer.eod if tokenizer is not None else None,
                       int(reader.meta["iteration"]), reader.path, device)


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


# -- command line ---------------------------------------------------------------------------------------------
def parse_ids(text):
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 5,17,42") from None


def build_parser():
    p = argparse.ArgumentParser(prog="python -m megagopher.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (with latest) or an iter_ directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the run's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, e.g. 5,17,42")
    p.add_argument("--max-new-tokens", type=int, default=64)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (samples)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the number of processes "
                                                         "/ --ep)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size of a MoE checkpoint (processes = tp * ep)")
    p.add_argument("--eod", type=int, default=None, help="stop id (default: the tokenizer's end-of-document; "
                                                         "-1 never stops early)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default: the run's data.tokenizer_dir)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="fp32", choices=PRECISIONS)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.greedy and args.top_p is not None:
            raise ValueError("--greedy and --top-p exclude each other")
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
        sampling = args.temperature is not None or args.top_p is not None or args.top_k > 0
        lm = load_model(args.checkpoint, tp=args.tp, device=args.device, dtype=args.dtype,
                        tokenizer_dir=args.tokenizer_dir, need_tokenizer=args.prompt is not None, ep=args.ep)
        ids = lm.tokenizer.encode(args.prompt) if args.prompt is not None else parse_ids(args.prompt_ids)
        eod = lm.eod if args.eod is None else (None if args.eod < 0 else args.eod)
        new = generate(lm.model, ids, args.max_new_tokens, greedy=not sampling,
                       temperature=1.0 if args.temperature is None else args.temperature,
                       top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k, seed=args.seed,
                       eod=eod, use_cache=not args.no_cache)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"megagopher.generate: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megagopher.generate: {lm.path} (iteration {lm.iteration}), tp {ps.get_tp_size()}, "
              f"ep {ps.get_ep_size()}, "
              f"{len(ids)} prompt tokens, {len(new)} new", file=sys.stderr, flush=True)
        if args.prompt is not None:
            print(lm.tokenizer.decode(new), flush=True)
        else:
            print(" ".join(map(str, new)), flush=True)
    ps.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
