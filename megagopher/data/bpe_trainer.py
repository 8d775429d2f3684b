"""Learn byte-level BPE merges (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units", algorithm 1) in GPT-2's setting: merges are learnt inside GPT-2 pre-tokens over the
byte -> unicode alphabet, and written as GPT-2's vocab.json + merges.txt.

Why it is fast enough for tens of MB on one core:
  * the corpus is reduced once to a table of unique pre-tokens and their counts (a 30 MB corpus has a
    few hundred thousand), so a merge never looks at raw text again;
  * pair counts are kept up to date incrementally: a merge revisits only the words that contain the
    merged pair (found through a pair -> word-ids index) and applies the change in their pair counts;
  * the most frequent pair is popped from a heap with lazy deletion (stale entries are skipped when their
    count no longer matches), instead of re-scanning every pair each step.

Ties are broken deterministically: highest count first, then the lexicographically smallest (left, right)
pair of token strings, so the same corpus always gives the same merges.
"""
import heapq
import json
import os
from collections import Counter

from .tokenizer import EOD_TOKEN, bytes_to_unicode, pretokenize


def count_words(texts, counter=None):
    """Count mapped GPT-2 pre-tokens over an iterable of strings (merges never cross them)."""
    counter = Counter() if counter is None else counter
    for text in texts:
        counter.update(pretokenize(text))
    return counter


def _pairs(symbols):
    return Counter(zip(symbols, symbols[1:]))


def _merge_word(symbols, a, b):
    """Replace every non-overlapping (a, b), left to right, by a + b: the same rule encoding uses."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(word_counts, num_new_tokens, min_frequency=2, progress=None):
    """Return the merge pairs learnt from ``word_counts`` (mapped pre-token -> count) until they have
    made ``num_new_tokens`` distinct new tokens. (Two merges can spell the same string, e.g. "ab c" and
    "a bc"; like GPT-2's vocabularies, the second one reuses the token, so it does not count.)

    Stops early when the most frequent remaining pair occurs fewer than ``min_frequency`` times (merging
    pairs seen once only memorises the corpus). ``progress(i, pair, count)`` is called after each merge.
    """
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts = Counter()
    where = {}   # pair -> ids of words that contain it (may hold stale ids; checked on use)
    for wid, symbols in enumerate(words):
        for pair, n in _pairs(symbols).items():
            pair_counts[pair] += n * freqs[wid]
            where.setdefault(pair, set()).add(wid)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges, tokens = [], set(bytes_to_unicode().values())
    while len(tokens) - 256 < num_new_tokens and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:
            continue   # stale entry: this pair's count changed after it was pushed
        if -neg < min_frequency:
            break
        merges.append((a, b))
        tokens.add(a + b)
        changed = Counter()
        for wid in where.pop((a, b), ()):
            symbols = words[wid]
            before = _pairs(symbols)
            if (a, b) not in before:
                continue
            words[wid] = symbols = _merge_word(symbols, a, b)
            after = _pairs(symbols)
            f = freqs[wid]
            for pair in before.keys() | after.keys():
                delta = (after.get(pair, 0) - before.get(pair, 0)) * f
                if delta:
                    changed[pair] += delta
                    if pair in after:
                        where.setdefault(pair, set()).add(wid)
        for pair, delta in changed.items():
            c = pair_counts[pair] + delta
            if c > 0:
                pair_counts[pair] = c
                heapq.heappush(heap, (-c, pair[0], pair[1]))
            else:
                del pair_counts[pair]
        pair_counts.pop((a, b), None)
        if progress is not None:
            progress(len(merges), (a, b), -neg)
    return merges


def build_vocab(merges, special_tokens=(EOD_TOKEN,)):
    """GPT-2's id layout: the 256 byte tokens in ``bytes_to_unicode`` order, then one token per merge in
    merge order, then the special tokens (so ``<|endoftext|>`` is the last id, as in GPT-2)."""
    vocab = {}
    for token in list(bytes_to_unicode().values()) + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    for token in special_tokens:
        if token in vocab:
            raise ValueError(f"special token {token!r} is also a learnt or byte token; choose another")
        vocab[token] = len(vocab)
    return vocab


def train_bpe(word_counts, vocab_size, special_tokens=(EOD_TOKEN,), min_frequency=2, progress=None):
    """Learn merges so the vocabulary (bytes + merges + special tokens) has ``vocab_size`` entries, or
    fewer when the corpus runs out of pairs seen ``min_frequency`` times. Returns (vocab, merges)."""
    special_tokens = list(special_tokens)
    if EOD_TOKEN not in special_tokens:
        special_tokens.insert(0, EOD_TOKEN)
    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level vocabulary needs 256 byte "
                         f"tokens + {len(special_tokens)} special token(s) = at least {floor}")
    merges = learn_merges(word_counts, vocab_size - floor, min_frequency, progress)
    return build_vocab(merges, special_tokens), merges


def write_tokenizer_files(directory, vocab, merges):
    """Write DIR/vocab.json and DIR/merges.txt (GPT-2's format), each under a temporary name first so a
    crash never leaves a truncated file where load_tokenizer would read it."""
    os.makedirs(directory, exist_ok=True)
    vocab_text = json.dumps(vocab, ensure_ascii=False, indent=0)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    for name, text in (("vocab.json", vocab_text), ("merges.txt", merges_text)):
        path = os.path.join(directory, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
