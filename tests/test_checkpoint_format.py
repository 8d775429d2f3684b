"""The checkpoint format at library level (training/checkpoint.py, format 3), on 2 data-parallel gloo ranks:
a save and load under the same layout continues bitwise (fp32 and bf16, with and without ZeRO-1, sync and
async); every rank writes only its own file and the bytes written are the model state once; the files are
plain safetensors; a damaged file or metadata.json is reported as CheckpointCorrupt naming the file."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from megagopher import parallel_state as ps
from megagopher.common import PRECISION_DTYPES
from megagopher.config import JobConfig
from megagopher.distributed import finalize_model_grads, wrap_data_parallel
from megagopher.model import GPTConfig, GPTModel
from megagopher.optimizer import build_optimizer
from megagopher.testing import spawn
from megagopher.training import checkpoint as ckpt

OPT = dict(lr=1e-3, weight_decay=0.1, clip_grad=1.0)
CFG = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=70,
                make_vocab_size_divisible_by=8)
CASES = [("fp32", False, False), ("fp32", True, False), ("bf16", True, True), ("bf16", False, True)]


def _build(precision, distributed):
    model = GPTModel(CFG).initialize(3).to(PRECISION_DTYPES[precision])
    chunks = wrap_data_parallel([model], {"bucket_size_mb": 0.004}, distributed_optimizer=distributed)
    return chunks, build_optimizer(chunks, {**OPT, "distributed": distributed}, {"precision": precision})


def _step(chunks, opt, seed):
    gen = torch.Generator().manual_seed(seed * 10 + ps.get_dp_rank())
    ids = torch.randint(0, 70, (2, 16), generator=gen)
    opt.zero_grad()
    chunks[0](ids, labels=torch.roll(ids, 1, 1)).float().mean().backward()
    finalize_model_grads(chunks)
    return opt.step()


def _params(chunks):
    chunks[0].finish_param_gather()  # ZeRO-1's parameter all-gathers overlap the next forward: wait first
    return [p.detach().clone() for p in chunks[0].module.parameters()]


def _save_load_continue(rank, world, root):
    ps.initialize_model_parallel(tp=1, pp=1)
    out = {}
    for precision, distributed, background in CASES:
        tag = f"{precision}_{'zero' if distributed else 'plain'}_{'async' if background else 'sync'}"
        chunks, opt = _build(precision, distributed)
        for seed in range(2):
            _step(chunks, opt, seed)
        pending = ckpt.begin_save(os.path.join(root, tag), 2, chunks, opt, {"iteration": 2}, JobConfig(),
                                  background=background)
        _step(chunks, opt, 2)  # training goes on while an asynchronous save writes its snapshot
        path = ckpt.finish_save(pending)
        expected = _params(chunks)
        fresh, fresh_opt = _build(precision, distributed)
        reader = ckpt.CheckpointReader(path)
        ckpt.load_weights(reader, fresh)
        ckpt.load_optimizer(reader, fresh, fresh_opt)
        _step(fresh, fresh_opt, 2)
        same = all(torch.equal(a, b) for a, b in zip(_params(fresh), expected))
        state = opt.state_bytes() if distributed else (opt.state_bytes() if rank == 0 else 0)
        params = sum(p.numel() * p.element_size() for p in chunks[0].module.parameters())
        out[tag] = {"path": path, "same": same, "state_bytes": state, "param_bytes": params,
                    "step": fresh_opt.step_count}
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("format"))
    return spawn(_save_load_continue, 2, root)


@pytest.mark.parametrize("case", CASES)
def test_same_layout_resume_is_bitwise(saved, case):
    precision, distributed, background = case
    tag = f"{precision}_{'zero' if distributed else 'plain'}_{'async' if background else 'sync'}"
    assert all(r[tag]["same"] for r in saved), tag
    assert all(r[tag]["step"] == 3 for r in saved)


def test_each_rank_writes_its_share_once(saved):
    """Bytes of all pieces = the model's parameters once + the optimizer state once (ZeRO-1 shards are
    disjoint; without ZeRO-1 the replicas split the writing), and each rank wrote one file."""
    for tag in saved[0]:
        path = saved[0][tag]["path"]
        meta = json.load(open(os.path.join(path, "metadata.json")))
        assert sorted(os.listdir(path)) == ["metadata.json", "rank_00000.safetensors", "rank_00001.safetensors"]
        written = {"param": 0, "state": 0}
        for entry in meta["tensors"].values():
            size = {"float32": 4, "bfloat16": 2}[entry["dtype"]]
            for kind, by_rank in entry["pieces"].items():
                n = sum(hi - lo for pieces in by_rank.values() for lo, hi, _, _ in pieces)
                written["param" if kind == "param" else "state"] += n * (size if kind == "param" else 4)
        assert written["param"] == saved[0][tag]["param_bytes"], tag
        distributed = "zero" in tag
        state = sum(r[tag]["state_bytes"] for r in saved) if distributed else saved[0][tag]["state_bytes"]
        assert written["state"] == state, tag
        files = [os.path.join(path, f"rank_{r:05d}.safetensors") for r in range(2)]
        assert all(meta["files"][os.path.basename(f)]["bytes"] == os.path.getsize(f) for f in files)
        with safe_open(files[1], "pt") as f:  # plain safetensors: any tool reads the pieces
            assert "rng/cpu" in f.keys() and any(k.startswith("exp_avg/") for k in f.keys())


def test_full_tensors_read_without_a_process_group(saved):
    reader = ckpt.CheckpointReader(saved[0]["fp32_zero_sync"]["path"])
    embedding = reader.full_tensor("embedding.word.weight")
    assert embedding.shape == (70, 32)  # the vocabulary padding (72) dropped
    master = reader.full_tensor("embedding.word.weight", "master")  # fp32: the weights are the master
    assert torch.equal(master, embedding)
    assert reader.full_tensor("layers.0.mlp.fc1.weight", "exp_avg_sq").min() >= 0


def _damaged_copy(src, dst, damage):
    import shutil
    shutil.copytree(src, dst)
    damage(dst)
    return dst


@pytest.mark.parametrize("what, damage, message", [
    ("metadata invalid UTF-8", lambda d: _flip(os.path.join(d, "metadata.json"), 3, 0xFF), "UnicodeDecodeError"),
    ("metadata truncated", lambda d: _truncate(os.path.join(d, "metadata.json"), 100), "unreadable"),
    ("metadata missing fields", lambda d: open(os.path.join(d, "metadata.json"), "w").write("{}"), "no iteration"),
    ("shard truncated", lambda d: _truncate(os.path.join(d, "rank_00001.safetensors"), 1000), "bytes, the checkpoint"),
    ("shard flipped", lambda d: _flip(os.path.join(d, "rank_00001.safetensors"), -5, 1), "checksum mismatch"),
    ("shard missing", lambda d: os.remove(os.path.join(d, "rank_00001.safetensors")), "missing"),
])
def test_damage_is_reported_naming_the_file(saved, tmp_path, what, damage, message):
    path = _damaged_copy(saved[0]["bf16_zero_async"]["path"], str(tmp_path / "iter_0000002"), damage)
    with pytest.raises(ckpt.CheckpointCorrupt, match=message) as info:
        reader = ckpt.CheckpointReader(path)
        for file in reader.meta["files"]:
            reader.verify(file)
    assert path in str(info.value), what


def _flip(path, offset, mask):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ mask]))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_files_and_their_directories_are_fsynced(tmp_path, monkeypatch):
    """A shard is fsynced once written; a durable text file (metadata.json, latest) before its rename, and
    its directory after, so the published name cannot point at data a power loss took."""
    from megagopher.training import ckpt_files
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    shard = str(tmp_path / "rank_00000.safetensors")
    record = ckpt_files.write_shard({"param/w/0/0": torch.arange(10.0)}, shard)
    assert os.stat(shard).st_ino in synced and record["bytes"] == os.path.getsize(shard)
    assert os.stat(shard).st_mode & 0o777 == 0o666 & ~ckpt_files._UMASK  # the umask's, not owner-only
    synced.clear()
    latest = str(tmp_path / "latest")
    ckpt_files.write_text_durably(latest, "7\n")
    assert synced == [os.stat(latest).st_ino, os.stat(str(tmp_path)).st_ino]
    assert open(latest).read() == "7\n" and not os.path.exists(latest + ".tmp")


def test_every_writer_records_the_digest_the_one_reader_checks(tmp_path):
    """All writers go through training/ckpt_format.py: a Hugging Face import (save_weights_only) and its
    conversion to tp 2 x pp 2 (export/convert.py) carry metadata_sha256 over their content, open with the
    one reader and verify every file, with the same tensors; a converted checkpoint whose metadata.json is
    changed but still valid JSON (the iteration) is reported as damaged, not loaded."""
    import transformers
    from megagopher.export.convert import convert
    from megagopher.export.hf_import import import_hf
    from megagopher.training.ckpt_format import metadata_digest
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=70,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "hf"))
    _, _, imported = import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), tokenizer=False)
    converted = convert(imported, str(tmp_path / "converted"), tp=2, pp=2)
    for path in (imported, converted):
        meta = json.load(open(os.path.join(path, "metadata.json")))
        assert meta["metadata_sha256"] == metadata_digest(meta), path
        assert meta["format_version"] == ckpt.FORMAT_VERSION and meta["rng_files"] == {} and "rng" in meta
        assert meta["layout"]["cp"] == 1 and meta["layout"]["dp"] is None and not meta["has_optimizer"]
        reader = ckpt.CheckpointReader(path)
        for file in reader.meta["files"]:
            reader.verify(file)
        assert open(os.path.join(os.path.dirname(path), "latest")).read() == "0\n"
    a, b = ckpt.CheckpointReader(imported), ckpt.CheckpointReader(converted)
    assert sorted(a.names()) == sorted(b.names())
    assert all(torch.equal(a.full_tensor(n), b.full_tensor(n)) for n in a.names())

    def change_iteration(d):
        path = os.path.join(d, "metadata.json")
        text = open(path).read()
        assert '"iteration": 0' in text
        open(path, "w").write(text.replace('"iteration": 0', '"iteration": 9', 1))
    damaged = _damaged_copy(converted, str(tmp_path / "damaged" / "iter_0000000"), change_iteration)
    with pytest.raises(ckpt.CheckpointCorrupt, match="does not match its digest") as info:
        ckpt.CheckpointReader(damaged)
    assert damaged in str(info.value)


def test_latest_and_find_checkpoints_agree(tmp_path):
    """The one policy (ARCHITECTURE 4.6): find_checkpoints lists every iter_N directory, newest first (never
    iter_N.tmp); one without metadata.json was damaged (a save renames only complete ones into place), so
    its reader says so and the loader falls back; ``latest`` names the newest with metadata.json, which is
    the checkpoint that fallback reaches. Publishing a checkpoint moves ``latest`` to it."""
    root = str(tmp_path / "ckpt")
    model = GPTModel(CFG).initialize(3)
    for it in (1, 2):
        ckpt.save_weights_only(root, it, model, {"iteration": it}, JobConfig())
    assert open(os.path.join(root, "latest")).read() == "2\n"
    os.makedirs(ckpt.iter_dir(root, 3))  # damaged: no metadata.json
    os.makedirs(ckpt.iter_dir(root, 4) + ".tmp")  # a save killed before its rename
    ckpt.write_latest(root)
    assert ckpt.find_checkpoints(root) == [ckpt.iter_dir(root, i) for i in (3, 2, 1)]
    assert ckpt.list_checkpoints(root) == [1, 2] and open(os.path.join(root, "latest")).read() == "2\n"
    with pytest.raises(ckpt.CheckpointCorrupt, match="no metadata.json"):
        ckpt.CheckpointReader(ckpt.find_checkpoints(root)[0])
    assert ckpt.CheckpointReader(ckpt.find_checkpoints(root)[1]).meta["iteration"] == 2
    assert ckpt.find_checkpoints(ckpt.iter_dir(root, 1)) == [ckpt.iter_dir(root, 1)]
