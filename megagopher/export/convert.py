"""Offline resharding: a checkpoint rewritten for another (tp, pp, vpp) layout, or as one file of full
tensors, without launching processes.

Checkpoint tensors are keyed by layout-independent names and recorded with their unpadded full shape and
split dimension (training/checkpoint.py), so resharding is one rule per tensor: read it whole
(CheckpointReader drops the vocabulary padding), re-pad the vocabulary for the new TP size (Megatron's
multiple of make_vocab_size_divisible_by * tp), and cut it into tp equal slices along its split dimension.
Pipeline stage p's file holds the parameters of the model chunks the trainer builds for it
(megagopher/pipeline_parallel/stages.py: layers split evenly or by parallel.pp_layers, the embedding on the
first virtual stage, the final norm and output head on the last, and with tied embeddings on a pipeline
the last stage's copy of the word embeddings, saved under the embedding's name), in the trainer's order.

The output is the trainer's format, written through the same module (training/ckpt_format.py: names,
metadata schema with its digest, publish sequence): ``OUT/iter_NNNNNNN/shard_tpXX_ppYY.safetensors``
holding each (tp, pp) rank's whole local weights and optimizer state (resharded by the same rule) as
pieces, ``metadata.json`` (the piece index, size and sha256 per file) written last, then ``OUT/latest``.
No RNG state is written (random streams belong to ranks, which a new layout does not have); the metadata
says so, and its layout leaves dp and world open (null), so a resuming trainer reseeds.
"""
import os

import torch

from megagopher.common import dtype_name
from megagopher.config.validate import validate_layout
from megagopher.export.loading import model_config_of, open_checkpoint, run_config
from megagopher.tensor_parallel.layers import pad_vocab_size
from megagopher.training import checkpoint as ckpt
from megagopher.training import ckpt_format as fmt
from megagopher.training.ckpt_files import write_shard
from megagopher.training.ckpt_save import OPTIMIZER_KINDS

VOCAB_PARALLEL = ("embedding.word.weight", "output_layer", "output_bias")


def stage_names(names, cfg, pp, vpp=1, pp_layers=None):
    """For each pipeline rank, the parameter names its file holds, in the order the trainer saves them.
    The chunks are built as stages.build_model_chunks builds them, on the meta device (no memory), and
    named as save_checkpoint names them; ``names`` (the checkpoint's) must be exactly the names they hold."""
    from megagopher.model import GPTModel
    from megagopher.pipeline_parallel.stages import stage_layer_ranges
    ranges = stage_layer_ranges(cfg.num_layers, pp, vpp, pp_layers)
    out = [[] for _ in range(pp)]
    with torch.device("meta"):
        for v, layer_range in enumerate(ranges):  # virtual stage v lives on pipeline rank v % pp
            chunk = GPTModel(cfg, pre_process=v == 0, post_process=v == pp * vpp - 1, layer_range=layer_range)
            out[v % pp] += [name for name, _ in ckpt.named_parameters([chunk])]
    held = {name for stage in out for name in stage}
    if held != set(names):
        raise ValueError(f"the checkpoint's tensors do not match its model config: missing "
                         f"{sorted(held - set(names))[:5]}, unexpected {sorted(set(names) - held)[:5]}")
    return out


def shard(full, name, entry, cfg, tp, tp_rank):
    """``tp_rank``'s slice of the full tensor ``name`` under tensor parallelism ``tp``."""
    dim = entry["partition_dim"]
    if dim is None:
        return full
    size = full.shape[dim]
    padded = pad_vocab_size(size, tp, cfg.make_vocab_size_divisible_by) if name in VOCAB_PARALLEL else size
    if padded % tp:
        raise ValueError(f"tensor {name} has {size} rows along its split dimension {dim}, not divisible by tp {tp}")
    if padded > size:
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - size
        full = torch.cat([full, torch.zeros(pad_shape, dtype=full.dtype)], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank].clone()


def _check_layout(cfg, tp, pp, vpp):
    validate_layout(tp * pp, tp=tp, pp=pp, vpp=vpp, num_attention_heads=cfg.num_attention_heads,
                    num_query_groups=cfg.num_query_groups)


def _metadata(reader, tp, pp, vpp, pp_layers, tensors, files, with_optimizer):
    """metadata.json for the new layout (ckpt_format.build_metadata); dp and world are left open (null)."""
    config = dict(reader.meta["config"])
    config["parallel"] = {**config.get("parallel", {}), "tp": tp, "pp": pp, "vpp": vpp, "pp_layers": pp_layers or []}
    return fmt.build_metadata(
        reader.meta["iteration"], reader.meta["progress"], fmt.open_layout(tp, pp, vpp), config, tensors, files,
        has_optimizer=with_optimizer, optimizer_scalars=reader.meta.get("optimizer_scalars"), rng_files={},
        versions=reader.meta.get("versions") or {},  # the software that trained the weights
        rng="dropped: convert_checkpoint writes no RNG state (a new layout has new ranks)",
        converted_from={"path": os.path.abspath(reader.path), "layout": reader.meta.get("layout")})


def convert(checkpoint, output, tp, pp, vpp=1, pp_layers=None, optimizer=True):
    """Writes ``checkpoint`` for layout (tp, pp, vpp) as a checkpoint root ``output``; returns the new
    iteration directory."""
    reader = open_checkpoint(checkpoint)
    cfg = model_config_of(reader)
    run = run_config(reader)
    for key, value in (("tp", tp), ("pp", pp), ("vpp", vpp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{key} {value!r} must be a positive integer")
    _check_layout(cfg, tp, pp, vpp)
    if pp_layers is None:  # the run's own split when it fits the new layout
        saved = run.parallel.pp_layers or None
        pp_layers = saved if saved and len(saved) in (pp, pp * vpp) and sum(saved) == cfg.num_layers else None
    names = reader.names()
    per_stage = stage_names(names, cfg, pp, vpp, pp_layers)
    with_optimizer = optimizer and reader.meta.get("has_optimizer", False)

    iteration = int(reader.meta["iteration"])
    final = ckpt.iter_dir(output, iteration)
    if os.path.realpath(final) == os.path.realpath(reader.path):
        raise ValueError(f"--output {output} would overwrite the checkpoint being converted ({reader.path}); "
                         "write to another directory")
    tmp_dir = fmt.start_staging(final)
    per_file, written = [], set()
    for pp_rank, stage in enumerate(per_stage):
        for tp_rank in range(tp):
            file = fmt.stage_file(tp_rank, pp_rank)
            pieces, index = _stage_pieces(reader, stage, cfg, tp, tp_rank, with_optimizer, file, written)
            per_file.append((file, write_shard(pieces, os.path.join(tmp_dir, file)), tp_rank, index))
            del pieces
    tensors, files = fmt.index_files(per_file)
    return fmt.publish(final, _metadata(reader, tp, pp, vpp, pp_layers, tensors, files, with_optimizer))


def _stage_pieces(reader, stage, cfg, tp, tp_rank, with_optimizer, file, written):
    """(tensors, index) of one (tp_rank, pipeline stage) file, as ckpt_save.plan_pieces gives a rank's:
    {key: whole local tensor, flat} and {name: {**tensor_meta, "pieces": [[kind, lo, hi, key], ...]}}.
    ``written`` holds the (name, TP rank) pairs earlier files hold (the tied embedding's first stage)."""
    kinds = ("param",) + (OPTIMIZER_KINDS if with_optimizer else ())
    out, index = {}, {}
    for name in dict.fromkeys(stage):
        entry = reader.entry(name)
        if (entry["partition_dim"] is None and tp_rank) or (name, tp_rank) in written:
            continue  # replicated (TP rank 0 holds the one copy) or the last stage's tied-embedding copy
        written.add((name, tp_rank))
        meta = index[name] = {"full_shape": entry["full_shape"], "partition_dim": entry["partition_dim"],
                              "tp_size": tp, "dtype": _dtype_name(reader, name), "pieces": []}
        for kind in kinds:
            if kind == "master" and not reader.has(name, "master"):
                continue  # fp32: the weights are the master
            local = shard(reader.full_tensor(name, kind), name, entry, cfg, tp, tp_rank).contiguous()
            meta["local_shape"] = list(local.shape)
            key = fmt.piece_key(kind, name, tp_rank, 0)
            out[key] = local.reshape(-1)
            meta["pieces"].append([kind, 0, local.numel(), key])
    return out, index


def _dtype_name(reader, name):
    return dtype_name(reader.full_tensor(name).dtype) if reader.format < 3 else reader.entry(name)["dtype"]


def to_full(checkpoint, path):
    """Writes {name: full unpadded tensor} of every model tensor to ``path`` (torch.save); returns the
    number of tensors."""
    reader = open_checkpoint(checkpoint)
    full = {name: reader.full_tensor(name).clone() for name in reader.names()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    torch.save(full, path + ".tmp")
    os.replace(path + ".tmp", path)
    return len(full)
