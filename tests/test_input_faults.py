"""Damaged input files end a run with one line naming the file and exit status 2, on every rank (issue 17).

A table-driven campaign: every artifact (the dataset's .bin and .idx, the index cache the dataset builder
writes, the tokenizer's vocab.json and merges.txt, the config TOML) times every damage (a flipped bit or
byte at a seeded random offset, truncation to a seeded random length, zero-filled, deleted, replaced by a
directory, no read permission), plus a seeded draw of extra offsets. Each case damages a fresh copy of one
prepared set of inputs, and an oracle that reads only the damaged file (never the library's verdict) says
what must happen:

  error          an InputError naming the file (one line): the run exits 2;
  same           the run proceeds and reads exactly the undamaged data and vocabulary (a damaged cache is
                 rebuilt; a root user reads a file without read permission anyway);
  in_range       a changed token that is still inside the vocabulary: undetectable, the run proceeds;
  error|same     either of those: a change the format may not reveal (a rising document index, a whitespace
                 byte of JSON) must at least not change what the run reads;
  error|proceed  the config: a value changed into another valid value is a config like any other.

In-process cases run what the trainer does with its inputs before the first step; a subset runs
``python -m megagopher.train`` itself, at least one per input file, two of them as 2 ranks (with
torchrun's environment) to show that every rank exits 2 with its one line. Every case also checks that
no input file was written. A new file type joins by adding one ARTIFACTS entry (where it lies and its
oracle), a new damage by adding one DAMAGES entry; both then join the table and the seeded draw.
"""
import builtins
import glob
import os
import random
import shutil
import time
import tomllib
import warnings

import numpy as np
import pytest

from megagopher.errors import InputError
from megagopher.config import load_config, parse_overrides, validate
from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files
from megagopher.data.indexed_dataset import IndexedDatasetBuilder, token_dtype_for
from megagopher.data.tokenizer import load_tokenizer
from megagopher.training.data import build_datasets, vocab_size_of
from train_utils import ROOT, launch_ranks, read_metrics

CONFIG = """[model]
num_layers = 2
hidden_size = 32
num_attention_heads = 4
num_query_groups = 2
seq_length = 16
make_vocab_size_divisible_by = 8
[training]
micro_batch_size = 2
global_batch_size = 4
train_iters = 1
seed = 7
log_interval = 1
[optimizer]
lr = 3e-3
warmup_iters = 1
[data]
source = "indexed"
split = "90,10,0"
[run]
tensorboard = false
"""
VOCAB = 300
INPUTS = ("data/corpus.bin", "data/corpus.idx", "tok/vocab.json", "tok/merges.txt", "config.toml")


# -- damages: each changes the file at ``path`` and returns what it did ----------------------------------

def _rewrite(path, data):
    with open(path, "r+b") as f:   # in place, as a disk or a copy tool would damage it
        f.write(data)


def flip_bit(path, rng):
    data = bytearray(open(path, "rb").read())
    at, bit = rng.randrange(len(data)), rng.randrange(8)
    data[at] ^= 1 << bit
    _rewrite(path, data)
    return f"bit {bit} of byte {at}/{len(data)}"


def flip_byte(path, rng):
    data = bytearray(open(path, "rb").read())
    at, mask = rng.randrange(len(data)), rng.randrange(1, 256)
    data[at] ^= mask
    _rewrite(path, data)
    return f"byte {at}/{len(data)} ^ {mask:#04x}"


def truncate(path, rng):
    size = os.path.getsize(path)
    length = rng.randrange(size)
    os.truncate(path, length)
    return f"to {length}/{size} bytes"


def zero_fill(path, rng):
    _rewrite(path, bytes(os.path.getsize(path)))
    return "zero-filled"


def delete(path, rng):
    os.remove(path)
    return "deleted"


def directory(path, rng):
    os.remove(path)
    os.mkdir(path)
    return "a directory"


def no_read(path, rng):
    os.chmod(path, 0)
    return "mode 000" + (" (root reads it anyway)" if os.access(path, os.R_OK) else "")


DAMAGES = {f.__name__: f for f in (flip_bit, flip_byte, truncate, zero_fill, delete, directory, no_read)}
CHANGES = ("flip_bit", "flip_byte", "truncate")   # the damages whose outcome depends on where they fall


# -- artifacts: where each lies in the prepared inputs and what a change to it must give --------------------

def _bin_oracle(path, damage):
    if damage == "truncate":
        return "error"
    return "error" if np.fromfile(path, np.uint16).max() >= VOCAB else "in_range"


ARTIFACTS = {   # name: (glob under the inputs, cache?, oracle for CHANGES)
    "bin": ("data/corpus.bin", False, _bin_oracle),
    "idx": ("data/corpus.idx", False, lambda path, damage: "error|same"),
    "cache_sample_index": ("data/index-cache/*-sample_index.npy", True, None),
    "cache_shuffle_index": ("data/index-cache/*-shuffle_index.npy", True, None),
    "cache_manifest": ("data/index-cache/corpus-train-*.json", True, None),
    "cache_token_range": ("data/index-cache/corpus-tokens-*.json", True, None),
    # Our vocab.json ends with "}": no truncation of it is JSON.
    "vocab": ("tok/vocab.json", False, lambda path, damage: "error" if damage == "truncate" else "error|same"),
    "merges": ("tok/merges.txt", False, lambda path, damage: "error|same"),
    "config": ("config.toml", False, lambda path, damage: "error|proceed"),
}


def locate(root, artifact):
    found = glob.glob(os.path.join(root, ARTIFACTS[artifact][0]))
    assert len(found) == 1, (artifact, found)
    return found[0]


def oracle(artifact, damage, path):
    _, cache, changed = ARTIFACTS[artifact]
    if cache:
        return "same"
    if damage == "no_read":
        return "same" if os.access(path, os.R_OK) else "error"
    return changed(path, damage) if damage in CHANGES else "error"


# -- the prepared inputs, a copy per case, and what the trainer does with them ----------------------------

def overrides(root):
    prefix = os.path.join(root, "data", "corpus")
    return [f'--data.blend=[[1.0, "{prefix}"]]', f"--data.tokenizer_dir={os.path.join(root, 'tok')}"]


def open_inputs(root):
    """What the trainer does with its input files before its first step: ("error", message) for an
    InputError, else ("ok", (vocab size, every train sample)), or ("ok", None) for a config that is valid
    but not the prepared one (its data is not built: a truncated [training] asks for millions of samples).
    Any other exception fails the test."""
    try:
        path = os.path.join(root, "config.toml")
        cfg = load_config(path, parse_overrides(overrides(root)))
        validate(cfg, 1)
        vocab = vocab_size_of(cfg)
        with open(path, "rb") as f:
            if tomllib.load(f) != tomllib.loads(CONFIG):
                return "ok", None
        scfg = cfg.stage(0)
        train, _ = build_datasets(scfg, vocab, scfg.training.train_iters)
        return "ok", (vocab, np.stack([train[i] for i in range(len(train))]))
    except InputError as e:
        return "error", str(e)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inputs"))
    texts = [f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs, {i * 13 % 5} times." for i in range(40)]
    vocab, merges = train_bpe(count_words(texts), VOCAB)
    write_tokenizer_files(os.path.join(root, "tok"), vocab, merges)
    tok = load_tokenizer(os.path.join(root, "tok"))
    assert tok.vocab_size == VOCAB and token_dtype_for(VOCAB) == np.uint16
    builder = IndexedDatasetBuilder(os.path.join(root, "data", "corpus"), np.uint16)
    for text in texts:
        builder.add_document(tok.encode(text) + [tok.eod])
    builder.finalize()
    with open(os.path.join(root, "config.toml"), "w") as f:
        f.write(CONFIG)
    kind, baseline = open_inputs(root)   # also writes the index cache the campaign damages
    assert kind == "ok", baseline
    assert np.fromfile(os.path.join(root, "data", "corpus.bin"), np.uint16).max() < VOCAB
    return root, baseline


def snapshot(root):
    """Every input file's bytes ("dir" for a directory, None when absent)."""
    out = {}
    for rel in INPUTS:
        path = os.path.join(root, rel)
        if os.path.isdir(path) or not os.path.isfile(path):
            out[rel] = "dir" if os.path.isdir(path) else None
        else:
            out[rel] = open(path, "rb").read() if os.access(path, os.R_OK) else os.stat(path).st_mtime_ns
    return out


def damaged_copy(prepared, tmp_path, artifact, damage, k):
    """A copy of the inputs with one artifact damaged (seeded by the case); (root, path, what, verdict)."""
    root = str(tmp_path / "inputs")
    shutil.copytree(prepared[0], root, copy_function=shutil.copy2)   # mtimes too: the cache stays valid
    path = locate(root, artifact)
    what = DAMAGES[damage](path, random.Random(f"{artifact}/{damage}/{k}"))
    return root, path, what, oracle(artifact, damage, path)


def names_the_file(message, path, artifact):
    if path in message:
        return True
    # A config value turned into a valid value that breaks a rule among keys is named by its key.
    return artifact == "config" and any(f"{s}." in message for s in ("model", "training", "optimizer", "data"))


def check_outcome(outcome, verdict, path, artifact, baseline):
    kind, value = outcome
    if kind == "error":
        assert verdict.startswith("error"), f"expected {verdict}, got the error: {value}"
        assert "\n" not in value and names_the_file(value, path, artifact), value
        return "error"
    assert verdict != "error", f"expected an error naming {path}; the inputs opened"
    if value is None:
        assert verdict == "error|proceed", "only a damaged config may load as another config"
        return "proceeds (another valid config)"
    vocab, samples = value
    same = vocab == baseline[0] and np.array_equal(samples, baseline[1])
    if verdict in ("same", "error|same"):
        assert same, "the run would read other data or another vocabulary"
    if verdict == "in_range":
        assert vocab == baseline[0]
    return "proceeds (same data)" if same else "proceeds (changed)"


def _cases():
    table = [(a, d, 0) for a in ARTIFACTS for d in DAMAGES]
    rng = random.Random(17)   # the extra draw: more offsets and lengths for the damages that depend on them
    table += sorted({(rng.choice(list(ARTIFACTS)), rng.choice(CHANGES), rng.randrange(1, 1000)) for _ in range(40)})
    return table


@pytest.mark.parametrize("artifact, damage, k", _cases(), ids=lambda v: str(v))
def test_damaged_input_in_process(prepared, tmp_path, artifact, damage, k):
    root, path, what, verdict = damaged_copy(prepared, tmp_path, artifact, damage, k)
    before = snapshot(root)
    damaged = open(path, "rb").read() if os.path.isfile(path) and os.access(path, os.R_OK) else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = open_inputs(root)
    result = check_outcome(outcome, verdict, path, artifact, prepared[1])
    detail = outcome[1] if outcome[0] == "error" or outcome[1] is None else f"vocab {outcome[1][0]}"
    print(f"\n{artifact:19} {damage:9} {what:32} {verdict:13} -> {result}: {detail}")
    assert snapshot(root) == before, "an input file was written"
    if ARTIFACTS[artifact][1] and damage != "no_read":   # a damaged cache file is named as it is rebuilt
        assert damage == "delete" or any(os.path.basename(path) in str(w.message) for w in caught), caught
    if ARTIFACTS[artifact][1] and damage not in ("directory", "no_read"):
        # The damaged cache file was rebuilt to exactly what it was.
        assert open(path, "rb").read() == open(locate(prepared[0], artifact), "rb").read()
    elif damaged is not None:
        assert open(path, "rb").read() == damaged


@pytest.mark.parametrize("artifact", [a for a, (_, cache, _) in ARTIFACTS.items() if not cache])
def test_unreadable_input_is_named(prepared, tmp_path, monkeypatch, artifact):
    """No read permission, meaningful as root too: opening the file fails as EACCES would."""
    root, path, _, _ = damaged_copy(prepared, tmp_path, artifact, "no_read", 0)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == path:
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    kind, message = open_inputs(root)
    assert kind == "error" and path in message and "ermission denied" in message, message


# -- the real command: one line, exit status 2, on every rank ---------------------------------------------

def _launch(root, run_dir, nproc):
    """``python -m megagopher.train`` on the inputs as ``nproc`` ranks (train_utils.launch_ranks)."""
    return launch_ranks(os.path.join(root, "config.toml"), run_dir, *overrides(root), nproc=nproc)


def _first_k(artifact, damage, verdict, tmp_path, prepared):
    """The first seeded draw of ``damage`` whose oracle verdict is ``verdict`` (for the .bin: a flip that
    leaves a token outside the vocabulary, or one that stays inside)."""
    for k in range(100):
        scratch = tmp_path / f"scratch{k}"
        scratch.mkdir()
        if damaged_copy(prepared, scratch, artifact, damage, k)[3] == verdict:
            return k
    raise AssertionError(f"no draw of {damage} on {artifact} gives {verdict}")


SUBPROCESS = [   # (artifact, damage, verdict to draw for or None for k = 0, ranks): one error at least per file
    ("bin", "flip_bit", "error", 1), ("bin", "flip_bit", "in_range", 1), ("idx", "truncate", None, 1),
    ("vocab", "zero_fill", None, 1), ("merges", "directory", None, 1), ("config", "zero_fill", None, 1),
    ("cache_sample_index", "flip_byte", None, 1), ("vocab", "no_read", None, 1),
    ("bin", "zero_fill", None, 2), ("vocab", "delete", None, 2),
]


@pytest.mark.parametrize("artifact, damage, want, nproc", SUBPROCESS, ids=lambda v: str(v))
def test_damaged_input_through_the_command(prepared, tmp_path, artifact, damage, want, nproc):
    k = _first_k(artifact, damage, want, tmp_path, prepared) if want else 0
    root, path, what, verdict = damaged_copy(prepared, tmp_path, artifact, damage, k)
    before = snapshot(root)
    start = time.time()
    statuses, lines = _launch(root, str(tmp_path / "run"), nproc)
    elapsed = time.time() - start
    print(f"{artifact} {damage} ({what}) x{nproc}: {verdict}, exit {statuses}, {elapsed:.1f}s: {lines}")
    assert snapshot(root) == before, "an input file was written"
    if verdict.startswith("error"):
        assert statuses == [2] * nproc, (statuses, lines)
        for rank_lines in lines:
            assert len(rank_lines) == 1, rank_lines
            assert rank_lines[0].startswith("megagopher.train: ") and path in rank_lines[0], rank_lines
        assert elapsed < 90   # seconds on a loaded 2-core machine, most of it starting Python and torch
    else:
        assert statuses == [0], (statuses, lines)
        assert not any("Traceback" in line for line in lines[0]), lines
        assert [r["iteration"] for r in read_metrics(str(tmp_path / "run"))] == [1]
        if ARTIFACTS[artifact][1]:   # the damaged cache file was rebuilt to exactly what it was
            assert open(path, "rb").read() == open(locate(prepared[0], artifact), "rb").read()


def test_damages_a_random_draw_may_miss(prepared, tmp_path):
    """Three damages set directly: bytes appended to the .bin, a dtype code turned into another of the same
    width (uint16 -> int16: the ids read the same, so the run proceeds on the same data), a repeated token."""
    root = str(tmp_path / "inputs")
    shutil.copytree(prepared[0], root, copy_function=shutil.copy2)
    bin_path, idx_path, vocab_path = (os.path.join(root, rel) for rel in INPUTS[:3])
    with open(bin_path, "ab") as f:
        f.write(b"\x01\x00")
    kind, message = open_inputs(root)
    assert kind == "error" and message.startswith(bin_path) and "do not belong together" in message, message
    os.truncate(bin_path, os.path.getsize(bin_path) - 2)
    with open(idx_path, "r+b") as f:
        f.seek(17)   # the dtype code, after the 9-byte magic and the 8-byte version
        assert f.read(1) == bytes([8])
        f.seek(17)
        f.write(bytes([3]))
    kind, (vocab, samples) = open_inputs(root)
    assert kind == "ok" and vocab == VOCAB and np.array_equal(samples, prepared[1][1])
    text = open(vocab_path, encoding="utf-8").read()
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write(text.replace('"<|endoftext|>"', '"!"'))   # the byte token "!" twice, no end-of-document token
    kind, message = open_inputs(root)
    assert kind == "error" and message.startswith(vocab_path) and "'!' appears twice" in message, message
