"""Starting the processes' communication, after checking the run can work (invariant 6).

``validate_run`` needs only the config and the world size (from torchrun's environment), so every rank
reaches the same verdict before any process group exists: a bad layout fails everywhere at once, naming
the key and value, instead of leaving the other ranks waiting in a collective.
"""
import datetime
import os

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.optimizer.batch_rampup import validate_rampup
from megagopher.training.config import ConfigError, model_config, stage_config


def validate_run(cfg, world_size, vocab_size):
    """Checks the parallel layout against the model and every stage's batch; returns dp."""
    p, m = cfg["parallel"], cfg["model"]
    dp = None
    for index, stage in enumerate(cfg["stages"]):
        scfg = stage_config(cfg, index)
        t = scfg["training"]
        layers = [m["num_layers"]] + ([stage["grow"]["num_layers"]] if stage.get("grow") else [])
        for num_layers in layers:
            try:
                dp = ps.validate_layout(
                    world_size, tp=p["tp"], pp=p["pp"], cp=p["cp"], vpp=p["vpp"], dp=p["dp"] or None,
                    # parallel.pp_layers places the configured layers; a grown model is split evenly.
                    num_layers=None if p["pp_layers"] and num_layers == m["num_layers"] else num_layers,
                    num_attention_heads=m["num_attention_heads"],
                    num_query_groups=m["num_query_groups"] or m["num_attention_heads"],
                    micro_batch_size=t["micro_batch_size"], global_batch_size=t["global_batch_size"],
                    seq_length=scfg["model"]["seq_length"], sequence_parallel=p["sp"])
            except ps.ParallelConfigError as e:
                where = f" (stage {stage['name']!r})" if len(cfg["stages"]) > 1 else ""
                raise ConfigError(f"{e}{where}") from None
        if p["pp_layers"]:
            if len(p["pp_layers"]) not in (p["pp"], p["pp"] * p["vpp"]) or sum(p["pp_layers"]) != m["num_layers"] \
                    or min(p["pp_layers"]) < 1:
                raise ConfigError(f"parallel.pp_layers = {p['pp_layers']} must have parallel.pp = {p['pp']} (or pp * "
                                  f"vpp = {p['pp'] * p['vpp']}) positive entries summing to model.num_layers = "
                                  f"{m['num_layers']}")
        try:
            validate_rampup(t["global_batch_size"], t["rampup_batch_size"], t["micro_batch_size"], dp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        sizes = {t["global_batch_size"]}
        if t["rampup_batch_size"]:
            start, increment, _ = t["rampup_batch_size"]
            sizes |= set(range(start, t["global_batch_size"], increment))
        from megagopher.pipeline_parallel.schedules import validate_schedule
        for size in sorted(sizes):
            try:
                validate_schedule(p["schedule"], p["pp"], p["vpp"], size // (t["micro_batch_size"] * dp))
            except ValueError as e:
                raise ConfigError(f"{e} (global batch size {size}, training.micro_batch_size = "
                                  f"{t['micro_batch_size']}, dp = {dp})") from None
        if scfg["model"]["seq_length"] > model_config(cfg).max_position_embeddings and m["position_embedding"] == "learned":
            raise ConfigError(f"model.seq_length = {scfg['model']['seq_length']} exceeds "
                              f"model.max_position_embeddings = {m['max_position_embeddings']}")
    want_cuda = cfg["training"]["device"] == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but no CUDA device is available; valid here: 'cpu', 'auto'")
    if vocab_size < 1:
        raise ConfigError(f"vocabulary size {vocab_size} must be >= 1")
    return dp


def pick_device(cfg):
    want = cfg["training"]["device"]
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def setup_distributed(cfg):
    """Initialises the default process group (gloo on CPU, NCCL on CUDA); returns this rank's device.
    Without torchrun's environment it starts a one-process group, so ``python -m megagopher.train`` works."""
    device = pick_device(cfg)
    backend = cfg["parallel"]["backend"]
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg["parallel"]["timeout_s"])
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device
