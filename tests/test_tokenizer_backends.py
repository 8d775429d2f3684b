"""The tokenizer interface's four backends against the reference libraries themselves (tokenizers,
sentencepiece, tiktoken, transformers), on a mixed corpus; every tokenizer is built here, nothing is
downloaded. Also: detection by content, the SentencePiece trainer end to end, and the bad-input cases."""
import base64
import io
import json
import os
import shutil
import types

import pytest

from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files
from megagopher.data.errors import MissingTokenizerFile, TokenizerError
from megagopher.data.tokenizer import (EOD_TOKEN, TOKENIZER_KINDS, bytes_to_unicode, detect_kind, load_tokenizer)
from megagopher.data.tokenizer_tiktoken import LLAMA3_PATTERN

MIXED = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 3.14159 apples!",
    "Привет, мир! Как дела?  Ελληνικά κείμενα. "
    "العربية نص. हिन्दी पाठ।",
    "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
    "def f(x):\n\tif x  >=  10:\n\t\treturn {'a': [1, 2, 3]}  # comment\n    return None\n",
    "runs of   spaces\t\t\ttabs\n\n\n\nnewlines \r\n and   \n  trailing   ",
    "emoji 👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷 crab 🦀 ✨",
    "special strings in text: <|begin_of_text|> <|end_of_text|> <s> </s> <|endoftext|> <unk> <|eot_id|>",
    "",
    " ",
]
TRAIN = MIXED * 8 + ["the cat sat on the mat and the dog ate the bone"] * 20
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _hf_tokenizer(post_bos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    if post_bos:   # Llama 3's post-processor: BOS before the text
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One directory per backend (and variants), built once for the module."""
    import sentencepiece
    root = tmp_path_factory.mktemp("tokenizers")
    out = {k: str(root / k) for k in ("hf", "hf_bare", "hf_nobos", "sp", "tt", "gpt2")}
    for d in out.values():
        os.makedirs(d)
    _hf_tokenizer().save(os.path.join(out["hf"], "tokenizer.json"))
    _write(os.path.join(out["hf"], "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "add_bos_token": True,
         "eos_token": {"__type": "AddedToken", "content": EOS, "special": True}}))
    shutil.copy(os.path.join(out["hf"], "tokenizer.json"), out["hf_bare"])
    _hf_tokenizer(post_bos=False).save(os.path.join(out["hf_nobos"], "tokenizer.json"))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_writer=model, vocab_size=400, byte_fallback=True,
        model_type="unigram", hard_vocab_limit=False, minloglevel=2,   # Llama 2's normaliser settings:
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    _write(os.path.join(out["sp"], "tokenizer.model"), model.getvalue())
    vocab, merges = train_bpe(count_words(TRAIN), 400)
    write_tokenizer_files(out["gpt2"], vocab, merges)
    # A tiktoken ranks file: our BPE's tokens as bytes, ranked by id (bytes first, then merges in order).
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(decoder[c] for c in t): i for t, i in vocab.items() if t != EOD_TOKEN}
    _write(os.path.join(out["tt"], "tokenizer.model"),
           b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])))
    return out


def _assert_ids_and_round_trip(tok, encode, decode):
    """encode == the library's, encode_batch == per text, and decode(encode(x)) == x where the library's
    own decode gives x back (and always equals the library's decode)."""
    round_trips = 0
    for text in MIXED:
        ids = tok.encode(text)
        assert ids == encode(text), text
        assert tok.decode(ids) == decode(ids), text
        if decode(encode(text)) == text:
            assert tok.decode(ids) == text
            round_trips += 1
    assert tok.encode_batch(MIXED) == [tok.encode(t) for t in MIXED]
    return round_trips


def test_huggingface_matches_tokenizers(dirs):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(os.path.join(dirs["hf"], "tokenizer.json"))
    tok = load_tokenizer(dirs["hf"])
    assert (tok.kind, detect_kind(dirs["hf"]), tok.directory) == ("huggingface", "huggingface", dirs["hf"])
    assert tok.files == ("tokenizer.json", "tokenizer_config.json")
    n = _assert_ids_and_round_trip(tok, lambda t: ref.encode(t, add_special_tokens=False).ids,
                                   lambda ids: ref.decode(ids, skip_special_tokens=False))
    assert n == len(MIXED)   # byte-level BPE gives every text back
    # The special-token strings in the text are the library's added tokens, as its own encode finds them.
    assert ref.token_to_id(BOS) in tok.encode(MIXED[6])
    assert (tok.bos, tok.eos, tok.eod, tok.add_bos) == (ref.token_to_id(BOS), ref.token_to_id(EOS),
                                                        ref.token_to_id(EOS), True)
    assert tok.document_prefix == [tok.bos] and tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    assert tok.special_tokens == {BOS: tok.bos, EOS: tok.eos}


def test_huggingface_matches_transformers(dirs):
    from transformers import PreTrainedTokenizerFast   # what AutoTokenizer picks for this config, 3x cheaper
    ref = PreTrainedTokenizerFast.from_pretrained(dirs["hf"])
    tok = load_tokenizer(dirs["hf"])
    for text in MIXED:
        ids = tok.encode(text)
        assert ref(text, add_special_tokens=False)["input_ids"] == ids
        # transformers' BOS behaviour: what a document / prompt starts with.
        assert ref(text)["input_ids"] == tok.document_prefix + ids
        assert ref.decode(ids) == tok.decode(ids)
    assert (ref.bos_token_id, ref.eos_token_id, len(ref)) == (tok.bos, tok.eos, tok.vocab_size)


def test_huggingface_special_ids_without_config(dirs):
    bare, nobos = load_tokenizer(dirs["hf_bare"]), load_tokenizer(dirs["hf_nobos"])
    # From the post-processor's prefix, and the end-of-text token by its name.
    assert (bare.bos, bare.eos, bare.add_bos, bare.document_prefix) == (0, 1, True, [0])
    assert bare.files == ("tokenizer.json",)
    assert (nobos.bos, nobos.eos, nobos.add_bos, nobos.document_prefix) == (None, 1, False, [1])
    _write(os.path.join(dirs["hf_nobos"], "tokenizer_config.json"), json.dumps({"eos_token": BOS}))
    try:
        assert load_tokenizer(dirs["hf_nobos"]).eod == 0   # the config wins
    finally:
        os.remove(os.path.join(dirs["hf_nobos"], "tokenizer_config.json"))


def test_sentencepiece_matches_library(dirs):
    import sentencepiece
    ref = sentencepiece.SentencePieceProcessor(model_file=os.path.join(dirs["sp"], "tokenizer.model"))
    tok = load_tokenizer(dirs["sp"])
    assert (tok.kind, detect_kind(dirs["sp"]), tok.files) == ("sentencepiece", "sentencepiece", ("tokenizer.model",))
    # With Llama 2's settings (no normalisation, whitespace kept, byte fallback) every text comes back.
    assert _assert_ids_and_round_trip(tok, ref.encode, ref.decode) == len(MIXED)
    assert (tok.bos, tok.eos, tok.eod, tok.add_bos) == (ref.bos_id(), ref.eos_id(), ref.eos_id(), True)
    assert tok.document_prefix == [ref.bos_id()] and tok.vocab_size == ref.get_piece_size()
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    # Byte fallback: a character never seen in training becomes its UTF-8 bytes, not <unk>.
    assert ref.unk_id() not in tok.encode("ꙮ") and tok.decode(tok.encode("ꙮ")) == "ꙮ"


def _reference_tiktoken(path):
    """tiktoken itself, set up as Meta's llama3 tokenizer.py does."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(path)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|step_id|>", "<|eom_id|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(256 - 11)] + ["<|python_tag|>"]
    special = {t: len(ranks) + i for i, t in enumerate(names)}
    return tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special), special


def test_tiktoken_matches_library(dirs):
    path = os.path.join(dirs["tt"], "tokenizer.model")
    ref, special = _reference_tiktoken(path)
    tok = load_tokenizer(dirs["tt"])
    assert (tok.kind, detect_kind(dirs["tt"]), tok.files) == ("tiktoken", "tiktoken", ("tokenizer.model",))
    assert _assert_ids_and_round_trip(tok, ref.encode_ordinary, ref.decode) == len(MIXED)
    assert tok.special_tokens == special and tok.vocab_size == ref.n_vocab == len(special) + 399
    assert (tok.bos, tok.eos, tok.eod, tok.add_bos) == (special[BOS], special[EOS], special[EOS], True)
    assert tok.document_prefix == [special[BOS]] and tok.decode([tok.eod]) == EOS
    # tokenizer_config.json's added_tokens_decoder (Hugging Face's Llama 3 files) replaces the default layout.
    n = ref.n_vocab - 256
    config = {"added_tokens_decoder": {str(n): {"content": "<|begin_of_text|>"}, str(n + 1): {"content": "<|x|>"}},
              "eos_token": "<|x|>", "add_bos_token": False}
    _write(os.path.join(dirs["tt"], "tokenizer_config.json"), json.dumps(config))
    try:
        tok = load_tokenizer(dirs["tt"])
        assert (tok.bos, tok.eod, tok.add_bos, tok.document_prefix, tok.vocab_size) == (n, n + 1, False, [n + 1], n + 2)
    finally:
        os.remove(os.path.join(dirs["tt"], "tokenizer_config.json"))


def test_gpt2_interface(dirs):
    tok = load_tokenizer(dirs["gpt2"])
    assert (tok.kind, tok.directory, tok.files) == ("gpt2", dirs["gpt2"], ("vocab.json", "merges.txt"))
    assert (tok.bos, tok.eos, tok.add_bos, tok.document_prefix) == (None, tok.eod, False, [tok.eod])
    assert tok.encode_batch(MIXED) == [tok.encode(t) for t in MIXED]
    assert detect_kind(dirs["gpt2"]) == "gpt2" and TOKENIZER_KINDS == ("gpt2", "huggingface", "sentencepiece",
                                                                        "tiktoken")


def test_several_kinds_in_one_directory(dirs, tmp_path):
    both = str(tmp_path / "both")
    shutil.copytree(dirs["gpt2"], both)
    shutil.copy(os.path.join(dirs["hf"], "tokenizer.json"), both)
    assert detect_kind(both) == "huggingface" and load_tokenizer(both).kind == "huggingface"
    assert load_tokenizer(both, "gpt2").kind == "gpt2"
    with pytest.raises(MissingTokenizerFile, match="tokenizer.model"):
        load_tokenizer(both, "sentencepiece")
    with pytest.raises(TokenizerError, match=r"tokenizer.model is a sentencepiece tokenizer, not tiktoken"):
        load_tokenizer(dirs["sp"], "tiktoken")
    with pytest.raises(TokenizerError, match="is a tiktoken tokenizer, not sentencepiece"):
        load_tokenizer(dirs["tt"], "sentencepiece")
    with pytest.raises(MissingTokenizerFile, match="tokenizer.json"):
        load_tokenizer(dirs["sp"], "huggingface")
    with pytest.raises(MissingTokenizerFile, match="vocab.json"):
        load_tokenizer(dirs["sp"], "gpt2")
    with pytest.raises(TokenizerError, match=r"unknown tokenizer kind 'llama'.*valid: gpt2, huggingface"):
        load_tokenizer(dirs["sp"], "llama")


def _tool(name):
    """tools/NAME.py as a module, to call its main() in this process."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sentencepiece_trainer_tool(tmp_path, capsys):
    train_tokenizer = _tool("train_tokenizer")
    corpus = tmp_path / "docs.jsonl"
    _write(corpus, "".join(json.dumps({"text": t}) + "\n" for t in TRAIN) + "not json\n")
    for model_type in ("unigram", "bpe"):
        out = str(tmp_path / model_type)
        assert train_tokenizer.main(["--kind", "sentencepiece", "--model-type", model_type, "--input", str(corpus),
                                     "--vocab-size", "400", "--output-dir", out]) == 0
        assert os.listdir(out) == ["tokenizer.model"]   # no temporary file left behind
        tok = load_tokenizer(out)
        assert (tok.kind, tok.vocab_size, tok.bos, tok.eos, tok.add_bos) == ("sentencepiece", 400, 1, 2, True)
        # Byte fallback: a character absent from the corpus is its UTF-8 bytes, never <unk> (id 0).
        text = "ꙮ 🦉 x"
        assert 0 not in tok.encode(text) and tok.decode(tok.encode(text)) == text
        assert all(tok.decode(tok.encode(t)) == t for t in MIXED)   # nothing normalised away
    assert f"line {len(TRAIN) + 1}: not valid JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    _write(empty, "\n")
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["--kind", "sentencepiece", "--input", str(empty), "--vocab-size", "300",
                              "--output-dir", str(tmp_path / "none")])
    assert e.value.code == 2 and "no text to learn from" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none" / "tokenizer.model")
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["--kind", "sentencepiece", "--input", str(corpus), "--vocab-size", "100000",
                              "--output-dir", str(tmp_path / "none")])
    assert e.value.code == 2 and "Vocabulary size too high" in capsys.readouterr().err


def test_damaged_files_are_named(dirs, tmp_path):
    def broken(name, data):
        d = tmp_path / f"case{len(os.listdir(tmp_path))}"
        d.mkdir()
        _write(d / name, data)
        return str(d)

    with open(os.path.join(dirs["hf"], "tokenizer.json"), "rb") as f:
        text = f.read()
    d = broken("tokenizer.json", text[:len(text) // 2])
    with pytest.raises(TokenizerError, match=rf"{d}/tokenizer.json is not a valid tokenizers file"):
        load_tokenizer(d)
    d = broken("tokenizer.model", b"\x0a\x07garbage" + bytes(range(200)))
    assert detect_kind(d) == "sentencepiece"
    with pytest.raises(TokenizerError, match=rf"{d}/tokenizer.model is not a valid SentencePiece model"):
        load_tokenizer(d)
    with open(os.path.join(dirs["tt"], "tokenizer.model"), "rb") as f:
        lines = f.read().splitlines(keepends=True)
    d = broken("tokenizer.model", b"".join(lines[:2] + [b"@@notbase64@@ 2\n"] + lines[3:]))
    with pytest.raises(TokenizerError, match=rf"{d}/tokenizer.model line 3: expected 'base64token rank'"):
        load_tokenizer(d)
    d = broken("tokenizer.model", b"".join(lines[:5] + lines[6:]))   # rank 5 missing
    with pytest.raises(TokenizerError, match=r"tokenizer.model: ranks must be 0..\d+, each once"):
        load_tokenizer(d)
    d = broken("tokenizer.model", b"")
    with pytest.raises(TokenizerError, match=rf"{d}/tokenizer.model is empty"):
        load_tokenizer(d)
    d = broken("tokenizer_config.json", "{")
    shutil.copy(os.path.join(dirs["sp"], "tokenizer.model"), d)
    with pytest.raises(TokenizerError, match=rf"{d}/tokenizer_config.json is not valid JSON"):
        load_tokenizer(d)
    _write(os.path.join(d, "tokenizer_config.json"), json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: bos_token '<nope>' is not a token"):
        load_tokenizer(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingTokenizerFile, match=rf"{empty} holds no tokenizer: expected vocab.json \+ merges.txt "
                       r"\(gpt2\), tokenizer.json \(huggingface\), or tokenizer.model"):
        load_tokenizer(str(empty))
    with pytest.raises(MissingTokenizerFile, match=r"tokenizer directory \S+/absent does not exist"):
        detect_kind(str(tmp_path / "absent"))


def _reader(cfg, vocab):
    """A checkpoint reader as export/loading.py sees one: the run's config and the embedding's shape."""
    from megagopher.config import to_tables
    return types.SimpleNamespace(path="CKPT", meta={"format_version": 2, "config": to_tables(cfg),
                                                    "tensors": {"embedding.word.weight": {"full_shape": [vocab, 8]}}})


def test_run_tokenizer_uses_the_runs_kind_and_must_fit(dirs, tmp_path):
    from megagopher.config import load_config, parse_overrides
    from megagopher.export.loading import load_run_tokenizer, tokenizer_kind_of
    both = str(tmp_path / "both")
    shutil.copytree(dirs["gpt2"], both)
    shutil.copy(os.path.join(dirs["sp"], "tokenizer.model"), both)
    cfg = load_config(None, parse_overrides([f"--data.tokenizer_dir={both}", "--data.tokenizer_kind=gpt2"]))
    reader = _reader(cfg, 400)
    assert tokenizer_kind_of(reader) == "gpt2" and load_run_tokenizer(reader).kind == "gpt2"
    assert load_run_tokenizer(reader, dirs["sp"]).kind == "sentencepiece"   # a directory given is detected
    with pytest.raises(ValueError, match=rf"tokenizer {dirs['tt']}/tokenizer.model \(tiktoken\) has 655 tokens but "
                       r"the model of checkpoint CKPT has a vocabulary of 400"):
        load_run_tokenizer(reader, dirs["tt"])
    from megagopher.training.data import eod_id_of, vocab_size_of
    flags = ["--data.source=indexed", f"--data.tokenizer_dir={both}", "--data.reset_position_ids=true"]
    cfg = load_config(None, parse_overrides(flags))
    assert (vocab_size_of(cfg), eod_id_of(cfg)) == (400, 2)   # detected: tokenizer.model before vocab.json
    cfg = load_config(None, parse_overrides(flags + ["--data.tokenizer_kind=gpt2"]))
    assert (vocab_size_of(cfg), eod_id_of(cfg)) == (400, 399)


def test_tokenizer_kind_config_errors(tmp_path, capsys):
    from megagopher import train
    from megagopher.config import ConfigError, load_config, parse_overrides, validate
    with pytest.raises(ConfigError, match=r"data.tokenizer_kind = 'llama'; valid: '', 'gpt2', 'huggingface', "
                       r"'sentencepiece', 'tiktoken'"):
        load_config(None, parse_overrides(["--data.tokenizer_kind=llama"]))
    cfg = load_config(None, parse_overrides(["--data.tokenizer_kind=tiktoken"]))
    with pytest.raises(ConfigError, match=r"data.tokenizer_kind = 'tiktoken' needs data.tokenizer_dir"):
        validate(cfg, 1)
    # Through the training command: one line, exit 2, before any process group exists.
    assert train.main([f"--run.dir={tmp_path}", "--data.tokenizer_kind=llama"]) == 2
    assert "config error: data.tokenizer_kind = 'llama'; valid:" in capsys.readouterr().err
