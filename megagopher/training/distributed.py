"""Starting the processes' communication. The config has been validated before (config/validate.py,
invariant 6), so every rank arrives here with a config that works for this world size."""
import datetime
import os

import torch
import torch.distributed as dist

from megagopher.common import pick_device


def setup_distributed(cfg):
    """Initialises the default process group (gloo on CPU, NCCL on CUDA); returns this rank's device.
    Without torchrun's environment it starts a one-process group, so ``python -m megagopher.train`` works."""
    device = pick_device(cfg.training.device)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device
