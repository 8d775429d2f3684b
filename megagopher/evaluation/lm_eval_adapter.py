"""A model for EleutherAI's lm-evaluation-harness (Gao et al., "A framework for few-shot language model
evaluation", https://github.com/EleutherAI/lm-evaluation-harness), so its tasks run on our checkpoints.

    python -m megagopher.lm_eval --model megagopher --model_args checkpoint=DIR,batch_size=16 --tasks T
    torchrun --nproc-per-node 2 -m megagopher.lm_eval --model megagopher --model_args checkpoint=DIR,tp=2 ...
    (Python: import this module, then lm_eval.simple_evaluate(model="megagopher", model_args={...}, ...))

lm_eval 0.4 finds models only in its registry (lm_eval.api.registry.model_registry, filled by the
``register_model`` decorator or its own lazy table; it reads no entry points), so importing this module is
what makes the name "megagopher" known; megagopher/lm_eval.py imports it and then runs lm_eval's own CLI.

model_args: checkpoint (required: a root with ``latest`` or an iter_ directory), tokenizer_dir (default the
run's data.tokenizer_dir), batch_size (default 16; model_args win over the CLI's --batch_size, whose default
1 lm_eval always passes), max_length (default the model's context, max_position_embeddings), max_gen_toks
(default 256, when a task names none), device (auto, cpu, cuda, cuda:N; a CUDA device on a machine without
CUDA falls back to the CPU, as lm_eval's HF model does with the CLI's default cuda:0), dtype (fp32, bf16, fp16
or float32, bfloat16, float16), tp, seed (of sampling, for tasks with do_sample). batch_size is a number
("auto" is not offered; lm_eval's max_batch_size, which goes with it, is accepted and unused).

The three requests, and how they agree with ``megagopher.evaluate``:
- loglikelihood(context, continuation): the context is ``tok.document_prefix`` (what every document
  started with in training) and the context's tokens; whitespace at the end of the context moves to the
  continuation, and the pair is encoded whole and split after the context's tokens, so the continuation has
  the tokens the model sees in running text (lm_eval's HF model does the same split, but adds the prefix
  only to an empty context). When the tokens merge across the boundary the continuation is encoded alone.
  For multiple choice this is ``--task choice``'s context (prefix + question) and continuation (" " +
  choice). Returns (summed log-probability, whether every continuation token is the greedy one).
- loglikelihood_rolling(text): the windows of megagopher.evaluation.loss (each token scored once; later
  windows keep half a context of history, where lm_eval's HF model restarts each window from one token),
  so the sum equals ``--task loss``'s summed NLL of the same document.
- generate_until(context, gen_kwargs): the prompt is prefix + context tokens, cut from the left to leave
  max_gen_toks of the context; greedy unless the task asks do_sample; a row stops at the end-of-document
  id, after max_gen_toks, or once its text holds a stop string, and the text is cut before the first one.
Requests are scored and generated in batches of batch_size (megagopher.generate.score_tokens_batch and
generate_batch, which group them by length).

Tensor parallelism: under torchrun with tp = the number of processes, every rank loads its shards and runs
every request (the collectives need all ranks); the adapter tells lm_eval rank 0 of 1, as lm_eval's HF model
does under a tp_plan, so the harness does not split the requests, and lm_eval builds and writes the results
on LOCAL_RANK 0 only. Data parallelism over ranks is not offered.
"""
import json
import logging
import os

import torch
import torch.distributed as dist

from megagopher.common import DTYPES, PRECISIONS
from megagopher.evaluation.loss import document_nll

INSTALL_HINT = "pip install megagopher[eval]"

try:
    import lm_eval.models  # noqa: F401  lm_eval's own models: its get_model imports them only into an empty registry
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import simple_parse_args_string
    from tqdm import tqdm
except ImportError as e:
    raise ImportError(f"the lm-evaluation-harness adapter needs the lm_eval package, which is not installed "
                      f"({e}): {INSTALL_HINT}") from e

log = logging.getLogger(__name__)
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")


def _positive_int(key, value, minimum=1):
    """An integer model_arg (lm_eval's CLI passes --batch_size as text); "auto" batch sizes are not offered."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model_args {key}={value!r}: expected an integer >= {minimum}")
    return value


def _precision(dtype):
    """fp32/bf16/fp16, also by torch's names (lm_eval's HF model takes dtype=float32, bfloat16...)."""
    by_name = {row.name: row.precision for row in DTYPES if row.precision}
    if dtype in PRECISIONS or dtype in by_name:
        return by_name.get(dtype, dtype)
    raise ValueError(f"model_args dtype={dtype!r}: valid: {', '.join(PRECISIONS + tuple(by_name))}")


def _device(device):
    """A device for load_model from lm_eval's device names: auto, cpu, cuda, cuda:N."""
    name = "auto" if device is None else str(device)
    if name in ("auto", "cpu"):
        return name
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"model_args device={device!r}: valid: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        log.warning("device %s: CUDA is not available here; using the CPU", name)
        return "cpu"
    # Under torchrun every rank takes its LOCAL_RANK's GPU (megagopher.common.pick_device).
    return torch.device(name) if ":" in name and "LOCAL_RANK" not in os.environ else "cuda"


def _stop_on(tok, until):
    """``stop(new_ids)`` for generate_batch: true once the decoded text holds one of ``until``."""
    until = [u for u in until if u]
    if not until:
        return None
    return lambda new_ids: any(u in tok.decode(new_ids) for u in until)


@register_model("megagopher")
class MegagopherLM(LM):
    """lm_eval's LM on a megagopher checkpoint (see the module docstring)."""

    def __init__(self, checkpoint=None, tokenizer_dir=None, batch_size=16, max_length=None, max_gen_toks=256,
                 device="auto", dtype="fp32", tp=None, seed=0, max_batch_size=None):
        super().__init__()
        from megagopher.generate import context_limit, load_model
        if not checkpoint:
            raise ValueError("model_args checkpoint=DIR is required: a checkpoint root (with latest) or an "
                             "iter_NNNNNNN directory")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.seed = _positive_int("seed", seed, 0)
        if tp is not None:
            _positive_int("tp", tp)
        self.lm = load_model(str(checkpoint), tp=tp, device=_device(device), dtype=_precision(dtype),
                             tokenizer_dir=tokenizer_dir, need_tokenizer=True)
        self.tok = self.lm.tokenizer
        limit = context_limit(self.lm)
        self.max_length = limit if max_length is None else _positive_int("max_length", max_length, 2)
        if self.max_length > limit:
            raise ValueError(f"model_args max_length={max_length}: the model's context is {limit} tokens")
        self.prefix = [int(i) for i in self.tok.document_prefix]
        self._device = self.lm.device
        self._reports = not dist.is_initialized() or dist.get_rank() == 0

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """The model_args, with the harness's own batch_size/device (the CLI always passes its defaults)
        filling in only what model_args leave out."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(extra | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def tokenizer_name(self):
        return f"megagopher:{self.tok.kind}:{self.tok.directory}"

    def get_model_info(self):
        """What lm_eval records in the results' config."""
        from megagopher import parallel_state as ps
        return {"checkpoint": self.lm.path, "iteration": self.lm.iteration, "tokenizer": self.tok.directory,
                "tp": ps.get_tp_size() if ps.is_initialized() else 1, "max_length": self.max_length}

    # -- tokens -------------------------------------------------------------------------------------------
    def encode_pairs(self, pairs):
        """[(context ids, continuation ids)] of (context, continuation) texts (see the module docstring)."""
        split = []
        for context, continuation in pairs:
            stripped = context.rstrip()
            split.append((stripped, context[len(stripped):] + continuation))
        contexts = self.tok.encode_batch([c for c, _ in split])
        wholes = self.tok.encode_batch([c + x for c, x in split])
        out = []
        for (context, continuation), ctx, whole in zip(split, contexts, wholes):
            cont = whole[len(ctx):] if context and whole[:len(ctx)] == ctx else self.tok.encode(continuation)
            ctx = self.prefix + ctx
            if not ctx and cont:  # no prefix and no context: the first token is context only, as in lm_eval
                ctx, cont = cont[:1], cont[1:]
            out.append((ctx, cont))
        return out

    def _fit(self, context, continuation):
        """The pair cut from the left to max_length tokens."""
        if len(continuation) >= self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length "
                             f"{self.max_length}")
        keep = self.max_length - len(continuation)
        return (context[-keep:] if len(context) > keep else context), continuation

    def _score(self, pairs, desc, disable_tqdm):
        """[(log-likelihood, is_greedy)] of token pairs, in batches of batch_size (score_tokens_batch groups
        them by length)."""
        from megagopher.generate import score_tokens_batch
        out = [(0.0, True)] * len(pairs)  # an empty continuation has probability one
        scorable = [i for i, (_, continuation) in enumerate(pairs) if continuation]
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm or not self._reports)
        bar.update(len(pairs) - len(scorable))
        base = bar.n
        scored = score_tokens_batch(self.lm, [self._fit(*pairs[i]) for i in scorable], self.batch_size,
                                    progress=lambda done: bar.update(base + done - bar.n))
        for i, (logprob, greedy) in zip(scorable, scored):
            out[i] = (float(logprob), bool(greedy))
        bar.close()
        return out

    # -- the three requests ---------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm=False):
        args = [tuple(r.args) for r in requests]
        results = self._score(self.encode_pairs(args), "loglikelihood", disable_tqdm)
        for arg, result in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", arg, result)
        return results

    def rolling_windows(self, text):
        """The (context ids, continuation ids) windows of ``text``: megagopher.evaluation.loss's, recorded."""
        windows = []

        def record(context, continuation):
            windows.append((list(context), list(continuation)))
            return 0.0
        document_nll(self.prefix + self.tok.encode(text), record, self.max_length)
        return windows

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        owners, windows = [], []
        for n, request in enumerate(requests):
            for window in self.rolling_windows(request.args[0]):
                owners.append(n)
                windows.append(window)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(request.args), total)
        return totals

    def _gen_settings(self, gen_kwargs):
        """(stop strings, max_gen_toks, sampling settings) of one request's gen_kwargs."""
        kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks))
        until, max_gen_toks = list(kwargs.pop("until")), int(kwargs.pop("max_gen_toks"))
        ignored = sorted(k for k in kwargs if k not in SAMPLING_KEYS)
        if ignored:
            log.warning("generate_until: gen_kwargs %s are not used by the megagopher model", ignored)
        if max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in max_length "
                             f"{self.max_length}")
        sampling = {"greedy": not kwargs.get("do_sample"), "temperature": float(kwargs.get("temperature") or 1.0),
                    "top_p": float(kwargs.get("top_p", 1.0)), "top_k": int(kwargs.get("top_k") or 0)}
        return until, max_gen_toks, sampling

    def generate_until(self, requests, disable_tqdm=False):
        from megagopher.generate import generate_batch
        groups = {}  # one generate_batch call per sampling setting; stop strings and budgets are per row
        for n, request in enumerate(requests):
            until, max_gen_toks, sampling = self._gen_settings(request.args[1])
            prompt = (self.prefix + self.tok.encode(request.args[0]))[-(self.max_length - max_gen_toks):]
            groups.setdefault(json.dumps(sampling, sort_keys=True), (sampling, []))[1].append(
                (n, prompt, max_gen_toks, until))
        texts = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self._reports)
        for sampling, rows in groups.values():
            base = bar.n
            new = generate_batch(self.lm, [row[1] for row in rows], [row[2] for row in rows],
                                 stop=[_stop_on(self.tok, row[3]) for row in rows], seed=self.seed,
                                 batch_size=self.batch_size, progress=lambda done: bar.update(base + done - bar.n),
                                 **sampling)
            for (n, _, _, until), ids in zip(rows, new):
                texts[n] = postprocess_generated_text(self.tok.decode(ids), until, None)
                self.cache_hook.add_partial("generate_until", tuple(requests[n].args), texts[n])
        bar.close()
        return texts
