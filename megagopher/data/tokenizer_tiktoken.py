"""A tiktoken BPE ranks file (Llama 3's ``tokenizer.model``) behind load_tokenizer's interface.

The file holds one ``base64(token bytes) rank`` line per mergeable token and nothing else: the special
tokens and the pre-tokenisation pattern live in the code that reads it. We follow Meta's llama3
``tokenizer.py`` (meta-llama/llama3): Llama 3's pattern, and 256 special tokens numbered after the ranks
(``<|begin_of_text|>``, ``<|end_of_text|>``, ..., reserved ones, ``<|python_tag|>`` last), unless the
directory's tokenizer_config.json lists them (``added_tokens_decoder``, as Hugging Face's Llama 3 files
do), which then wins. encode is tiktoken's ``encode_ordinary`` (special-token strings in text are text);
documents start with ``<|begin_of_text|>`` and end with ``<|end_of_text|>``.
"""
import base64
import binascii
import hashlib
import os

from .errors import MissingTokenizerFile, TokenizerError, require_file, unreadable
from .tokenizer_backends import BackendTokenizer, config_special, read_config

# Llama 3's pre-tokenisation regular expression (pat_str in Meta's llama3 tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL_TOKENS = 256


def llama3_special_tokens(num_base_tokens):
    """Meta's llama3 layout: ten named tokens, the reserved ones, then <|python_tag|>, 256 in all."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|step_id|>", "<|eom_id|>", "<|eot_id|>"]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(named) - 1)]
    return {t: num_base_tokens + i for i, t in enumerate(named + reserved + ["<|python_tag|>"])}


def _bad_line(data):
    """The first line of a ranks file that is not ``base64token rank``, as (line number, text)."""
    for line_no, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            base64.b64decode(parts[0], validate=True)
            int(parts[1])
        except (ValueError, binascii.Error):
            shown = line[:80].decode("utf-8", "replace")
            return line_no, shown
    return None


def read_ranks(path):
    """The mergeable ranks (token bytes -> rank) of a tiktoken file, read by tiktoken's own loader."""
    from tiktoken.load import load_tiktoken_bpe
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise unreadable(TokenizerError, path, e) from None
    bad = _bad_line(data)
    if bad:
        raise TokenizerError(f"{path} line {bad[0]}: expected 'base64token rank', got {bad[1]!r}")
    try:
        # tiktoken keeps a copy of every file it loads in a cache keyed by the path; giving the content's
        # hash makes it re-read a file that changed since instead of answering the stale copy.
        ranks = load_tiktoken_bpe(path, expected_hash=hashlib.sha256(data).hexdigest())
    except ValueError as e:   # the file changed between our read and tiktoken's
        raise TokenizerError(f"{path} could not be read consistently: {e}") from None
    if not ranks:
        raise TokenizerError(f"{path} holds no ranks (expected one 'base64token rank' line per token)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once (a token repeats or a "
                             "rank is missing)")
    return ranks


def _config_specials(directory, config, num_base):
    """Special tokens from tokenizer_config.json's added_tokens_decoder (id -> {"content": ...}), or None."""
    decoder = config.get("added_tokens_decoder")
    if not decoder:
        return None
    path = os.path.join(directory, "tokenizer_config.json")
    special = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (isinstance(content, str) and str(key).isdigit() and int(key) >= num_base):
            raise TokenizerError(f"{path}: added_tokens_decoder entry {key!r} must map an id at or after the "
                                 f"{num_base} ranks to {{\"content\": token}}, not {entry!r}")
        special[content] = int(key)
    return special


class TiktokenTokenizer(BackendTokenizer):
    kind = "tiktoken"

    def __init__(self, directory):
        import tiktoken
        path = os.path.join(directory, "tokenizer.model")
        require_file(path, "tokenizer file", TokenizerError, MissingTokenizerFile)
        ranks = read_ranks(path)
        config = read_config(directory)
        special = _config_specials(directory, config, len(ranks)) or llama3_special_tokens(len(ranks))
        try:
            self.encoding = tiktoken.Encoding(name=path, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                              special_tokens=special)
        except (ValueError, AssertionError) as e:
            raise TokenizerError(f"{path} is not a usable tiktoken ranks file: {e}") from None
        self._ids = special
        bos, eos, add_bos = config_special(directory, config, self._lookup)
        bos = special.get("<|begin_of_text|>") if bos is None else bos
        eos = special.get("<|end_of_text|>") if eos is None else eos
        add_bos = bos is not None if add_bos is None else add_bos
        self._finish(directory, ("tokenizer.model",), bos, eos, add_bos, self.encoding.n_vocab, dict(special))

    def _lookup(self, token):
        if token in self._ids:
            return self._ids[token]
        ids = self.encoding.encode_ordinary(token)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.encoding.encode_ordinary_batch(list(texts))   # tiktoken's thread pool

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])
