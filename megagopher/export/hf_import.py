"""Import a Hugging Face ``transformers`` model directory as a megagopher checkpoint (tools/import_hf.py).

    OUT/iter_0000000/...   a format-3 checkpoint of iteration 0 without optimizer state (checkpoint.py's
    OUT/latest             save_weights_only): it loads under any layout, for training (a run starts its
                           optimizer fresh: Megatron's --finetune) and for megagopher.generate
    OUT/config.toml        the matching [model], beside checkpoint.initial_load = OUT/iter_0000000 (a run
                           starts from these weights whatever its checkpoint.dir, then resumes from its own
                           saves), checkpoint.dir = OUT, checkpoint.load = "auto" and data.tokenizer_dir;
                           over a base config's other sections when one is given
    OUT/tokenizer/         the model's tokenizer, whatever its kind (tokenizer.json, a SentencePiece or
                           tiktoken tokenizer.model, vocab.json + merges.txt), with tokenizer_config.json,
                           special_tokens_map.json and generation_config.json when present (hf_tokenizer.py);
                           config.toml's data.tokenizer_dir and data.tokenizer_kind name it

The architectures are hf_arch.FORMATS (Mixtral's experts in either the on-disk per-expert names or
transformers 5's fused ones); their config.json is read by hf_config.py and their tensors mapped
by hf_arch.py's rules (the export's, run backwards). Weights come from model.safetensors or
pytorch_model.bin, or the shards a ``*.index.json`` names. Every tensor of theirs must be used: one we do
not know (a feature we lack) is an HFImportError, as is a config key we cannot compute exactly.
"""
import dataclasses
import json
import os
import tomllib

import torch

from megagopher.config.loading import from_tables, to_toml
from megagopher.export.hf_arch import MappingError, missing_bias_rows, unfuse_mixtral
from megagopher.export.hf_rules import rules
from megagopher.export.hf_arch_recent import MTP_FILE, unfuse_qwen_experts
from megagopher.export.hf_config import HFImportError, model_config
from megagopher.export.hf_tokenizer import import_tokenizer
from megagopher.training.ckpt_files import write_text_durably

# The [model] keys of experts a base config may not change (the weights' function depends on them).
MOE_KEYS = ("num_experts", "moe_top_k", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_experts", "moe_router",
            "moe_capacity_factor", "moe_n_group", "moe_topk_group", "moe_routed_scaling_factor", "moe_norm_topk_prob",
            "first_k_dense")
# The [model] keys of the 2024-2026 attention a base config may not change either.
ATTENTION_KEYS = ("kv_channels", "rope_scaling", "rope_theta", "qk_norm", "qkv_bias", "window_size", "window_pattern",
                  "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mtp_num_layers")
# Their tensors that are not weights: causal-mask buffers and rotary tables older versions saved.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", ".attn.causal_mask",
                    ".attn.embed_positions")
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def read_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir!r} has no config.json: not a transformers model directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f), path


def _load_file(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(model_dir):
    """{name: tensor} of the directory's weights: one file, or the shards its index names."""
    for single, index in WEIGHT_FILES:
        if os.path.isfile(os.path.join(model_dir, single)):
            return _load_file(os.path.join(model_dir, single))
        if os.path.isfile(os.path.join(model_dir, index)):
            with open(os.path.join(model_dir, index), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(_load_file(os.path.join(model_dir, shard)))
            return out
    raise FileNotFoundError(f"{model_dir!r} has no weights: expected one of "
                            f"{', '.join(name for pair in WEIGHT_FILES for name in pair)}")


def _strip_tied_head(fmt, cfg, theirs):
    """A tied model may still save its head (the same values as the embedding): dropped after checking."""
    heads = {"llama": ("lm_head.weight", "model.embed_tokens.weight"), "gpt_neox": ("embed_out.weight",
             "gpt_neox.embed_in.weight"), "gpt2": ("lm_head.weight", "transformer.wte.weight"),
             "codegen": ("lm_head.weight", "transformer.wte.weight"),
             "mixtral": ("lm_head.weight", "model.embed_tokens.weight")}
    head, embedding = heads.get(fmt, ("lm_head.weight", "model.embed_tokens.weight"))
    if cfg.tie_embeddings and head in theirs:
        if not torch.equal(theirs[head], theirs[embedding]):
            raise HFImportError(f"tie_word_embeddings = true but {head} differs from {embedding}")
        del theirs[head]


def with_mtp(model_dir, fmt, cfg, theirs):
    """(cfg, weights) with DeepSeek-V3's MTP modules: those of model_dir/mtp.safetensors (our export, hf.py) or
    the main weights' layers num_hidden_layers.. (DeepSeek's checkpoints); model.mtp_num_layers counts the
    modules present (config.json's num_nextn_predict_layers may name modules a checkpoint does not carry)."""
    if fmt != "deepseek_v3":
        return cfg, theirs
    path = os.path.join(model_dir, MTP_FILE)
    if os.path.isfile(path):
        theirs = {**theirs, **_load_file(path)}
    n = 0
    while f"model.layers.{cfg.num_layers + n}.eh_proj.weight" in theirs:
        n += 1
    return dataclasses.replace(cfg, mtp_num_layers=n), theirs


def layout_options(fmt, hf):
    """The format's layout switches config.json holds (hf_arch.rules' options): DeepSeek's rope_interleave."""
    return {"rope_interleave": bool(hf.get("rope_interleave", True))} if fmt == "deepseek_v3" else {}


def our_tensors(fmt, cfg, theirs, **options):
    """Our {name: fp32-or-saved-dtype tensor} of every model tensor, from their state dict ``theirs``;
    ``options``: layout_options."""
    theirs = {k: v for k, v in theirs.items() if not k.endswith(IGNORED_SUFFIXES)}
    if fmt == "mixtral":  # transformers 5's in-memory expert names, as the on-disk ones the rules read
        theirs = unfuse_mixtral(theirs)
    elif fmt in ("qwen3_moe", "deepseek_v3"):
        theirs = unfuse_qwen_experts(theirs)
    _strip_tied_head(fmt, cfg, theirs)
    shapes = {name: t.shape for name, t in theirs.items()}
    dtype = next(t.dtype for n, t in theirs.items() if not n.endswith("e_score_correction_bias"))
    used, out = set(), {}

    def get(name):
        if name in theirs:
            used.add(name)
            return theirs[name]
        rows = missing_bias_rows(name, shapes)
        if rows is None:
            raise HFImportError(f"the weights have no tensor {name!r} (a {fmt} model of this config has one)")
        return torch.zeros(rows, dtype=dtype)

    for rule in rules(fmt, cfg, **options):
        try:
            ours = rule.to_ours(*(get(name) for name in rule.theirs))
        except MappingError as e:
            raise HFImportError(str(e)) from None
        # The selection bias stays fp32 (model/moe_router.py), as transformers keeps e_score_correction_bias.
        out.update({name: t if name.endswith(".expert_bias") else t.to(dtype) for name, t in zip(rule.ours, ours)})
    unused = sorted(set(theirs) - used)
    if unused:
        raise HFImportError(f"{len(unused)} tensors have no place in megagopher's {fmt} model (a feature it "
                            f"lacks): {', '.join(unused[:5])}")
    return out


def build_model(cfg, tensors):
    """A tp-1 GPTModel holding ``tensors`` (shapes checked against the model's)."""
    from megagopher.model import GPTModel
    model = GPTModel(cfg)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise HFImportError(f"no weights for {', '.join(missing[:5])}")
    # Persistent buffers are model state too (a sigmoid router's selection bias, fp32 whatever the weights).
    buffers = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in params and n in tensors}
    with torch.no_grad():
        for name, t in buffers.items():
            t.copy_(tensors[name])
        for name, p in params.items():
            full = tensors[name]
            want = tuple(p.full_shape) if hasattr(p, "full_shape") else tuple(p.shape)
            if tuple(full.shape) != want:
                raise HFImportError(f"{name}: their tensor has shape {tuple(full.shape)}, the model {want}")
            p.data = torch.zeros(p.shape, dtype=full.dtype)  # the vocabulary padding rows stay zero
            p.data[tuple(slice(0, n) for n in full.shape)] = full
    return model


def run_tables(cfg, output, tokenizer, raw, base_config=None):
    """The TOML tables of OUT/config.toml: the base config's (``raw``, read from ``base_config``; or none)
    with the imported [model] and ``tokenizer`` ((directory, kind), or (None, None)); the base's [model]
    may set only keys that do not change the weights' function (dropout, seq_length...)."""
    from megagopher.training.checkpoint import iter_dir
    from megagopher.training.ckpt_load import ARCHITECTURE_KEYS
    model = cfg.to_dict()
    for key, value in raw.get("model", {}).items():
        fixed = ARCHITECTURE_KEYS + MOE_KEYS + ATTENTION_KEYS + ("num_layers", "max_position_embeddings")
        if key in fixed and value != model.get(key):
            raise HFImportError(f"{base_config}: model.{key} = {value!r} is not the imported model's "
                                f"{model.get(key)!r}; leave the architecture to the import")
        model[key] = value
    tables = {**raw, "model": model}
    checkpoint = tables.setdefault("checkpoint", {})
    checkpoint.setdefault("dir", os.path.abspath(output))
    checkpoint.setdefault("load", "auto")
    # The weights the run starts from while its checkpoint.dir (perhaps the user's own) has none of its saves.
    checkpoint["initial_load"] = iter_dir(os.path.abspath(output), 0)
    directory, kind = tokenizer
    if directory:   # the base's own tokenizer, if it names one, wins
        data = tables.setdefault("data", {})
        if "tokenizer_dir" not in data:
            data.update(tokenizer_dir=directory, tokenizer_kind=kind)
    return tables


def _read_toml(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def import_hf(model_dir, output, base_config=None, tokenizer=True, tokenizer_kind=None):
    """Writes the checkpoint, config.toml and tokenizer of ``model_dir`` into ``output``; returns
    (format, GPTConfig, iteration directory). ``tokenizer_kind`` names the tokenizer to take when the
    directory holds several (default: load_tokenizer's detection)."""
    from megagopher.training.checkpoint import list_checkpoints, save_weights_only
    hf, where = read_config(model_dir)
    fmt, cfg = model_config(hf, where)
    if list_checkpoints(output):
        raise ValueError(f"--output {output} already holds checkpoints; import into a new directory")
    cfg, theirs = with_mtp(model_dir, fmt, cfg, read_weights(model_dir))
    tensors = our_tensors(fmt, cfg, theirs, **layout_options(fmt, hf))
    del theirs
    model = build_model(cfg, tensors)
    del tensors
    base = _read_toml(base_config) if base_config else {}
    try:   # read and checked where it lies before a file is written
        carried = import_tokenizer(model_dir, output, cfg.vocab_size, hf, tokenizer_kind) if tokenizer else (None, None)
    except ValueError as e:
        raise HFImportError(str(e)) from None
    os.makedirs(output, exist_ok=True)
    run = from_tables(run_tables(cfg, output, carried, base, base_config))
    progress = {"iteration": 0, "consumed_tokens": 0, "stage_index": 0, "stage_iteration": 0, "stage_samples": 0,
                "num_layers": cfg.num_layers, "skipped_total": 0}
    source = {"model": os.path.abspath(model_dir), "architecture": hf["architectures"][0]}
    path = save_weights_only(output, 0, model, progress, run, note=source)
    header = (f"# Imported by tools/import_hf.py from {os.path.abspath(model_dir)} ({hf['architectures'][0]}).\n"
              "# python -m megagopher.train --config THIS_FILE starts from its weights (checkpoint.initial_load)\n"
              "# with a fresh optimizer, then resumes from the run's own saves in checkpoint.dir.\n")
    # Without [[stages]] of the base's, none are written: a file's single stage runs training.train_iters.
    written = run if "stages" in base else dataclasses.replace(run, stages=[])
    write_text_durably(os.path.join(output, "config.toml"), header + to_toml(written))
    return fmt, cfg, path
