"""Train a SentencePiece tokenizer (Kudo & Richardson 2018, "SentencePiece: A simple and language independent
subword tokenizer and detokenizer") as Gopher did (Rae et al. 2021, section 3.2 / appendix A: a 32,000-token
SentencePiece vocabulary with byte fallback), through the ``sentencepiece`` library's own trainer.

Sentences come from a Python iterator (the library's ``sentence_iterator``) and the model goes to memory
(``model_writer``), so no copy of the corpus and no half-written model ever lands on disk; the model is
written as DIR/tokenizer.model under a temporary name, fsynced and renamed. load_tokenizer reads it as the
"sentencepiece" kind.

Settings and why: byte fallback (a character outside the vocabulary becomes its UTF-8 bytes, never
<unk>); no normalisation and no whitespace squashing (text, code and its indentation come back exactly);
digits split one by one (as Llama); ids 0/1/2 = <unk>/<s>/</s>, no pad (Llama's layout), so add_bos holds.
"""
import io
import os

MODEL_TYPES = ("unigram", "bpe")


def document_sentences(texts, max_sentence_length):
    """The lines of each document, the unit SentencePiece learns from; blank lines are dropped. A line
    longer than ``max_sentence_length`` bytes is cut into pieces of at most that many characters' worth,
    since the library would otherwise skip it silently."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line.encode("utf-8", "surrogatepass")) <= max_sentence_length:
                yield line
                continue
            step = max(1, max_sentence_length // 4)   # a character is at most 4 UTF-8 bytes
            for start in range(0, len(line), step):
                yield line[start:start + step]


def train_sentencepiece(sentences, vocab_size, model_type="unigram", special_tokens=(), num_threads=1,
                        character_coverage=0.9995, max_sentence_length=16384, input_sentence_size=0):
    """The serialized SentencePiece model (bytes) learnt from ``sentences`` (an iterable of str).
    ``special_tokens`` become control symbols (ids after <unk> <s> </s>; never produced from text, as our
    BPE's special tokens). Raises ValueError, with the library's reason, for settings the corpus cannot
    meet (e.g. a vocabulary larger than the corpus supports)."""
    import sentencepiece
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model type {model_type!r}; valid: {', '.join(MODEL_TYPES)}")
    floor = 3 + 256 + len(special_tokens)
    if vocab_size < floor:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte tokens + <unk> <s> "
                         f"</s> + {len(special_tokens)} special token(s) = at least {floor}")
    model = io.BytesIO()
    seen = [0]   # sentences handed to the library, to tell an empty input from other failures

    def counted():
        for s in sentences:
            seen[0] += 1
            yield s

    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=counted(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=character_coverage, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            control_symbols=list(special_tokens), num_threads=num_threads,
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, minloglevel=1)
    except RuntimeError as e:
        if not seen[0]:
            raise ValueError("no text to learn from (the input holds no non-blank line)") from None
        # The library's message starts with its source location ("INTERNAL: src/x.cc(744) [check] ...").
        reason = str(e).splitlines()[0].rsplit("] ", 1)[-1]
        raise ValueError(f"sentencepiece could not train: {reason}") from None
    return model.getvalue()


def write_model(directory, model_bytes):
    """Write DIR/tokenizer.model: temporary name, fsync, rename, so a crash never leaves a truncated model
    where load_tokenizer would read it. Returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.model")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(model_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
