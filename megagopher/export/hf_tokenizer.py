"""A model's tokenizer across the Hugging Face boundary, both ways, for every kind load_tokenizer reads
(megagopher/data/tokenizer.py: GPT-2 vocab.json + merges.txt, a ``tokenizers`` tokenizer.json, a
SentencePiece or a tiktoken tokenizer.model).

Import (``import_tokenizer``, tools/import_hf.py): the model directory's tokenizer is loaded once where it
lies (so nothing is written for one that does not read or does not fit the embedding), then its files,
the transformers side files (tokenizer_config.json, special_tokens_map.json) and generation_config.json
are copied into OUT/tokenizer/, each under a temporary name, fsynced and renamed. The end-of-document id
every consumer of ours uses (preprocessing's --append-eod, document masking, generation's stop) is the
tokenizer's; a model whose config.json or generation_config.json names an eos_token_id that is not it (or
whose BOS, when the tokenizer prepends one, differs) is refused: continuing its pretraining would teach it
another end of document than the one it stops at.

Export (``write_tokenizer``, tools/export_hf.py): what ``transformers.AutoTokenizer.from_pretrained(OUT)``
(5.x) needs beside the model. GPT-2 BPE: vocab.json, merges.txt and GPT-2's configs, as before. The
others: the tokenizer's own files and, when the run's tokenizer has no tokenizer_config.json, one naming
PreTrainedTokenizerFast (transformers 5's TokenizersBackend), which reads tokenizer.json as it is, builds a
SentencePiece model's tokenizer from its protobuf (normalizer, pre-tokenizer and model type as trained) and
a tiktoken ranks file through transformers' TikTokenConverter (Llama 3's pattern; the special tokens come
from added_tokens_decoder). BOS is added by tokenizer.json's post-processor, else by add_bos_token.
"""
import json
import os
import shutil

from megagopher.training.ckpt_files import fsync_dir, write_text_durably

# The files that make up a tokenizer of some kind, and the transformers side files carried with them.
MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class TokenizerMismatch(ValueError):
    """The model's special-token ids are not its tokenizer's (the message names both files)."""


def copy_durably(src, dst):
    """``dst`` holds a copy of ``src`` or its previous content, never a part (temp name, fsync, rename)."""
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def write_json_durably(path, content):
    write_text_durably(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerMismatch(f"{path} is not readable JSON: {e}") from None
    return content if isinstance(content, dict) else {}


def _stated_ids(value):
    """eos_token_id as config.json / generation_config.json state it: an int, a list of them, or none."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else [i for i in value if isinstance(i, int)]


def token_text(tok, token_id):
    """The string of token ``token_id``: its special-token name, else its decoding."""
    names = {i: t for t, i in tok.special_tokens.items()}
    return names.get(token_id, tok.decode([token_id]))


def check_special_ids(tok, model_dir, hf):
    """TokenizerMismatch unless every eos_token_id the model states is the tokenizer's end-of-document id
    (a list, as instruction-tuned models give, must contain it) and, when the tokenizer prepends BOS, the
    stated bos_token_id is its BOS."""
    where = os.path.join(tok.directory, tok.files[0])
    generation = _read_json(os.path.join(model_dir, "generation_config.json"))
    for name, content in (("config.json", hf), ("generation_config.json", generation)):
        path = os.path.join(model_dir, name)
        eos = _stated_ids(content.get("eos_token_id"))
        if eos and tok.eod is None:
            raise TokenizerMismatch(f"{path}: eos_token_id = {content['eos_token_id']!r} but the tokenizer {where} "
                                    "names no end-of-document token; set eos_token in its tokenizer_config.json, "
                                    "or pass --no-tokenizer")
        if eos and tok.eod not in eos:
            raise TokenizerMismatch(
                f"{path}: eos_token_id = {content['eos_token_id']!r} but the tokenizer {where} ends a document "
                f"with {tok.eod} ({token_text(tok, tok.eod)!r}); megagopher appends, masks and stops at the "
                f"tokenizer's: make eos_token in tokenizer_config.json the model's, or pass --no-tokenizer")
        bos = content.get("bos_token_id")
        if tok.add_bos and isinstance(bos, int) and bos != tok.bos:
            raise TokenizerMismatch(f"{path}: bos_token_id = {bos} but the tokenizer {where} starts every document "
                                    f"with {tok.bos} ({token_text(tok, tok.bos)!r}); make bos_token in "
                                    "tokenizer_config.json the model's, or pass --no-tokenizer")


def files_to_carry(tok, model_dir):
    """The tokenizer's own files, every other complete tokenizer of the directory (Llama 2 ships
    tokenizer.json and tokenizer.model) and the side files present."""
    present = {f for f in MODEL_FILES + SIDE_FILES if os.path.isfile(os.path.join(model_dir, f))}
    if not {"vocab.json", "merges.txt"} <= present:   # half a GPT-2 pair is not a tokenizer
        present -= {"vocab.json", "merges.txt"}
    names = list(tok.files) + sorted(present - set(tok.files))
    return [n for n in names if os.path.isfile(os.path.join(model_dir, n))]


def import_tokenizer(model_dir, output, vocab_size, hf, kind=None):
    """Copies the tokenizer of ``model_dir`` into OUT/tokenizer/; returns (its absolute directory, its kind),
    or (None, None) when the directory has none. Raises TokenizerError / TokenizerMismatch (ValueErrors
    naming the file) for one that does not read, does not fit ``vocab_size`` or disagrees with config.json
    ``hf`` on the special tokens; nothing is written then."""
    from megagopher.data.tokenizer import kinds_in, load_tokenizer
    from megagopher.data.errors import TokenizerError
    if not kind and not kinds_in(model_dir):
        return None, None
    hint = "; pass --no-tokenizer to import the weights alone"
    try:
        tok = load_tokenizer(model_dir, kind or None)
    except TokenizerError as e:
        raise type(e)(f"{e}{hint}") from None
    if tok.vocab_size > vocab_size:
        raise TokenizerMismatch(f"{os.path.join(model_dir, tok.files[0])}: the tokenizer has {tok.vocab_size} tokens "
                                f"but the model's embedding (config.json vocab_size) {vocab_size}{hint}")
    check_special_ids(tok, model_dir, hf)
    directory = os.path.join(output, "tokenizer")
    os.makedirs(directory, exist_ok=True)
    for name in files_to_carry(tok, model_dir):
        copy_durably(os.path.join(model_dir, name), os.path.join(directory, name))
    return os.path.abspath(directory), tok.kind


# -- export ---------------------------------------------------------------------------------------------------
def _write_gpt2(tok, output, model_max_length):
    """GPT-2 tokenizer files for our Tokenizer. merges.txt gets GPT-2's "#version" first line, which
    Hugging Face's reader skips unconditionally."""
    from megagopher.data.tokenizer import EOD_TOKEN, read_vocab_files
    vocab, merges = read_vocab_files(tok.directory)
    write_text_durably(os.path.join(output, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    write_text_durably(os.path.join(output, "merges.txt"), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    extra = sorted((t for t in tok.special_tokens if t != EOD_TOKEN), key=lambda t: tok.special_tokens[t])
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    if extra:
        special["additional_special_tokens"] = extra
    added = {str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                      "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "add_bos_token": False, "errors": "replace", "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": added, **special}
    write_json_durably(os.path.join(output, "tokenizer_config.json"), config)
    write_json_durably(os.path.join(output, "special_tokens_map.json"), special)


def generated_config(tok, model_max_length):
    """A tokenizer_config.json for a tokenizer that came without one."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": bool(tok.add_bos), "add_eos_token": False}
    if tok.bos is not None:
        config["bos_token"] = token_text(tok, tok.bos)
    if tok.eod is not None:
        config["eos_token"] = token_text(tok, tok.eod)
    if tok.kind == "tiktoken":   # the ranks file holds no special tokens: transformers adds these, at these ids
        config["added_tokens_decoder"] = {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                     "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    return config


def write_tokenizer(tok, output, model_max_length):
    """The files AutoTokenizer loads ``tok`` (any kind) from, into ``output`` (see the module docstring);
    the model's generation_config.json, carried by the import, goes along when the tokenizer has one."""
    if tok.kind == "gpt2":
        _write_gpt2(tok, output, model_max_length)
    else:
        for name in tok.files:
            copy_durably(os.path.join(tok.directory, name), os.path.join(output, name))
        if "tokenizer_config.json" not in tok.files:
            write_json_durably(os.path.join(output, "tokenizer_config.json"), generated_config(tok, model_max_length))
    generation = os.path.join(tok.directory, "generation_config.json")
    if os.path.isfile(generation):
        copy_durably(generation, os.path.join(output, "generation_config.json"))


def special_ids(tok):
    """(bos_token_id, eos_token_id) of config.json: the tokenizer's BOS (GPT-2, which has none: its
    end-of-document token, as GPT-2's own config.json) and its end-of-document id."""
    if tok is None:
        return None, None
    return (tok.bos if tok.bos is not None else tok.eod), tok.eod
