"""A model's tokenizer across the Hugging Face boundary (megagopher/export/hf_tokenizer.py), every kind, built in
the test by its own library (tests/hf_tokenizers.py): tools/import_hf.py carries it into OUT/tokenizer/ and
config.toml; tools/export_hf.py writes it so that transformers' AutoTokenizer, the outside reference, encodes
as our tokenizer does with its BOS: ``AutoTokenizer(text).input_ids == [bos] * add_bos + encode(text)``, and
decodes the ids back to the text. A tokenizer that does not read, does not fit the embedding or disagrees with
config.json on the end of a document is refused naming the file, before anything is written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import hf_tokenizers as build
from megagopher.config import load_config
from megagopher.data.tokenizer import load_tokenizer
from megagopher.export.hf import export_hf
from megagopher.export.hf_config import HFImportError
from megagopher.export.hf_import import import_hf
from megagopher.export.hf_tokenizer import special_ids, write_tokenizer
from train_utils import ROOT

KINDS = ("gpt2", "huggingface", "sentencepiece", "tiktoken")


def tf():
    import transformers
    return transformers


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{name: tokenizer directory}: the four kinds, and the variants the export must handle."""
    tmp, texts = tmp_path_factory.mktemp("tok"), build.training_texts()
    return {"gpt2": build.gpt2_files(str(tmp / "gpt2"), texts),
            "huggingface": build.tokenizer_json(str(tmp / "hf"), texts),
            "huggingface_bare": build.tokenizer_json(str(tmp / "hf_bare"), texts, config=False),
            "sentencepiece": build.sentencepiece_model(str(tmp / "spm"), texts),
            "sentencepiece_unigram": build.sentencepiece_model(str(tmp / "spm_uni"), texts, "unigram", llama=False),
            "sentencepiece_no_bos": build.sentencepiece_model(str(tmp / "spm_nobos"), texts, add_bos=False),
            "tiktoken": build.tiktoken_file(str(tmp / "tiktoken"), texts)}


def check_autotokenizer(directory, tok):
    """AutoTokenizer on ``directory`` encodes the mixed corpus as ``tok`` (with its BOS) and decodes as it does.
    Special-token strings inside text: only the Hugging Face backend splits them off as transformers does;
    the others, like their libraries, read them as text (a document cannot forge a boundary)."""
    theirs = tf().AutoTokenizer.from_pretrained(directory)
    texts = build.MIXED + ([build.SPECIAL_TEXT] if tok.kind == "huggingface" else [])
    for text in texts:
        ours = tok.encode(text)
        assert len(ours) > 3
        assert theirs(text).input_ids == [tok.bos] * tok.add_bos + ours, (tok.kind, text)
        assert theirs.decode(ours) == tok.decode(ours), (tok.kind, text)
        # (SentencePiece's default NFKC normalisation collapses whitespace: its text does not come back)
        assert tok.decode(ours) == text or tok.kind == "sentencepiece", (tok.kind, text)
    assert theirs.eos_token_id == tok.eod is not None
    assert theirs.bos_token_id == (tok.bos if tok.kind != "gpt2" else tok.eod)


@pytest.mark.parametrize("name", ["gpt2", "huggingface", "huggingface_bare", "sentencepiece", "sentencepiece_unigram",
                                  "sentencepiece_no_bos", "tiktoken"])
def test_written_tokenizer_loads_with_autotokenizer(tokenizers, name, tmp_path):
    tok = load_tokenizer(tokenizers[name])
    assert tok.kind == name.split("_")[0]
    assert tok.add_bos == (name not in ("gpt2", "sentencepiece_no_bos"))
    write_tokenizer(tok, str(tmp_path), 64)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    config = json.load(open(tmp_path / "tokenizer_config.json"))
    if name in ("huggingface", "sentencepiece_no_bos"):   # the tokenizer's own, copied
        assert config == json.load(open(os.path.join(tokenizers[name], "tokenizer_config.json")))
    check_autotokenizer(str(tmp_path), tok)


def tiny_llama(tok, directory, generation=None):
    """A random 1-layer Llama whose vocabulary and special ids are ``tok``'s, saved with its tokenizer's files."""
    bos, eos = special_ids(tok)
    config = tf().LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              bos_token_id=bos, eos_token_id=eos, pad_token_id=None)
    torch.manual_seed(0)
    tf().LlamaForCausalLM(config).save_pretrained(directory)
    for name in os.listdir(tok.directory):
        shutil.copyfile(os.path.join(tok.directory, name), os.path.join(directory, name))
    if generation is not None:
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump(generation, f)
    return directory


@pytest.mark.parametrize("kind", KINDS)
def test_import_carries_each_kind_and_export_gives_it_back(tokenizers, kind, tmp_path):
    """import -> OUT/tokenizer/ and config.toml -> export -> AutoTokenizer equals ours; config.json's ids the
    tokenizer's; the model's generation_config.json (eos as a list, as instruction-tuned models give) goes along."""
    tok = load_tokenizer(tokenizers[kind])
    generation = {"bos_token_id": special_ids(tok)[0], "eos_token_id": [tok.eod, 3], "max_length": 64}
    hf_dir = tiny_llama(tok, str(tmp_path / "hf"), generation)
    mg_dir = str(tmp_path / "mg")
    import_hf(hf_dir, mg_dir)
    carried = sorted(os.listdir(os.path.join(mg_dir, "tokenizer")))
    assert carried == sorted(set(tok.files) | {"generation_config.json"})
    cfg = load_config(os.path.join(mg_dir, "config.toml"))
    assert (cfg.data.tokenizer_dir, cfg.data.tokenizer_kind) == (os.path.join(mg_dir, "tokenizer"), kind)
    assert cfg.data.eod_id == -1   # the tokenizer's (a model that disagrees is refused)
    out = str(tmp_path / "export")
    export_hf(mg_dir, out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["bos_token_id"], config["eos_token_id"]) == special_ids(tok)
    assert json.load(open(os.path.join(out, "generation_config.json"))) == generation
    check_autotokenizer(out, load_tokenizer(cfg.data.tokenizer_dir, cfg.data.tokenizer_kind))


def test_a_directory_with_several_kinds_carries_them_all(tokenizers, tmp_path):
    """Llama 2 ships tokenizer.json and tokenizer.model: both are carried; tokenizer.json is the detected
    kind, --tokenizer-kind takes the other."""
    hf_dir = tiny_llama(load_tokenizer(tokenizers["sentencepiece"]), str(tmp_path / "hf"))
    converted = tf().AutoTokenizer.from_pretrained(tokenizers["sentencepiece"])
    converted.backend_tokenizer.save(os.path.join(hf_dir, "tokenizer.json"))
    for kind, expected in ((None, "huggingface"), ("sentencepiece", "sentencepiece")):
        mg_dir = str(tmp_path / f"mg_{expected}")
        import_hf(hf_dir, mg_dir, tokenizer_kind=kind)
        assert sorted(os.listdir(os.path.join(mg_dir, "tokenizer"))) == ["generation_config.json", "tokenizer.json",
                                                                         "tokenizer.model"]
        assert load_config(os.path.join(mg_dir, "config.toml")).data.tokenizer_kind == expected


def _broken(tokenizers, tmp_path, name, damage):
    tok = load_tokenizer(tokenizers[name])
    hf_dir = tiny_llama(tok, str(tmp_path / "hf"))
    damage(hf_dir, tok)
    return hf_dir


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _smaller_model(hf_dir, tok):
    """A model whose embedding is one row short of the tokenizer's vocabulary."""
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config = tf().LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    config.vocab_size = tok.vocab_size - 1
    tf().LlamaForCausalLM(config).save_pretrained(hf_dir)


def _config_key(key, value):
    def damage(hf_dir, tok):
        config = json.load(open(os.path.join(hf_dir, "config.json")))
        json.dump({**config, key: value(tok)}, open(os.path.join(hf_dir, "config.json"), "w"))
    return damage


BAD = [
    ("huggingface", lambda d, tok: _truncate(os.path.join(d, "tokenizer.json")),
     r"tokenizer\.json is not a valid tokenizers file.*pass --no-tokenizer"),
    ("sentencepiece", lambda d, tok: _truncate(os.path.join(d, "tokenizer.model")),
     r"tokenizer\.model is not a valid SentencePiece model.*--no-tokenizer"),
    ("gpt2", lambda d, tok: os.remove(os.path.join(d, "merges.txt")), r"merges\.txt.*--no-tokenizer"),
    ("huggingface", _smaller_model,
     r"tokenizer\.json: the tokenizer has \d+ tokens but the model's embedding \(config\.json vocab_size\) \d+"),
    ("tiktoken", _config_key("eos_token_id", lambda tok: tok.eod - 1),
     r"config\.json: eos_token_id = \d+ but the tokenizer .*tokenizer\.model ends a document with \d+ "
     r"\('<\|end_of_text\|>'\)"),
    ("sentencepiece", _config_key("bos_token_id", lambda tok: 2), r"config\.json: bos_token_id = 2 but the "
     r"tokenizer .* starts every document with 1 \('<s>'\)"),
]


@pytest.mark.parametrize("name, damage, message", BAD)
def test_a_bad_tokenizer_is_refused_before_anything_is_written(tokenizers, tmp_path, name, damage, message):
    hf_dir = _broken(tokenizers, tmp_path, name, damage)
    with pytest.raises(HFImportError, match=message):
        import_hf(hf_dir, str(tmp_path / "mg"))
    assert not os.path.exists(tmp_path / "mg")


def test_command_line_errors_and_no_tokenizer(tokenizers, tmp_path):
    hf_dir = _broken(tokenizers, tmp_path, "huggingface", BAD[0][1])
    out = str(tmp_path / "mg")
    proc = subprocess.run([sys.executable, "tools/import_hf.py", "--model", hf_dir, "--output", out],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and not os.path.exists(out), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("import_hf: error: ")
    assert "tokenizer.json is not a valid tokenizers file" in proc.stderr
    proc = subprocess.run([sys.executable, "tools/import_hf.py", "--model", hf_dir, "--output", out, "--no-tokenizer"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer" not in os.listdir(out)
    assert load_config(os.path.join(out, "config.toml")).data.tokenizer_dir == ""
