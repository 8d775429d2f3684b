"""tools/preprocess_data.py's input formats (issue 25): JSONL (plain, .gz, .zst), Parquet (file, directory,
glob) and a datasets save_to_disk directory of the same documents give byte-identical .bin/.idx, whose
documents equal the tokenizer's own encode (the serial reference); several keys, several inputs, one
output per input, the bos/eod layout with a Hugging Face tokenizer.json, the progress line, and each
bad input: one line naming the file (and line or row), exit status 2, nothing written."""
import gzip
import importlib.util
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megagopher.data import IndexedDataset
from megagopher.data.preprocess import preprocess
from megagopher.data.tokenizer import load_tokenizer
from megagopher.errors import EXIT_INPUT_ERROR
from train_utils import bpe_tokenizer_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ([f"Doc {i}: {'lorem ipsum dolor ' * (i % 5)}ünïcode 😀 κείμενο 文本 {i * i}\n\tdef f(x):  return x"
          for i in range(40)] + ["", "  ", "last one"])
ROWS = [{"id": i, "title": f"Title {i}", "text": t} for i, t in enumerate(TEXTS)]


def _load_tool():
    path = os.path.join(ROOT, "tools", "preprocess_data.py")
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _load_tool()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return bpe_tokenizer_dir(tmp_path_factory.mktemp("gpt2"), TEXTS, 400)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained with `tokenizers`, BOS added as Llama's config says."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}))
    return str(d)


def write_jsonl(path, rows):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    elif str(path).endswith(".zst"):
        with pa.CompressedOutputStream(str(path), "zstd") as f:
            f.write(data)
    else:
        open(path, "wb").write(data)
    return str(path)


def write_parquet(path, rows, row_group_size=7):
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)
    return str(path)


def read_pair(prefix):
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]


def run(inputs, tok_dir, prefix, **kw):
    kw.setdefault("append_eod", True)
    return preprocess(inputs, tok_dir, str(prefix), log_interval=0, log=io.StringIO(), **kw)


def test_every_format_gives_the_same_bytes_and_the_reference_tokens(tmp_path, gpt2_dir):
    import datasets
    src = tmp_path / "src"
    src.mkdir()
    (src / "shards").mkdir()
    inputs = {f: write_jsonl(src / f"docs.{f}", ROWS) for f in ("jsonl", "jsonl.gz", "jsonl.zst")}
    inputs["parquet"] = write_parquet(src / "docs.parquet", ROWS)
    for k in range(3):   # a directory of shards, and a glob over them, in sorted name order
        write_parquet(src / "shards" / f"part-{k}.parquet", ROWS[k * 15:(k + 1) * 15])
    inputs["directory"], inputs["glob"] = str(src / "shards"), str(src / "shards" / "part-*.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(src / "saved"), num_shards=2)
    inputs["save_to_disk"] = str(src / "saved")
    results = {}
    for name, path in inputs.items():
        stats = run(path, gpt2_dir, tmp_path / name)
        assert (stats["documents"], stats["empty"], stats["skipped"]) == (len(TEXTS) - 1, 1, 0), name
        results[name] = read_pair(stats["prefix"])
    stats = run(inputs["parquet"], gpt2_dir, tmp_path / "w2", workers=2, batch_docs=3)
    results["parquet, 2 workers"] = read_pair(stats["prefix"])
    for name, pair in results.items():
        assert pair == results["jsonl"], name
    tok = load_tokenizer(gpt2_dir)
    ds = IndexedDataset(stats["prefix"])
    kept = [t for t in TEXTS if tok.encode(t)]
    assert len(kept) == len(TEXTS) - 1 and len(ds) == len(kept)
    for i, text in enumerate(kept):
        assert ds[i].tolist() == tok.encode(text) + [tok.eod]


def test_two_keys_several_inputs_and_one_output_per_input(tmp_path, gpt2_dir):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:20])
    b = write_parquet(tmp_path / "b.parquet", ROWS[20:])
    whole = write_jsonl(tmp_path / "whole.jsonl", ROWS)
    stats = run([a, b], gpt2_dir, tmp_path / "ab", json_key=["title", "text"], workers=2)
    assert stats["prefix"] == str(tmp_path / "ab_title_text_document")
    assert read_pair(stats["prefix"]) == read_pair(run(whole, gpt2_dir, tmp_path / "one",
                                                       json_key=["title", "text"])["prefix"])
    tok = load_tokenizer(gpt2_dir)
    ds = IndexedDataset(stats["prefix"])
    for i, row in enumerate(ROWS):
        assert ds[i].tolist() == tok.encode(row["title"] + "\n\n" + row["text"]) + [tok.eod]
    stats = run([a, b], gpt2_dir, tmp_path / "per", output_per_input=True)
    assert [o["prefix"] for o in stats["outputs"]] == [str(tmp_path / "per_a_text_document"),
                                                       str(tmp_path / "per_b_text_document")]
    for path, out in zip((a, b), stats["outputs"]):
        assert read_pair(out["prefix"]) == read_pair(run(path, gpt2_dir, tmp_path / "single")["prefix"])


def test_hf_tokenizer_layout_bos_text_eod(tmp_path, hf_dir):
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    bos, eos = reference.token_to_id("<s>"), reference.token_to_id("</s>")
    src = write_parquet(tmp_path / "d.parquet", ROWS)
    log = io.StringIO()
    stats = preprocess(src, hf_dir, str(tmp_path / "hf"), append_eod=True, workers=2, log_interval=1e-9, log=log)
    ds = IndexedDataset(stats["prefix"])
    kept = [t for t in TEXTS if reference.encode(t, add_special_tokens=False).ids]
    assert stats["empty"] == len(TEXTS) - len(kept) and len(ds) == len(kept) and ds.dtype == np.uint16
    for i, text in enumerate(kept):
        assert ds[i].tolist() == [bos] + reference.encode(text, add_special_tokens=False).ids + [eos]
    line = log.getvalue().splitlines()[-1]
    for part in ("docs/s", "MB/s", f"{stats['tokens']} tokens", "ETA", "input 100% read"):
        assert part in line, line


def tool(capsys, *args):
    status = TOOL.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return status, err


def damaged_parquet(path):
    data = open(write_parquet(path, ROWS), "rb").read()
    open(path, "wb").write(data[: len(data) // 2])   # footer gone: the file's metadata cannot be read
    return str(path)


def arrow_binary_with_bad_utf8(path):
    texts = [t.encode("utf-8") for t in TEXTS[:10]]
    texts[6] = b"caf\xe9"   # Latin-1, not UTF-8
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary())}), str(path))
    return str(path)


def empty_parquet(path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(path))
    return str(path)


BAD = {   # name -> (make the input under DIR, what stderr names)
    "damaged parquet": (lambda d: damaged_parquet(d / "bad.parquet"), "bad.parquet is not a readable Parquet file"),
    "missing column": (lambda d: write_parquet(d / "cols.parquet", [{"id": 1, "body": "x"}]),
                       "cols.parquet has no column 'text'; its columns: id, body"),
    "bad utf-8 line": (lambda d: (d / "u.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n') and
                       str(d / "u.jsonl"), "u.jsonl:2: not valid UTF-8 (byte 0xe9"),
    "bad utf-8 row": (lambda d: arrow_binary_with_bad_utf8(d / "b.parquet"),
                      "b.parquet: row 6: field 'text' is not valid UTF-8"),
    "lone surrogate": (lambda d: write_jsonl(d / "s.jsonl", [{"text": "ok"}, {"text": "a\ud800b"}]),
                       "s.jsonl:2: not valid UTF-8 (lone surrogate"),
    "empty jsonl": (lambda d: (d / "e.jsonl").write_text("\n\n") and str(d / "e.jsonl"), "no documents in"),
    "empty parquet": (lambda d: empty_parquet(d / "e.parquet"), "no documents in"),
    "glob matching nothing": (lambda d: str(d / "nothing-*.parquet"), "nothing-*.parquet matches no file"),
    "no such path": (lambda d: str(d / "absent.jsonl"), "absent.jsonl does not exist"),
    "unknown format": (lambda d: (d / "x.csv").write_text("text\nhi\n") and str(d / "x.csv"),
                       "x.csv: unknown input format"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, gpt2_dir, capsys, case):
    make, expected = BAD[case]
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    path = make(data)
    status, err = tool(capsys, "--input", path, "--tokenizer-dir", gpt2_dir, "--output-prefix", str(out / "o"))
    assert status == EXIT_INPUT_ERROR and len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err
    assert os.listdir(out) == []


def test_malformed_documents_skipped_or_stop_with_strict(tmp_path, gpt2_dir, capsys):
    rows = [{"text": t} for t in TEXTS[:8]]
    rows[3]["text"] = None
    src = write_parquet(tmp_path / "n.parquet", rows)
    out = tmp_path / "out"
    status, err = tool(capsys, "--input", src, "--tokenizer-dir", gpt2_dir, "--output-prefix", str(out / "o"))
    assert status == 0 and f"{src}: row 3: malformed document: field 'text' is null (skipped)" in err
    assert len(IndexedDataset(str(out / "o_text_document"))) == 7
    status, err = tool(capsys, "--input", src, "--tokenizer-dir", gpt2_dir, "--output-prefix", str(out / "s"),
                       "--strict")
    assert status == EXIT_INPUT_ERROR and err == [f"error: {src}: row 3: malformed document: field 'text' is "
                                                  f"null (stopping: --strict)"]
    assert sorted(os.listdir(out)) == ["o_text_document.bin", "o_text_document.idx"]
