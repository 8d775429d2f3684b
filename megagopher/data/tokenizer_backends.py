"""The tokenizer formats megagopher reads through their own libraries, behind load_tokenizer's interface
(megagopher/data/tokenizer.py documents it; our GPT-2 BPE lives there):

* ``huggingface``: a ``tokenizer.json`` read by Hugging Face ``tokenizers`` (``Tokenizer.from_file``);
* ``sentencepiece``: a SentencePiece ``tokenizer.model`` protobuf (Kudo & Richardson 2018), as Gopher
  (Rae et al. 2021, 32,000 tokens with byte fallback) and Llama 1/2 use, read by ``sentencepiece``;
* ``tiktoken``: a tiktoken BPE ranks file (Llama 3's ``tokenizer.model``), in tokenizer_tiktoken.py.

As Megatron-LM's tokenizer wrappers do, each backend maps the library onto one surface: ``encode`` is the
library's ordinary encode with no BOS/EOS added, ``bos``/``eos``/``add_bos`` come from the directory's
``tokenizer_config.json`` (transformers' file) when it says, else from the library's own model. The heavy
libraries are imported only when a directory of their kind is loaded.
"""
import json
import os
import re

from .errors import MissingTokenizerFile, TokenizerError, require_file, unreadable

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# A tiktoken ranks file is text, one "base64token rank" per line; a SentencePiece model is a protobuf
# whose first byte is a field tag (0x0a: field 1, the pieces), never a base64 character.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")
# Names an end-of-text token goes by, for a bare tokenizer.json whose post-processor appends none.
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


def present_config_files(directory):
    """The transformers side files (tokenizer_config.json, special_tokens_map.json) in ``directory``."""
    return tuple(f for f in CONFIG_FILES if os.path.isfile(os.path.join(directory, f)))


def model_file_kind(path):
    """"tiktoken" or "sentencepiece" for a tokenizer.model, by its content (both formats use the name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise unreadable(TokenizerError, path, e) from None
    if not head:
        raise TokenizerError(f"{path} is empty (expected a SentencePiece model or a tiktoken ranks file)")
    line = head.split(b"\n", 1)[0] + b"\n"
    return "tiktoken" if _TIKTOKEN_LINE.fullmatch(line) else "sentencepiece"


def read_config(directory):
    """DIR/tokenizer_config.json as a dict ({} when absent); a damaged one raises TokenizerError naming it."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise unreadable(TokenizerError, path, e) from None
    except ValueError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def config_special(directory, config, lookup):
    """(bos, eos, add_bos) as tokenizer_config.json gives them; each None where it says nothing. A token
    is a string or a dict with "content" (transformers writes both); ``lookup`` maps it to its id."""
    path = os.path.join(directory, "tokenizer_config.json")
    ids = []
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            ids.append(None)
            continue
        if not isinstance(value, str):
            raise TokenizerError(f"{path}: {key} must be a token string or {{\"content\": ...}}, not {value!r}")
        token_id = lookup(value)
        if token_id is None:
            raise TokenizerError(f"{path}: {key} {value!r} is not a token of the tokenizer in {directory}")
        ids.append(token_id)
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"{path}: add_bos_token must be true or false, not {add_bos!r}")
    return ids[0], ids[1], add_bos


class BackendTokenizer:
    """What every library backend shares: the interface attributes, filled by the subclass."""
    kind = ""

    def _finish(self, directory, files, bos, eos, add_bos, vocab_size, special_tokens):
        self.directory, self.files = directory, tuple(files) + present_config_files(directory)
        self.bos, self.eos, self.eod = bos, eos, eos
        self.add_bos = bool(add_bos) and bos is not None
        self.vocab_size, self.special_tokens = vocab_size, special_tokens
        self.document_prefix = [bos] if self.add_bos else [self.eod] if self.eod is not None else []

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def token_to_id(self, token):
        token_id = self._lookup(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    def __repr__(self):
        return (f"<{type(self).__name__} {self.directory} vocab_size={self.vocab_size} bos={self.bos} "
                f"eos={self.eos} add_bos={self.add_bos}>")


class HFTokenizer(BackendTokenizer):
    """A Hugging Face ``tokenizer.json``. encode = ``Tokenizer.encode(text, add_special_tokens=False)``;
    truncation and padding stored in the file are switched off (a document is never cut). BOS/EOS and
    add_bos: tokenizer_config.json when it says, else what the post-processor puts around the text (Llama's
    adds BOS in front), else an end-of-text token by its usual name."""
    kind = "huggingface"

    def __init__(self, directory):
        import tokenizers
        path = os.path.join(directory, "tokenizer.json")
        require_file(path, "tokenizer file", TokenizerError, MissingTokenizerFile)
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:   # the Rust side raises a plain Exception for a damaged file
            raise TokenizerError(f"{path} is not a valid tokenizers file: {e}") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        config = read_config(directory)
        bos, eos, add_bos = config_special(directory, config, self._lookup)
        prefix, suffix = self._post_processor_additions()
        if bos is None and prefix:
            bos = prefix[0]
        if add_bos is None:
            add_bos = bos is not None and prefix[:1] == [bos]
        if eos is None:
            eos = suffix[-1] if suffix else next(
                (i for i in map(self._lookup, _EOS_NAMES) if i is not None), None)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        size = max(self.tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        special = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self._finish(directory, ("tokenizer.json",), bos, eos, add_bos, size, special)

    def _lookup(self, token):
        return self.tokenizer.token_to_id(token)

    def _post_processor_additions(self):
        """(ids before, ids after) the text that encode(add_special_tokens=True) adds."""
        probe = "a"
        plain = self.tokenizer.encode(probe, add_special_tokens=False).ids
        full = self.tokenizer.encode(probe, add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                return full[:k], full[k + len(plain):]
        return [], []

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        # The library encodes the batch on its own thread pool; the _fast variant skips character offsets.
        batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        # transformers' default: special tokens are kept, so decode(encode(text)) gives the text back.
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(BackendTokenizer):
    """A SentencePiece ``tokenizer.model``. encode = ``SentencePieceProcessor.encode`` (ids, no BOS/EOS);
    bos/eos are the model's own ids (-1: none) unless tokenizer_config.json names others; add_bos:
    tokenizer_config.json's add_bos_token, else True when the model has a BOS (Llama, Gopher)."""
    kind = "sentencepiece"

    def __init__(self, directory):
        import sentencepiece
        path = os.path.join(directory, "tokenizer.model")
        require_file(path, "tokenizer file", TokenizerError, MissingTokenizerFile)
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a valid SentencePiece model: {e}") from None
        sp = self.processor
        size = sp.get_piece_size()
        bos, eos, add_bos = config_special(directory, read_config(directory), self._lookup)
        bos = bos if bos is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = eos if eos is not None else (sp.eos_id() if sp.eos_id() >= 0 else None)
        add_bos = bos is not None if add_bos is None else add_bos
        special = {sp.id_to_piece(i): i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)}
        self._finish(directory, ("tokenizer.model",), bos, eos, add_bos, size, special)

    def _lookup(self, token):
        token_id = self.processor.piece_to_id(token)
        # piece_to_id answers the unknown id for a piece it does not have.
        return token_id if self.processor.id_to_piece(token_id) == token else None

    def encode(self, text):
        return self.processor.encode(text)

    def encode_batch(self, texts):
        return self.processor.encode(list(texts))   # a list is encoded in the library's C++ threads

    def decode(self, ids):
        return self.processor.decode([int(i) for i in ids])
