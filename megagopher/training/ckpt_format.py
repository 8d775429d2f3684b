"""The checkpoint format in one place: names, the metadata schema and its digest, the publish sequence and
the one policy for "the newest checkpoint" (docs/ARCHITECTURE.md 4.6). Every writer (the trainer's
save_checkpoint, save_weights_only and with it the Hugging Face import, export/convert.py) builds its
metadata with ``build_metadata`` and publishes with ``publish``; every reader opens metadata with
``read_metadata``. Three writers that each spelled the format out drifted apart (one lost the digest).

Names follow Megatron-LM's layout (an ``iter_%07d`` directory per saved step, a ``latest`` marker beside
them); the shard files are safetensors whose keys are pieces, ``kind/name/tp_rank/lo`` (ckpt_save.py).

Crash safety rests on POSIX rename being atomic: a checkpoint is staged in ``iter_N.tmp``, its files
fsynced, metadata.json written last, then the directory is renamed into place and the root fsynced, so an
``iter_N`` directory is complete or absent. ``latest`` is rewritten after that, and older checkpoints
(keep_last) go only once ``latest`` names the new one.
"""
import hashlib
import json
import os
import re
import shutil
import time

import torch

from megagopher.training.ckpt_files import CheckpointCorrupt, fsync_dir, write_text_durably

FORMAT_VERSION = 3  # 3: per-rank safetensors pieces; 2: torch.save files per (tp, pp), TOML-shaped config
METADATA = "metadata.json"
LATEST = "latest"
STAGING, REPLACED = ".tmp", ".replaced"  # suffixes of a checkpoint being written / the one it replaces
_ITER_NAME = re.compile(r"iter_(\d+)")
# What a reader cannot do without; a metadata.json lacking one is damaged.
REQUIRED_FIELDS = ("iteration", "progress", "tensors", "files", "layout", "config")


# -- names ------------------------------------------------------------------------------------------------
def iter_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_file(rank):
    """The trainer's shard file: what global rank ``rank`` alone holds."""
    return f"rank_{rank:05d}.safetensors"


def stage_file(tp_rank, pp_rank):
    """convert_checkpoint's shard file: the whole local state of one (TP rank, pipeline stage)."""
    return f"shard_tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


def piece_key(kind, name, tp_rank, lo):
    """A piece's key in a shard file: elements [lo, ...) of TP rank ``tp_rank``'s flattened ``kind`` of ``name``."""
    return f"{kind}/{name}/{tp_rank}/{lo}"


# -- metadata ---------------------------------------------------------------------------------------------
def open_layout(tp, pp, vpp):
    """The layout of a checkpoint written without a data-parallel job (converted, imported, weights-only):
    dp and world left open (null), so no run takes it for its own layout and restores RNG streams."""
    return {"tp": tp, "pp": pp, "dp": None, "vpp": vpp, "cp": 1, "world": None}


def current_versions():
    import megagopher
    return {"torch": torch.__version__, "megagopher": megagopher.__version__}


def build_metadata(iteration, progress, layout, config, tensors, files, *, has_optimizer, rng_files,
                   optimizer_scalars=None, versions=None, **notes):
    """metadata.json's content, with its digest: ``tensors`` and ``files`` from ``index_files``,
    ``rng_files`` {rank: file} ({} when no RNG state is written: say why in a ``rng`` note), ``config`` the
    run's TOML tables, ``versions`` those of the software that trained the weights (default: these),
    ``notes`` any further fields (source, converted_from, rng)."""
    meta = {"format_version": FORMAT_VERSION, "iteration": int(iteration), "progress": dict(progress),
            "layout": dict(layout), "config": config, "has_optimizer": bool(has_optimizer),
            "optimizer_scalars": optimizer_scalars if has_optimizer else None,
            "versions": versions if versions is not None else current_versions(), "tensors": tensors, "files": files,
            "rng_files": {str(r): f for r, f in rng_files.items()}, **notes, "time": time.time()}
    meta["metadata_sha256"] = metadata_digest(meta)
    return meta


def metadata_digest(meta):
    """sha256 of the metadata's content (without its own digest), in a canonical JSON form: a flipped bit
    that leaves metadata.json valid JSON (a digit of an offset, of the iteration) is caught too."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_metadata(path):
    """metadata.json of the checkpoint directory ``path``; CheckpointCorrupt when missing or damaged in any
    way (invalid UTF-8 or JSON, a required field missing, its digest not matching), so loaders fall back.
    Checkpoints written before every writer recorded the digest (format 2, older conversions) have none."""
    meta_path = os.path.join(path, METADATA)
    if not os.path.lexists(meta_path):
        raise CheckpointCorrupt(f"{path}: no {METADATA} (an incomplete checkpoint)")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
        missing = [k for k in REQUIRED_FIELDS if k not in meta]
    except (OSError, ValueError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointCorrupt(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
    if missing:
        raise CheckpointCorrupt(f"{meta_path}: no {', '.join(missing)} (damaged)")
    if "metadata_sha256" in meta and meta["metadata_sha256"] != metadata_digest(meta):
        raise CheckpointCorrupt(f"{meta_path}: content does not match its digest (damaged)")
    return meta


def index_files(per_file):
    """metadata.json's ``tensors`` and ``files`` from each shard file's (file, record, tp_rank, index):
    ``record`` {"bytes", "sha256"} (ckpt_files.write_shard), ``index`` {name: {**ckpt_save.tensor_meta,
    "pieces": [[kind, lo, hi, key], ...]}} of the pieces in it."""
    tensors, files = {}, {}
    for file, record, tp_rank, index in per_file:
        files[file] = record
        for name, meta in index.items():
            entry = tensors.setdefault(name, {k: meta[k] for k in ("full_shape", "partition_dim", "tp_size", "dtype")})
            entry.setdefault("local_shapes", {})[str(tp_rank)] = meta["local_shape"]
            pieces = entry.setdefault("pieces", {})
            for kind, lo, hi, key in meta["pieces"]:
                pieces.setdefault(kind, {}).setdefault(str(tp_rank), []).append([lo, hi, file, key])
    for entry in tensors.values():
        for by_rank in entry["pieces"].values():
            for pieces in by_rank.values():
                pieces.sort()
    return tensors, files


# -- writing: stage, then publish -------------------------------------------------------------------------
def staging_dir(final_dir):
    return final_dir + STAGING


def start_staging(final_dir):
    """Makes an empty ``iter_N.tmp`` for ``final_dir`` (one left by a run killed mid-save is removed)."""
    tmp_dir = staging_dir(final_dir)
    if os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)
    os.makedirs(tmp_dir)
    return tmp_dir


def publish(final_dir, meta, keep_last=0):
    """The one publish sequence, once every shard file in ``iter_N.tmp`` is written and fsynced:
    metadata.json last (fsynced), the same step's checkpoint (if any) moved aside, the rename into place,
    the root fsynced, ``latest`` rewritten, the replaced one removed, then the checkpoints past
    ``keep_last``. A crash at any point leaves every ``iter_N`` directory complete."""
    root, tmp_dir = os.path.dirname(final_dir) or ".", staging_dir(final_dir)
    write_text_durably(os.path.join(tmp_dir, METADATA), json.dumps(meta, indent=1))
    replaced = final_dir + REPLACED
    if os.path.exists(replaced):
        shutil.rmtree(replaced)
    if os.path.exists(final_dir):  # the same step saved before (a resume past a corrupt checkpoint)
        os.replace(final_dir, replaced)
    os.replace(tmp_dir, final_dir)
    fsync_dir(root)
    try:
        write_latest(root)
    except OSError as e:  # a marker for people and tools: no megagopher reader needs it (find_checkpoints)
        print(f"megagopher: warning: {os.path.join(root, LATEST)} not updated ({e})", flush=True)
    shutil.rmtree(replaced, ignore_errors=True)
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(iter_dir(root, old), ignore_errors=True)
    return final_dir


# -- finding: the one policy for "the newest checkpoint" --------------------------------------------------
def all_checkpoint_dirs(root):
    """Iterations of every iter_N directory in ``root``, complete or not, oldest first (never iter_N.tmp
    or iter_N.replaced)."""
    names = os.listdir(root) if os.path.isdir(root) else []  # not glob: a root may contain [ or *
    return sorted(int(m.group(1)) for m in (_ITER_NAME.fullmatch(n) for n in names) if m)


def list_checkpoints(root):
    """Iterations of the complete checkpoints in ``root`` (those with metadata.json), oldest first."""
    return [i for i in all_checkpoint_dirs(root) if os.path.isfile(os.path.join(iter_dir(root, i), METADATA))]


def find_checkpoints(path):
    """The one policy for "the newest checkpoint", used by training, generate, evaluate, export and convert:
    the checkpoint directories ``path`` names, newest first. ``path`` is one iter_N directory (then just it)
    or a checkpoint root (then every iter_N directory in it). A save renames only complete directories
    into place, so one without a usable metadata.json was damaged: it stays a candidate so that its reader
    says so (naming it) before the loader falls back to the next."""
    if path and os.path.lexists(os.path.join(path, METADATA)):
        return [path]
    if not path or not os.path.isdir(path):
        return []
    return [iter_dir(path, i) for i in reversed(all_checkpoint_dirs(path))]


def write_latest(root):
    """``latest`` := the newest iteration in ``root`` with metadata.json: the first of ``find_checkpoints``
    a loader can open (unless its content is damaged). Temp name, fsync, rename: never half written."""
    complete = list_checkpoints(root)
    if not complete:
        raise FileNotFoundError(f"{root}: no complete checkpoint (iter_N with {METADATA}) to name in {LATEST}")
    write_text_durably(os.path.join(root, LATEST), f"{complete[-1]}\n")
