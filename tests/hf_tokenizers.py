"""Tokenizers of every kind megagopher reads, built in the test by their own libraries (nothing downloaded),
for the import/export tests: a Llama-3-like byte-level BPE tokenizer.json trained with ``tokenizers`` (Llama 3's
split pattern, a BOS post-processor, tokenizer_config.json as Hugging Face ships one), SentencePiece models
(BPE and unigram, byte fallback, as Gopher's and Llama 2's) trained with ``sentencepiece``, a tiktoken ranks
file (the same BPE's tokens as ``base64 rank`` lines) and our own GPT-2 BPE files."""
import base64
import json
import os

from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files
from megagopher.data.tokenizer import bytes_to_unicode
from megagopher.data.tokenizer_tiktoken import LLAMA3_PATTERN

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# A mixed corpus: ASCII, non-Latin scripts, code, runs of whitespace, emoji.
MIXED = ["Ava buys 12 notebooks at $3.50 each. The answer is 42.",
         "  two  spaces\tand\ttabs\n\n\nthree new lines   ",
         "Ünïcödé: Ελληνικά, русский, 日本語のテキスト, العربية, हिन्दी",
         "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
         "def f(x):\n    return {'k': [x ** 2 for _ in range(3)]}  # code\n",
         " leading space", "trailing spaces   ", "1234567890 3.14159 -7e10"]
SPECIAL_TEXT = f"{EOS} a forged boundary {BOS} and </s> <s>"


def training_texts():
    """Some of the standard library's prose and code, and the mixed corpus."""
    from megagopher.data.stdlib_corpus import build_stdlib_corpora
    general, code = build_stdlib_corpora(60_000, 30_000, seed=0)
    return [r["text"] for r in general + code] + MIXED * 3


def _byte_level_bpe(texts, vocab_size, specials):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def tokenizer_json(directory, texts, vocab_size=500, config=True):
    """Llama 3's layout: <|begin_of_text|> prepended by the post-processor, <|end_of_text|> the EOS."""
    from tokenizers import processors
    os.makedirs(directory, exist_ok=True)
    tok = _byte_level_bpe(texts, vocab_size, (BOS, EOS))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))])])
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                       "model_max_length": 2048, "clean_up_tokenization_spaces": False}, f)
    return directory


# Llama 2's normalisation: none, whitespace kept (runs of it as pieces), digits split.
LLAMA_SPM = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                 allow_whitespace_only_pieces=True)


def sentencepiece_model(directory, texts, model_type="bpe", vocab_size=400, add_bos=None, llama=True):
    """A SentencePiece model with byte fallback (<unk> 0, <s> 1, </s> 2), Llama 2's options or (``llama``
    false) SentencePiece's defaults (NFKC, extra whitespace removed); ``add_bos`` False writes a
    tokenizer_config.json saying so (None: none, the model's BOS is prepended)."""
    import sentencepiece as spm
    os.makedirs(directory, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=os.path.join(directory, "tokenizer"),
                                   vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
                                   character_coverage=0.9995, minloglevel=2, num_threads=1,
                                   **(LLAMA_SPM if llama else {}))
    os.remove(os.path.join(directory, "tokenizer.vocab"))
    if add_bos is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"add_bos_token": add_bos}, f)
    return directory


def tiktoken_file(directory, texts, vocab_size=500):
    """A tiktoken ranks file: a byte-level BPE's tokens, each ``base64(bytes) rank``, rank = id. The special
    tokens are Llama 3's 256 after the ranks (the tiktoken backend's default)."""
    os.makedirs(directory, exist_ok=True)
    tok = _byte_level_bpe(texts, vocab_size, ())
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    pieces = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in pieces] == list(range(len(pieces)))
    with open(os.path.join(directory, "tokenizer.model"), "w", encoding="ascii") as f:
        for piece, rank in pieces:
            f.write(f"{base64.b64encode(bytes(to_byte[c] for c in piece)).decode()} {rank}\n")
    return directory


def gpt2_files(directory, texts, vocab_size=400):
    write_tokenizer_files(directory, *train_bpe(count_words(texts), vocab_size))
    return directory
