"""Held-out loss: the mean per-token negative log-likelihood of documents, and its perplexity.

Rows: {"text": ...}. Each document is scored as it was trained, after the end-of-document id: every one of
its tokens is predicted from the end-of-document id and the tokens before it (with no end-of-document id
in the tokenizer, the first token is context only). A document longer than the model's context C is
scored in windows, each token once: the first window scores C - 1 tokens after the first; each later one
scores up to C - C // 2 tokens with the C // 2 tokens before them as context (a sliding window, so no
token is predicted from less than half a context of history). ``loss`` is the token-weighted average
over all documents (total NLL / total tokens, the way the trainer's validation loss weighs tokens),
``perplexity`` is exp(loss).
"""
import math


def check_loss_row(row, index=0):
    if not isinstance(row.get("text"), str) or not row["text"]:
        raise ValueError(f"row {index}: a loss row needs a non-empty 'text' string, got keys {sorted(row)}")


def document_nll(tokens, score, limit, eod=None):
    """(summed NLL, scored tokens) of one document. ``score(context_ids, continuation_ids)`` is a
    log-likelihood (megagopher.generate.score); ``limit`` the model's context length."""
    if limit < 2:
        raise ValueError(f"a context of {limit} tokens leaves no room to score a token after one of context")
    seq = ([eod] if eod is not None else []) + list(tokens)
    nll, scored, start = 0.0, 0, 1  # seq[0] is context only
    while start < len(seq):
        context = seq[:1] if start == 1 else seq[start - limit // 2:start]
        end = min(start + limit - len(context), len(seq))
        nll -= score(context, seq[start:end])
        scored += end - start
        start = end
    return nll, scored


def loss_of(rows, score, encode, limit, eod=None, on_example=None):
    """{"loss", "perplexity", "tokens", "examples"} over ``rows`` (see the module docstring)."""
    for i, row in enumerate(rows):
        check_loss_row(row, i)
    total, tokens = 0.0, 0
    for i, row in enumerate(rows):
        nll, n = document_nll(encode(row["text"]), score, limit, eod)
        total, tokens = total + nll, tokens + n
        if on_example is not None:
            on_example({"index": i, "tokens": n, "loss": nll / n if n else None})
    if tokens == 0:
        raise ValueError("no token to score: every document is a single token and there is no "
                         "end-of-document id to predict it from")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "examples": len(rows)}


def model_loss(lm, rows, on_example=None):
    """loss_of with the model's score, tokenizer and context."""
    from megagopher.generate import context_limit, score
    tok = lm.tokenizer
    return loss_of(rows, lambda c, x: score(lm, c, x), tok.encode, context_limit(lm), tok.eod, on_example)
