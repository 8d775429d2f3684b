"""GPT-2-style byte-level BPE tokenizer (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", section 2.2; the algorithm is Sennrich et al. 2016's BPE applied to bytes).

Encoding, exactly as GPT-2's ``encoder.py`` does for a given vocab.json + merges.txt pair:
  1. pre-tokenise the text with GPT-2's regular expression (contractions, letter runs, digit runs,
     punctuation runs, whitespace), so merges never cross those boundaries;
  2. map each UTF-8 byte of a piece to a printable unicode character (``bytes_to_unicode``), so every
     byte has a token and the vocabulary files stay printable text;
  3. repeatedly merge the adjacent pair with the lowest merge rank until none applies.
Because step 2 is a bijection on bytes, ``decode(encode(text)) == text`` for every string, including
lone surrogates (carried through UTF-8 with ``surrogatepass``).

Special tokens (``<|endoftext|>`` at least) are vocabulary entries that no byte or merge produces. As in
GPT-2 (and tiktoken's ``encode_ordinary``), text that merely *looks* like ``<|endoftext|>`` is encoded as
ordinary text unless the caller allows it, so a document cannot forge a document boundary.

This module is also the one entry point for every tokenizer format (``load_tokenizer``/``detect_kind``): our
GPT-2 BPE here, and Hugging Face ``tokenizer.json``, SentencePiece and tiktoken ``tokenizer.model`` through
their own libraries (tokenizer_backends.py). Every tokenizer has the interface documented on
``load_tokenizer`` (kind, directory, files, encode, encode_batch, decode, vocab_size, bos, eos, eod,
add_bos, document_prefix, special_tokens), as Megatron-LM's tokenizer wrappers give one surface to many
formats.
"""
import json
import os
from functools import lru_cache

import regex

from .errors import MissingTokenizerFile, TokenizerError, require_file, unreadable
from .tokenizer_backends import model_file_kind, present_config_files

EOD_TOKEN = "<|endoftext|>"

# GPT-2's pre-tokenisation pattern, verbatim from openai/gpt-2 src/encoder.py.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@lru_cache(maxsize=None)
def bytes_to_unicode():
    """GPT-2's byte -> printable character map. Printable Latin-1 bytes map to themselves; the other 68
    bytes (controls, space, soft hyphen...) are shifted to 256+ so no token string holds whitespace or a
    control character. The order of this dict is also the id order of the 256 byte tokens in GPT-2's
    vocabulary, which train_tokenizer reproduces."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=None)
def _byte_translation():
    # Latin-1 decoding turns byte b into chr(b); translate() then applies the GPT-2 map in C, which is
    # several times faster than a per-byte Python lookup.
    return {b: c for b, c in bytes_to_unicode().items()}


def pretokenize(text):
    """Split text into GPT-2 pre-tokens and return each as its byte-level (mapped) string."""
    table = _byte_translation()
    return [piece.encode("utf-8", "surrogatepass").decode("latin-1").translate(table)
            for piece in GPT2_PATTERN.findall(text)]


def _unique_keys(pairs):
    # json.load keeps the last of two equal keys silently; in a vocabulary that hides a damaged token.
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"token {key!r} appears twice")
        out[key] = value
    return out


def _read_vocab(vocab_path):
    try:
        with open(vocab_path, "rb") as f:
            vocab = json.loads(f.read().decode("utf-8"), object_pairs_hook=_unique_keys)
    except OSError as e:
        raise unreadable(TokenizerError, vocab_path, e) from None
    except ValueError as e:   # JSON, UTF-8 or a repeated token
        raise TokenizerError(f"{vocab_path} is not a valid vocabulary: {e}") from None
    if not isinstance(vocab, dict) or not all(type(i) is int and i >= 0 for i in vocab.values()):
        raise TokenizerError(f"{vocab_path} must map token strings to non-negative integer ids")
    # GPT-2's file and train_tokenizer's number their tokens 0..N-1; a gap or a repeat means a damaged id.
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        wrong = next(i for i, v in enumerate(ids) if v != i)
        what = f"id {ids[wrong]} appears twice" if ids[wrong] < wrong else f"id {wrong} is missing"
        raise TokenizerError(f"{vocab_path}: token ids must be 0..{len(ids) - 1}, each once; {what}")
    return vocab


def _read_merges(merges_path):
    merges, line = [], ""
    try:
        with open(merges_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                # GPT-2's file starts with "#version: 0.2"; skip that and blank lines (the trailing newline).
                if line_no == 1 and line.startswith("#version"):
                    continue
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    shown = repr(line) if len(line) <= 80 else repr(line[:80]) + "..."
                    raise TokenizerError(f"{merges_path} line {line_no}: expected two space-separated tokens, "
                                         f"got {shown}")
                merges.append((parts[0], parts[1]))
    except OSError as e:
        raise unreadable(TokenizerError, merges_path, e) from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{merges_path} is not UTF-8 text: {e}") from None
    # Every writer (GPT-2's, Hugging Face's, train_tokenizer) starts with a "#version" line and ends every
    # line with a newline; GPT-2's reader even drops a last line without one. So a file that lacks either
    # was cut short (a cut just after a newline stays undetectable: the format records no merge count).
    if not line:
        raise TokenizerError(f"{merges_path} is empty (expected a '#version' line, then one merge per line)")
    if not line.endswith("\n"):
        raise TokenizerError(f"{merges_path} does not end with a newline: the file is truncated")
    return merges


def read_vocab_files(directory):
    """Read DIR/vocab.json and DIR/merges.txt; return (vocab dict, list of merge pairs). Errors are
    TokenizerErrors (MissingTokenizerFile for a missing file) naming the file and what is wrong with it."""
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    hint = " (a tokenizer directory holds vocab.json and merges.txt, as written by tools/train_tokenizer.py)"
    for path in (vocab_path, merges_path):
        require_file(path, "tokenizer file", TokenizerError, MissingTokenizerFile, hint)
    return _read_vocab(vocab_path), _read_merges(merges_path)


class Tokenizer:
    """Byte-level BPE over a vocab (token string -> id) and an ordered merge list.

    Public surface used by the trainer and tools: the interface of ``load_tokenizer`` (kind "gpt2"):
    ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``eod`` (id of ``<|endoftext|>``, also
    ``eos``), ``vocab_size`` (largest id + 1, special tokens included); GPT-2 has no BOS (``bos`` None,
    ``add_bos`` False), so a document or prompt follows the end-of-document id (``document_prefix``).
    """
    kind = "gpt2"
    bos = None
    add_bos = False

    def __init__(self, vocab, merges, source="<memory>", merges_source=None):
        merges_source = merges_source or source
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        if len(self.decoder) != len(self.encoder):
            raise TokenizerError(f"{source}: two tokens share one id")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in self.encoder]
        if missing:
            raise TokenizerError(f"{source}: vocabulary lacks {len(missing)} of the 256 byte tokens "
                                 f"(e.g. {missing[0]!r}); a byte-level vocabulary needs every byte")
        self.bpe_ranks = {}
        for rank, (a, b) in enumerate(merges):
            # A merge joins two tokens into a third; all three are in the vocabulary of a matching pair.
            absent = next((t for t in (a, b, a + b) if t not in self.encoder), None)
            if absent is not None:
                raise TokenizerError(f"{merges_source}: merge {rank + 1} ({a!r} {b!r}) needs {absent!r}, "
                                     f"which is not in the vocabulary {source}")
            self.bpe_ranks[(a, b)] = rank   # a repeated pair keeps its last rank, as GPT-2's dict(zip()) does
        if EOD_TOKEN not in self.encoder:
            raise TokenizerError(f"{source}: vocabulary has no {EOD_TOKEN!r} token (the end-of-document id)")
        producible = set(self.byte_encoder.values()) | {a + b for a, b in merges}
        # Special tokens: entries no byte sequence can produce; encode() emits them only when allowed.
        self.special_tokens = {t: i for t, i in self.encoder.items() if t not in producible or t == EOD_TOKEN}
        self.eod = self.encoder[EOD_TOKEN]
        self.eos = self.eod
        self.document_prefix = [self.eod]
        self.directory, self.files = "", ()   # set by load_gpt2; a tokenizer built in memory has none
        self.vocab_size = max(self.encoder.values()) + 1
        self._ids_cache = {}   # bounded to 500k pieces: a huge corpus must not exhaust memory

    def bpe(self, word):
        """Merge one mapped pre-token by rank; returns the list of token strings (GPT-2's bpe())."""
        parts = list(word)
        ranks = self.bpe_ranks
        while len(parts) > 1:
            # The lowest-ranked pair present is merged everywhere it occurs, left to right.
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode_ordinary(self, text):
        """Encode text with no special-token handling (``<|endoftext|>`` in text is plain text)."""
        # Hot loop of preprocessing: most pre-tokens repeat, so cache raw piece -> ids and skip both the
        # byte mapping and the merge loop for them.
        cache, ids = self._ids_cache, []
        for piece in GPT2_PATTERN.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                word = piece.encode("utf-8", "surrogatepass").decode("latin-1").translate(_byte_translation())
                piece_ids = [self.encoder[t] for t in self.bpe(word)]
                if len(cache) < 500_000:
                    cache[piece] = piece_ids
            ids += piece_ids
        return ids

    def encode_batch(self, texts):
        """[encode(t) for t in texts]: pure Python gains nothing from batching in one process."""
        return [self.encode_ordinary(t) for t in texts]

    def encode(self, text, allowed_special=()):
        """Encode text to ids. ``allowed_special`` lists special-token strings (or is "all") that are
        mapped to their ids when they occur in text; by default none is, matching GPT-2."""
        if allowed_special == "all":
            allowed_special = self.special_tokens.keys()
        allowed = [t for t in allowed_special if t in self.special_tokens]
        unknown = [t for t in allowed_special if t not in self.special_tokens]
        if unknown:
            raise ValueError(f"not special tokens of this vocabulary: {unknown}; "
                             f"valid: {sorted(self.special_tokens)}")
        if not allowed:
            return self.encode_ordinary(text)
        splitter = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")")
        ids = []
        for i, chunk in enumerate(splitter.split(text)):
            if i % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def decode(self, ids):
        """Ids -> text. Invalid UTF-8 (e.g. a generation cut inside a character) decodes with U+FFFD."""
        try:
            tokens = [self.decoder[int(i)] for i in ids]
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is outside the vocabulary (size {self.vocab_size})") from None
        data = bytearray()
        for t in tokens:
            if t in self.special_tokens:
                data += t.encode("utf-8")
            else:
                data += bytes(self.byte_decoder[c] for c in t)
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")

    def token_to_id(self, token):
        return self.encoder[token]


def load_gpt2(directory):
    """Load DIR/vocab.json + DIR/merges.txt (GPT-2's format, as written by tools/train_tokenizer.py or
    by OpenAI/Hugging Face for GPT-2) as a :class:`Tokenizer`."""
    vocab, merges = read_vocab_files(directory)
    tok = Tokenizer(vocab, merges, source=os.path.join(directory, "vocab.json"),
                    merges_source=os.path.join(directory, "merges.txt"))
    tok.directory, tok.files = directory, ("vocab.json", "merges.txt") + present_config_files(directory)
    return tok


TOKENIZER_KINDS = ("gpt2", "huggingface", "sentencepiece", "tiktoken")
ACCEPTED = ("vocab.json + merges.txt (gpt2), tokenizer.json (huggingface), or tokenizer.model "
            "(a SentencePiece model: sentencepiece; a tiktoken ranks file: tiktoken)")


def kinds_in(directory):
    """Every kind ``directory`` holds, in the order detect_kind prefers them: tokenizer.json first (as
    transformers' AutoTokenizer prefers the fast tokenizer), then tokenizer.model (told apart by content),
    then vocab.json + merges.txt (either file present counts, so a missing partner is reported by name)."""
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise MissingTokenizerFile(f"tokenizer directory {directory} {what}; it must hold {ACCEPTED}")
    found = []
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        found.append("huggingface")
    if os.path.exists(os.path.join(directory, "tokenizer.model")):
        found.append(model_file_kind(os.path.join(directory, "tokenizer.model")))
    if any(os.path.exists(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
        found.append("gpt2")
    return found


def detect_kind(directory):
    """The kind of tokenizer ``directory`` holds (one of TOKENIZER_KINDS; kinds_in gives the preference
    when it holds several). Raises MissingTokenizerFile naming the directory and what is accepted."""
    found = kinds_in(directory)
    if not found:
        raise MissingTokenizerFile(f"tokenizer directory {directory} holds no tokenizer: expected {ACCEPTED}")
    return found[0]


def load_tokenizer(directory, kind=None):
    """Load the tokenizer in ``directory``: ``kind`` (one of TOKENIZER_KINDS) names the format, None or ""
    detects it (detect_kind). Every kind returns an object with:

    ``kind``, ``directory``, ``files`` (the file names in ``directory`` that make it up, tokenizer_config.json
    and special_tokens_map.json included when present); ``encode(text) -> list[int]`` (the text's tokens,
    never BOS/EOS; special-token strings in the text as the library's ordinary encode treats them);
    ``encode_batch(texts)`` (== [encode(t) for t in texts]); ``decode(ids) -> str``; ``vocab_size`` (largest
    id + 1, special tokens included); ``bos``, ``eos``, ``eod`` (int or None; eod is the end-of-document id);
    ``add_bos`` (whether a document starts with bos); ``document_prefix`` ([bos] if add_bos, else [eod], else
    []) and ``special_tokens`` (str -> id).

    Raises TokenizerError (a ValueError; MissingTokenizerFile, a FileNotFoundError, for a missing file)
    naming the file at fault, or the directory and what is accepted when it holds no tokenizer."""
    if kind and kind not in TOKENIZER_KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r} for {directory}; valid: {', '.join(TOKENIZER_KINDS)}")
    if not kind:
        kind = detect_kind(directory)
    elif kind in ("sentencepiece", "tiktoken"):
        path = os.path.join(directory, "tokenizer.model")
        require_file(path, f"{kind} tokenizer file", TokenizerError, MissingTokenizerFile)
        actual = model_file_kind(path)
        if actual != kind:
            raise TokenizerError(f"{path} is a {actual} tokenizer, not {kind}; found in {directory}: "
                                 f"{', '.join(kinds_in(directory))}")
    if kind == "gpt2":
        return load_gpt2(directory)
    if kind == "tiktoken":
        from .tokenizer_tiktoken import TiktokenTokenizer
        return TiktokenTokenizer(directory)
    from .tokenizer_backends import HFTokenizer, SentencePieceTokenizer
    return {"huggingface": HFTokenizer, "sentencepiece": SentencePieceTokenizer}[kind](directory)
