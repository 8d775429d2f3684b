"""Held-out loss: the mean per-token negative log-likelihood of documents, and its perplexity.

Rows: {"text": ...}. Each document is scored as it was trained, after the tokenizer's document prefix (the
end-of-document id for GPT-2 BPE, BOS where the tokenizer adds one): every one of its tokens is predicted from
the prefix and the tokens before it (with an empty prefix, the first token is context only). A document longer
than the model's context C is scored in windows, each token once: the first window scores C - 1 tokens after
the first; each later one scores up to C - C // 2 tokens with the C // 2 tokens before them as context (a
sliding window, so no token is predicted from less than half a context of history). ``loss`` is the token-
weighted average over all documents (total NLL / total tokens, the way the trainer's validation loss weighs
tokens), ``perplexity`` is exp(loss). Every document's windows are scored together, ``--batch-size`` windows a
forward (megagopher.generate.score_batch), with a progress line.
"""
import math

from megagopher.evaluation.common import call_batch, check_batch_size, document_prefix, progress_line, with_batch


def check_loss_row(row, index=0):
    if not isinstance(row.get("text"), str) or not row["text"]:
        raise ValueError(f"row {index}: a loss row needs a non-empty 'text' string, got keys {sorted(row)}")


def document_windows(tokens, limit, prefix=()):
    """The (context_ids, continuation_ids) windows that score each token of one document once (see the
    module docstring); ``limit`` is the model's context length."""
    if limit < 2:
        raise ValueError(f"a context of {limit} tokens leaves no room to score a token after one of context")
    seq = list(prefix) + list(tokens)
    windows, start = [], 1  # seq[0] is context only
    while start < len(seq):
        context = seq[:1] if start == 1 else seq[start - limit // 2:start]
        end = min(start + limit - len(context), len(seq))
        windows.append((context, seq[start:end]))
        start = end
    return windows


def document_nll(tokens, score, limit, eod=None):
    """(summed NLL, scored tokens) of one document after ``[eod]``. ``score(context_ids, continuation_ids)``
    is a log-likelihood (megagopher.generate.score); ``limit`` the model's context length."""
    return _nll(document_windows(tokens, limit, [eod] if eod is not None else []), score)


def _nll(windows, score):
    nll = 0.0
    for total in call_batch(score, windows):
        nll -= total
    return nll, sum(len(x) for _, x in windows)


def loss_of(rows, score, encode, limit, eod=None, on_example=None, prefix=None):
    """{"loss", "perplexity", "tokens", "examples"} over ``rows`` (see the module docstring). Each document
    follows ``prefix`` (default ``[eod]``, or nothing without one); ``score`` takes every window of every
    document at once when it has a ``batch``."""
    for i, row in enumerate(rows):
        check_loss_row(row, i)
    prefix = ([eod] if eod is not None else []) if prefix is None else list(prefix)
    per_doc = [document_windows(encode(row["text"]), limit, prefix) for row in rows]
    scores = iter(call_batch(score, [w for windows in per_doc for w in windows]))
    total, tokens = 0.0, 0
    for i, windows in enumerate(per_doc):
        nll, n = _nll(windows, lambda c, x: next(scores))
        total, tokens = total + nll, tokens + n
        if on_example is not None:
            on_example({"index": i, "tokens": n, "loss": nll / n if n else None})
    if tokens == 0:
        raise ValueError("no token to score: every document is a single token and there is no "
                         "end-of-document id to predict it from")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "examples": len(rows)}


def model_loss(lm, rows, on_example=None, batch_size=32):
    """loss_of with the model's batched score, tokenizer, document prefix and context."""
    from megagopher.generate import context_limit, score_batch
    tok = lm.tokenizer
    check_batch_size(batch_size)

    def score_all(pairs):
        return score_batch(lm, pairs, batch_size, progress=progress_line("loss", len(pairs), "windows"))
    score = with_batch(lambda c, x: score_all([(c, x)])[0], score_all)
    return loss_of(rows, score, tok.encode, context_limit(lm), on_example=on_example, prefix=document_prefix(tok))
