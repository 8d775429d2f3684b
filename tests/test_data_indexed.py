"""MMIDIDX files: byte-exact layout, reader errors, preprocess_data (workers, EOD, malformed lines,
atomic output), and compatibility with Megatron-Core's own IndexedDataset when it is installed."""
import json
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

from megagopher.data import IndexedDataset, IndexedDatasetBuilder
from megagopher.data.indexed_dataset import token_dtype_for
from megagopher.data.preprocess import preprocess
from megagopher.data.tokenizer import load_tokenizer
from train_utils import bpe_tokenizer_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [f"Document {i}: {'lorem ipsum dolor sit amet ' * (i % 7)}ünïcode 😀 {i * i}." for i in range(120)]


def write_docs(path, texts, bad_lines=None):
    """JSONL with texts; ``bad_lines`` maps a 1-based line number to a raw malformed line put there."""
    rows = [json.dumps({"text": t}) for t in texts]
    for line_no, raw in sorted((bad_lines or {}).items()):
        rows.insert(line_no - 1, raw)
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return bpe_tokenizer_dir(tmp_path_factory.mktemp("tok"), DOCS, 500)


def test_idx_layout_byte_by_byte(tmp_path):
    prefix = str(tmp_path / "ds")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    for doc in ([5, 6, 7], [65535], [1, 2, 3, 4, 0]):
        b.add_document(doc)
    b.finalize()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8])     # magic, version, uint16 code
                + struct.pack("<Q", 3) + struct.pack("<Q", 4)                # 3 sequences, 3 documents + 1
                + struct.pack("<3i", 3, 1, 5)                                # int32 lengths
                + struct.pack("<3q", 0, 6, 8)                                # int64 byte pointers
                + struct.pack("<4q", 0, 1, 2, 3))                            # int64 document indices from 0
    assert open(prefix + ".idx", "rb").read() == expected
    assert open(prefix + ".bin", "rb").read() == struct.pack("<9H", 5, 6, 7, 65535, 1, 2, 3, 4, 0)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]          # no temporary files left
    ds = IndexedDataset(prefix)
    assert len(ds) == 3 and ds.num_documents == 3 and ds.dtype == np.uint16
    assert ds[1].tolist() == [65535] and ds[-1].tolist() == [1, 2, 3, 4, 0]
    assert ds.get(2, 1, 3).tolist() == [2, 3, 4]
    assert ds.document_indices.tolist() == [0, 1, 2, 3] and ds.sequence_lengths.tolist() == [3, 1, 5]
    assert [x.tolist() for x in ds[0:2]] == [[5, 6, 7], [65535]]


def test_dtype_choice_and_range_check(tmp_path):
    assert token_dtype_for(50257) == np.uint16 and token_dtype_for(65536) == np.uint16
    assert token_dtype_for(65537) == np.int32
    b = IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    with pytest.raises(ValueError, match="outside uint16 range"):
        b.add_document([70000])
    b.abort()
    assert os.listdir(tmp_path) == []


def test_reader_errors_name_path_and_problem(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match=r"ds\.idx does not exist"):
        IndexedDataset(prefix)
    b = IndexedDatasetBuilder(prefix, np.int32)
    b.add_document(np.arange(100))
    b.add_document(np.arange(50))
    b.finalize()
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError, match=r"sequence index 2 is out of range .* \(2 sequences\)"):
        ds[2]
    with pytest.raises(IndexError, match="outside sequence 1"):
        ds.get(1, 40, 20)
    idx, bin_ = open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(bin_[:-4])                          # truncated .bin
    with pytest.raises(ValueError, match=r"ds\.bin is 596 bytes .* truncated"):
        IndexedDataset(prefix)
    open(prefix + ".bin", "wb").write(bin_)
    open(prefix + ".idx", "wb").write(b"NOTMAGIC!" + idx[9:])             # wrong magic
    with pytest.raises(ValueError, match=r"ds\.idx is not an MMIDIDX index"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx[:-8])                           # truncated .idx
    with pytest.raises(ValueError, match="truncated or corrupt"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx[:17] + bytes([9]) + idx[18:])   # unknown dtype code
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        IndexedDataset(prefix)


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools/preprocess_data.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_preprocess_tool_workers_eod_and_malformed_lines(tmp_path, tok_dir):
    src = tmp_path / "docs.jsonl"
    write_docs(src, DOCS, {5: "{broken", 9: json.dumps({"txt": "wrong key"}), 12: json.dumps({"text": 7})})
    results = {}
    for workers in (1, 2):
        r = run_tool("--input", str(src), "--tokenizer-dir", tok_dir, "--output-prefix", str(tmp_path / f"w{workers}"),
                     "--workers", str(workers), "--append-eod")
        assert r.returncode == 0, r.stderr
        assert f"{src}:5: malformed line: not valid JSON" in r.stderr
        assert f"{src}:9: malformed line: no 'text' field" in r.stderr
        assert f"{src}:12: malformed line: field 'text' is a int" in r.stderr
        assert "skipped 3 malformed line(s)" in r.stdout
        assert "docs/s" in r.stderr and "MB/s per worker" in r.stderr
        results[workers] = [open(tmp_path / f"w{workers}_text_document{e}", "rb").read() for e in (".bin", ".idx")]
    assert results[1] == results[2]                                        # worker count changes nothing
    tok = load_tokenizer(tok_dir)
    ds = IndexedDataset(str(tmp_path / "w2_text_document"))
    assert len(ds) == len(DOCS) and ds.dtype == np.uint16
    for i, text in enumerate(DOCS):
        assert ds[i].tolist() == tok.encode(text) + [tok.eod]


def test_preprocess_strict_and_interrupted_runs_leave_final_names_alone(tmp_path, tok_dir):
    src = tmp_path / "docs.jsonl"
    write_docs(src, DOCS, {100: "not json at all"})
    r = run_tool("--input", str(src), "--tokenizer-dir", tok_dir, "--output-prefix", str(tmp_path / "s"), "--strict")
    assert r.returncode == 2 and f"{src}:100: malformed line" in r.stderr and "--strict" in r.stderr
    assert os.listdir(tmp_path) == ["docs.jsonl"]                          # nothing final, no temporaries
    # An existing dataset survives a run that dies half way (here: after 99 documents were written).
    write_docs(tmp_path / "good.jsonl", DOCS[:10])
    preprocess(str(tmp_path / "good.jsonl"), tok_dir, str(tmp_path / "s"), log_interval=0)
    before = open(tmp_path / "s_text_document.bin", "rb").read()
    with pytest.raises(ValueError, match=":100: malformed line"):
        preprocess(str(src), tok_dir, str(tmp_path / "s"), workers=2, strict=True, batch_docs=7, log_interval=0)
    assert open(tmp_path / "s_text_document.bin", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "good.jsonl", "s_text_document.bin", "s_text_document.idx"]


def test_large_vocabulary_uses_int32(tmp_path, tok_dir):
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8"))
    vocab.update({f"<|pad{i}|>": len(vocab) + i for i in range(70000 - len(vocab))})
    big = tmp_path / "big"
    big.mkdir()
    json.dump(vocab, open(big / "vocab.json", "w", encoding="utf-8"))
    with open(os.path.join(tok_dir, "merges.txt"), encoding="utf-8") as f:
        (big / "merges.txt").write_text(f.read(), encoding="utf-8")
    write_docs(tmp_path / "d.jsonl", DOCS[:5])
    preprocess(str(tmp_path / "d.jsonl"), str(big), str(tmp_path / "o"), append_eod=True, log_interval=0)
    assert open(tmp_path / "o_text_document.idx", "rb").read()[17] == 4   # int32 dtype code
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert ds.dtype == np.int32 and ds[0][-1] == load_tokenizer(str(big)).eod


def import_megatron_indexed_dataset():
    # Import only the module we need. megatron.core's package __init__ still runs (it imports its
    # parallel_state, optimizer, ...): with torch and numpy present that works, after ~7 s and warnings
    # about missing Transformer Engine / Apex, which we silence. Without megatron-core: skip.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_megatron_core_reads_ours_and_we_read_theirs(tmp_path, tok_dir):
    mcore = import_megatron_indexed_dataset()
    write_docs(tmp_path / "d.jsonl", DOCS)
    stats = preprocess(str(tmp_path / "d.jsonl"), tok_dir, str(tmp_path / "ours"), workers=2, append_eod=True,
                       log_interval=0)
    ours = IndexedDataset(stats["prefix"])
    theirs = mcore.IndexedDataset(stats["prefix"])
    assert len(theirs) == len(ours) == len(DOCS)
    assert np.array_equal(theirs.document_indices, ours.document_indices)
    assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    for i in range(len(ours)):
        assert np.array_equal(theirs[i], ours[i])
    assert np.array_equal(theirs.get(3, offset=2, length=4), ours.get(3, 2, 4))
    # The other way: Megatron's builder (multi-sequence documents and int32 too) read by us.
    import torch
    prefix = str(tmp_path / "theirs")
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 100000, size=n) for n in (3, 1, 7, 2, 9)]
    for s in seqs[:2]:
        b.add_item(torch.from_numpy(s))
    b.end_document()
    b.add_document(np.concatenate(seqs[2:]), [7, 2, 9])
    b.finalize(prefix + ".idx")
    mine = IndexedDataset(prefix)
    assert mine.dtype == np.int32 and len(mine) == 5 and mine.document_indices.tolist() == [0, 2, 5]
    for i, s in enumerate(seqs):
        assert mine[i].tolist() == s.tolist()
