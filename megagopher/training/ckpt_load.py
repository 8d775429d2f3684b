"""Loading a checkpoint into this rank's model chunks and optimizer shards under the current layout, and
checking the files it needs (and that its model is the run's) before the trainer commits to it.

The model a checkpoint holds is rebuilt from its metadata alone (``saved_model_config``): generation,
evaluation and export read it the same way (export/loading.py)."""
import dataclasses
import socket

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.config import ConfigError, from_tables
from megagopher.optimizer.optimizer import STATE_KEYS
from megagopher.tensor_parallel.layers import take_shard
from megagopher.training.ckpt_files import CheckpointCorrupt
from megagopher.training.ckpt_save import expert_offset, named_parameters, saved_local_shape


def _same_cut(reader, name, p):
    """True when this rank's local tensor of ``p`` is (a block of experts of) a saved TP rank's: then it is
    read as it is."""
    entry, shape = reader.entry(name), saved_local_shape(p)
    if entry["partition_dim"] is None:
        return shape == reader.local_shape(name, 0)
    return entry["tp_size"] == ps.get_tp_size() and shape == reader.local_shape(name, ps.get_tp_rank())


def read_slice(reader, name, kind, p, lo, out):
    """Fills the flat ``out`` with elements [lo, lo + out.numel()) of this rank's local ``kind`` tensor of
    ``p`` (saved as ``name``). Under the saved cut it reads just those bytes; under another TP size it
    joins the one tensor, re-pads the vocabulary and cuts it for this layout."""
    if _same_cut(reader, name, p):
        tp_rank = 0 if reader.entry(name)["partition_dim"] is None else ps.get_tp_rank()
        reader.read_local(name, kind, tp_rank, out, lo + expert_offset(p))
        return
    local = take_shard(p, reader.full_tensor(name, kind), ps.get_tp_rank(), ps.get_tp_size())
    if local.shape != p.shape:
        raise CheckpointCorrupt(f"{reader.path}: {name} has shape {tuple(local.shape)} under this layout, the "
                                f"model expects {tuple(p.shape)}")
    out.copy_(local.reshape(-1)[lo:lo + out.numel()])


@torch.no_grad()
def load_weights(reader, chunks, name_map=None):
    """Copies every parameter of this rank's chunks from the checkpoint (any saved layout). ``name_map``
    maps a parameter's name to the saved name it starts from (progressive stacking)."""
    saved = set(reader.names())
    for name, p in named_parameters(chunks):
        source = name_map(name) if name_map else name
        if source not in saved and not isinstance(p, torch.nn.Parameter):
            continue  # a buffer newer than the checkpoint (a sigmoid router's bias before it existed: zero)
        reader.entry(source)  # a KeyError naming the tensor when the model does not match the checkpoint
        flat = p.data.view(-1)
        read_slice(reader, source, "param", p, 0, flat)


@torch.no_grad()
def load_optimizer(reader, chunks, optimizer):
    """Fills this rank's optimizer shards (whatever dp and ZeRO-1 setting saved them) and its scalars."""
    names = {id(p): n for n, p in named_parameters(chunks)}
    for s in optimizer.shards:
        for p in s.buffer.params:
            p_lo, p_hi = s.buffer.param_range[id(p)]
            lo, hi = max(p_lo, s.start), min(p_hi, s.end)
            if lo >= hi:
                continue
            name = names.get(id(p))
            if name is None:
                raise KeyError(f"optimizer shard holds a parameter the model chunks do not name ({s.buffer.name(p)})")
            for key in STATE_KEYS:
                if key == "master" and not s.has_master_copy and not reader.has(name, "master"):
                    continue  # fp32 on both sides: the weights, already loaded, are the master
                read_slice(reader, name, key, p, lo - p_lo, getattr(s, key)[lo - s.start:hi - s.start])
    optimizer.load_scalar_state(reader.meta.get("optimizer_scalars"))


def files_needed(reader, chunks, with_optimizer, rng_rank=None):
    """The files of the checkpoint this rank will read: its pieces of weights (and optimizer state),
    and its RNG file when ``rng_rank`` is given."""
    kinds = ("param",) + (STATE_KEYS if with_optimizer else ())
    files, saved = set(), set(reader.names())
    for name, p in named_parameters(chunks):
        if name not in saved and not isinstance(p, torch.nn.Parameter):
            continue  # a buffer the checkpoint predates (load_weights keeps its initial value)
        if _same_cut(reader, name, p):
            ranks = [0] if reader.entry(name)["partition_dim"] is None else [ps.get_tp_rank()]
        else:
            ranks = reader.saved_ranks(name)
        for kind in kinds if isinstance(p, torch.nn.Parameter) else ("param",):  # a buffer has no optimizer state
            if kind == "master" and not reader.has(name, "master"):
                continue
            files |= reader.files_for(name, kind, ranks)
    if rng_rank is not None and reader.rng_file(rng_rank):
        files.add(reader.rng_file(rng_rank))
    return files


def verify_on_node(reader, files):
    """Checks size and checksum of every file some rank on this node reads, each once per node: the
    lowest rank of the node that needs a file checks it. Collective (every rank calls it, ``reader``
    None and ``files`` empty when it could not open the checkpoint). Returns this rank's error or None."""
    world, rank = dist.get_world_size(), dist.get_rank()
    needs = [None] * world
    dist.all_gather_object(needs, (socket.gethostname(), sorted(files)))
    host = needs[rank][0]
    for file in sorted(files):
        checker = min(r for r, (h, fs) in enumerate(needs) if h == host and file in fs)
        if checker != rank:
            continue
        try:
            reader.verify(file)
        except CheckpointCorrupt as e:
            return e
    return None


# -- the model a checkpoint holds ---------------------------------------------------------------------------
# The [model] keys that decide the function the weights compute; the others (seq_length, rope_theta, which a
# long-context stage changes, dropout, init, the attention kernel...) are the run's to choose.
ARCHITECTURE_KEYS = ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
                     "normalization", "activation", "position_embedding", "rotary_percent", "tie_embeddings",
                     "output_bias", "parallel_residual", "bias", "norm_epsilon")


class ModelMismatch(ConfigError):
    """The run's [model] is not the model of the checkpoint it is told to load."""


def saved_run_config(reader):
    """The run's JobConfig, as saved with the checkpoint (format 2: TOML-shaped tables; format 1 stored
    each stage's overrides as [section, key, value] triples)."""
    saved = reader.meta["config"]
    if reader.meta.get("format_version", 1) < 2:
        saved = dict(saved, stages=[_stage_table_v1(st) for st in saved.get("stages", [])])
    return from_tables(saved)


def _stage_table_v1(stage):
    table = {k: v for k, v in stage.items() if k != "overrides"}
    for section, key, value in stage.get("overrides", []):
        table.setdefault(section, {})[key] = value
    return table


def saved_vocab_size(reader):
    """The real (unpadded) vocabulary of the checkpoint's model."""
    return int(reader.meta["tensors"]["embedding.word.weight"]["full_shape"][0])


def saved_model_config(reader):
    """The GPTConfig of the weights in ``reader``: the run's [model] at the depth reached (growth) and with
    the context of the stage it was saved in (a long-context stage's seq_length and rope_theta)."""
    cfg = saved_run_config(reader)
    progress = reader.meta.get("progress") or {}
    stage = min(progress.get("stage_index", 0), len(cfg.stages) - 1)
    context = {k: v for (section, k), v in cfg.stages[stage].overrides.items() if section == "model"}
    model = cfg.model_at(num_layers=progress.get("num_layers", cfg.model.num_layers),
                         vocab_size=saved_vocab_size(reader),
                         num_experts=progress.get("num_experts", cfg.model.num_experts))  # upcycling
    return dataclasses.replace(model, **context)


def check_model_matches(reader, cfg, vocab_size):
    """Raises ModelMismatch naming the first [model] key where the run ``cfg`` (whose vocabulary is
    ``vocab_size``: its tokenizer's) differs from the checkpoint's model; the depth may be any the run
    reaches (its own or a stage's grow.num_layers). The same verdict on every rank: metadata and config."""
    saved = saved_model_config(reader)
    run = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    for key in ARCHITECTURE_KEYS:
        ours, theirs = getattr(run, key), getattr(saved, key)
        if key == "rotary_percent" and saved.position_embedding != "rope":
            continue
        if ours != theirs:
            hint = " (the run's vocabulary is its tokenizer's, data.tokenizer_dir)" if key == "vocab_size" else ""
            raise ModelMismatch(f"model.{key} = {ours!r} but checkpoint {reader.path} holds a model with "
                                f"{key} = {theirs!r}{hint}: set model.{key} = {theirs!r} (an imported model's "
                                "[model] is in the config.toml beside it)")
    if run.position_embedding == "learned" and run.max_position_embeddings != saved.max_position_embeddings:
        raise ModelMismatch(f"model.max_position_embeddings = {run.max_position_embeddings} but checkpoint "
                            f"{reader.path} has a learned position table of {saved.max_position_embeddings}")
    _check_experts_match(reader, cfg, saved)
    depths = {cfg.model.num_layers} | {st.grow["num_layers"] for st in cfg.stages if "num_layers" in st.grow}
    if saved.num_layers not in depths:
        raise ModelMismatch(f"model.num_layers = {cfg.model.num_layers} but checkpoint {reader.path} holds "
                            f"{saved.num_layers} layers (nor does any stage grow to it)")


MOE_KEYS = ("moe_top_k", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_experts", "moe_router", "moe_n_group",
            "moe_topk_group", "moe_routed_scaling_factor", "moe_norm_topk_prob", "first_k_dense")


def _check_experts_match(reader, cfg, saved):
    """The experts of the checkpoint's model: as many as the run has at some stage (its own or a
    grow.num_experts), and, when it has any, the same MoE architecture keys."""
    counts = {cfg.model.num_experts} | {st.grow["num_experts"] for st in cfg.stages if "num_experts" in st.grow}
    if saved.num_experts not in counts:
        raise ModelMismatch(f"model.num_experts = {cfg.model.num_experts} but checkpoint {reader.path} holds a "
                            f"model with {saved.num_experts} experts per MoE layer (nor does any stage upcycle to it)")
    if not saved.num_experts:
        return
    for key in MOE_KEYS:
        ours, theirs = getattr(cfg.model, key), getattr(saved, key)
        if ours != theirs:
            raise ModelMismatch(f"model.{key} = {ours!r} but checkpoint {reader.path} holds a MoE model with "
                                f"{key} = {theirs!r}: set model.{key} = {theirs!r}")
