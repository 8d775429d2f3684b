"""Text generation from a checkpoint, alone or tensor-parallel under torchrun (docs/ARCHITECTURE.md 4.6).

    python -m megagopher.generate --checkpoint DIR (--prompt TEXT | --prompt-ids 5,17,42 | --prompts-file F.jsonl) \\
           [--max-new-tokens N] [--greedy | --temperature T --top-p P [--top-k K]] [--seed S] [--batch-size B]
    torchrun --nproc-per-node 2 -m megagopher.generate --checkpoint DIR --prompt-ids 5,17,42 --tp 2
    torchrun --nproc-per-node 4 -m megagopher.generate --checkpoint MOE_DIR --prompt-ids 5,17 --tp 2 --ep 2

DIR is a checkpoint root (``latest`` names the newest) or one ``iter_NNNNNNN`` directory. The weights load
into a GPTModel at the requested TP size (pp = 1) from any saved layout. With ``--prompt-ids`` the last
line printed is the new token ids separated by spaces; with ``--prompt`` the run's tokenizer
(data.tokenizer_dir) encodes the prompt (after BOS when the tokenizer adds one, as transformers'
AutoTokenizer does; GPT-2 BPE adds nothing) and the new text alone is printed. ``--prompts-file`` (JSONL, a
line {"prompt": TEXT} or {"prompt_ids": [ids]}) generates every prompt, ``--batch-size`` a forward
(generation/batch.py), with a progress line on stderr, and prints one line {"index", "new_ids", "text"} per
prompt, in order. Decoding is greedy unless
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

Batches (megagopher.generation.batch; evaluation and --prompts-file). Many prompts share one forward per
step: sorted by length and cut into groups of ``batch_size``, right-aligned in a padded KVCache whose rows
carry their own positions and mask their padding, each row stopping on its own; finished rows leave the
batch. Greedy output equals ``generate`` row by row; ``batch_size`` 1 is ``generate`` itself.

Tensor parallelism. Every rank runs the model on its shards; the vocab-parallel logits are gathered, so all
ranks hold the same full logits. The token is chosen on TP rank 0 (its generator seeded with ``--seed``)
and broadcast, so every rank extends the same sequence whatever the floating-point ties (in a batch, one
broadcast carries every live row's token). Logits past the
real vocabulary (TP padding) are dropped before choosing and can never be sampled.

Expert parallelism (a MoE checkpoint, ``--ep``): the world is tp x ep processes, every one running the same
sequence; each expert-parallel rank holds 1/ep of every MoE layer's experts and the tokens reach them by
all-to-all (model/moe_dispatch.py), so a model too large for one device's experts still generates. The
token is then chosen on global rank 0 and broadcast to every rank.

Python API (used by megagopher.evaluate and the lm-evaluation-harness adapter):
``load_model(checkpoint, tp, ep=1)``; ``generate(model, ids, ...)`` -> new ids;
``score(model, context_ids, continuation_ids)`` -> log-likelihood of the continuation;
``generate_batch(model, prompts, max_new_tokens=64, eod=None, stop=None, greedy=True, temperature=1.0,
top_p=1.0, top_k=0, seed=0, batch_size=32, progress=None)`` -> [new ids of each prompt] (``max_new_tokens``:
one int, or a list with one per prompt; ``stop``: None,
one callable ``stop(new_ids) -> bool`` for every row, or a list of one callable or None per row; greedy
equals ``generate`` row by row, token for token);
``score_batch(model, pairs, batch_size=32, progress=None)`` -> [log-likelihood of each (context_ids,
continuation_ids)], each equal to ``score``; ``score_tokens_batch(model, pairs, batch_size=32,
progress=None)`` -> [(summed log-likelihood,
is_greedy)] where is_greedy is true when every continuation token is the argmax of its position's logits
(lm-evaluation-harness's loglikelihood pair). ``progress``: None, or a callable ``progress(done)`` called as
rows finish.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import DEVICES, PRECISION_DTYPES, PRECISIONS, pick_device
from megagopher.errors import EXIT_INPUT_ERROR
from megagopher.generation.batch import generate_batch, score_batch, score_tokens_batch  # noqa: F401 (API)
from megagopher.generation.core import (LoadedModel, Sampler, _unwrap, context_limit, full_logits,  # noqa: F401
                                        generate, score)


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
    prompt.add_argument("--prompts-file", help="JSONL of {\"prompt\": TEXT} or {\"prompt_ids\": [ids]}, one a line: "
                                               "generated in batches, one JSON line printed each")
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
    p.add_argument("--batch-size", type=int, default=32, help="--prompts-file: prompts a forward (default 32)")
    return p


def text_prompt_ids(tok, text):
    """A text prompt's ids: BOS first when the tokenizer adds one (as transformers' AutoTokenizer does for a
    Llama), else the text's tokens alone (GPT-2 BPE: a prompt continues whatever came before it)."""
    return ([tok.bos] if tok.add_bos and tok.bos is not None else []) + tok.encode(text)


def read_prompts(path):
    """[(text or None, ids or None)] of a JSONL file, one {"prompt": TEXT} or {"prompt_ids": [ids]} a line."""
    from megagopher.evaluation.common import read_jsonl
    rows = []
    for i, row in enumerate(read_jsonl(path)):
        text, ids = row.get("prompt"), row.get("prompt_ids")
        if (text is None) == (ids is None) or (text is not None and not isinstance(text, str)) or \
                (ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids))):
            raise ValueError(f"{path} prompt {i + 1}: expected {{\"prompt\": TEXT}} or {{\"prompt_ids\": [ids]}}, "
                             f"got keys {sorted(row)}")
        rows.append((text, ids))
    return rows


def _generate_args(args):
    """The sampling keyword arguments of generate / generate_batch from the command line."""
    sampling = args.temperature is not None or args.top_p is not None or args.top_k > 0
    return dict(greedy=not sampling, temperature=1.0 if args.temperature is None else args.temperature,
                top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k, seed=args.seed)


def _check_cli(args):
    if args.greedy and args.top_p is not None:
        raise ValueError("--greedy and --top-p exclude each other")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if args.no_cache and args.prompts_file is not None:
        raise ValueError("--no-cache is for one prompt (--prompt or --prompt-ids), not --prompts-file")


def _run_prompts_file(args, lm, rows, eod):
    """Generates every prompt of --prompts-file in batches; rank 0 prints one JSON line each, in order."""
    from megagopher.generation.progress import Progress
    prompts = [text_prompt_ids(lm.tokenizer, text) if text is not None else ids for text, ids in rows]
    progress = Progress(len(prompts), "megagopher.generate", "prompts")
    new = generate_batch(lm, prompts, args.max_new_tokens, eod=eod, batch_size=args.batch_size,
                         progress=progress, **_generate_args(args))
    if not dist.is_initialized() or dist.get_rank() == 0:
        for i, ids in enumerate(new):
            line = {"index": i, "new_ids": ids}
            if lm.tokenizer is not None:
                line["text"] = lm.tokenizer.decode(ids)
            print(json.dumps(line), flush=True)
    return sum(len(p) for p in prompts), sum(len(ids) for ids in new)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        _check_cli(args)
        rows = read_prompts(args.prompts_file) if args.prompts_file is not None else None
        text = args.prompt is not None or (rows is not None and any(t is not None for t, _ in rows))
        lm = load_model(args.checkpoint, tp=args.tp, device=args.device, dtype=args.dtype,
                        tokenizer_dir=args.tokenizer_dir, need_tokenizer=text, ep=args.ep)
        eod = lm.eod if args.eod is None else (None if args.eod < 0 else args.eod)
        if rows is not None:
            n_prompt, n_new = _run_prompts_file(args, lm, rows, eod)
        else:
            ids = text_prompt_ids(lm.tokenizer, args.prompt) if args.prompt is not None else \
                parse_ids(args.prompt_ids)
            new = generate(lm.model, ids, args.max_new_tokens, eod=eod, use_cache=not args.no_cache,
                           **_generate_args(args))
            n_prompt, n_new = len(ids), len(new)
    except (ValueError, FileNotFoundError, KeyError, IsADirectoryError) as e:
        print(f"megagopher.generate: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megagopher.generate: {lm.path} (iteration {lm.iteration}), tp {ps.get_tp_size()}, "
              f"ep {ps.get_ep_size()}, {n_prompt} prompt tokens, {n_new} new", file=sys.stderr, flush=True)
        if rows is None:
            print(lm.tokenizer.decode(new) if args.prompt is not None else " ".join(map(str, new)), flush=True)
    ps.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
