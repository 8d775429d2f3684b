"""Starting and ending the processes' communication. The config has been validated before
(config/validate.py, invariant 6), so every rank arrives here with a config that works for this world size.

A multi-rank run that this module starts also gets a watchdog (training/watchdog.py): a lost rank, launcher
or store ends every other rank with one line naming what was lost, within seconds when a process is gone
and within the watchdog's threshold (parallel.timeout_s, kept within 10 to 60 s) when it hangs. The run ends through
``end_distributed``, which stops the watchdog before any process group is destroyed, so it never fires
during a clean exit."""
import datetime
import os
import sys

import torch
import torch.distributed as dist

from megagopher.common import pick_device
from megagopher.errors import EXIT_PEER_LOST
from megagopher.training import watchdog as wd

_watchdog = None  # this process's watchdog once started; it stays after a clean stop (exit_if_peer_lost)


def setup_distributed(cfg):
    """Initialises the default process group (gloo on CPU, NCCL on CUDA); returns this rank's device.
    Without torchrun's environment it starts a one-process group, so ``python -m megagopher.train`` works.
    A group that the caller initialised is left to the caller, watchdog included."""
    global _watchdog
    # One hardware queue per device, so a tensor-parallel layer's asynchronous gradient all-reduce is issued
    # before the weight-gradient GEMM it overlaps (tensor_parallel/layers.py); read when CUDA starts.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    device = pick_device(cfg.training.device, "training.device")
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=round_store(rank, world_size, timeout), rank=rank,
                                    world_size=world_size, timeout=timeout)
            if world_size > 1:
                _watchdog = wd.start_from_env(rank, world_size, wd.threshold_for(cfg.parallel.timeout_s),
                                              finished=lambda: not dist.is_initialized(), prefix=round_prefix())
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def round_prefix():
    """The key prefix of this round of the job: torchrun's run id and restart count (a job started by hand
    is round 0 of run "none"). A restart (``--max-restarts``: a worker failed, or the node agent restarted
    the group) starts every worker again with the count one higher."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"megagopher/{run}/round_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def round_store(rank, world_size, timeout):
    """The store the default process group meets on, its keys kept apart per round (``round_prefix``).

    Why: torchrun's agent hosts one TCPStore for the whole job (TORCHELASTIC_USE_AGENT_STORE=True) and
    keeps it across restarts, and torch's env:// rendezvous puts no round in its keys. The restarted
    workers then read the first round's addresses (gloo's full-mesh addresses, NCCL's unique id) and
    fail in init_process_group ("Gloo connectFullMesh failed ... Connection refused"). Without the agent's
    store, rank 0 hosts a fresh store, as env:// does; the prefix changes nothing there."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(host, port, world_size, is_master=not agent_store and rank == 0, timeout=timeout,
                          multi_tenant=True)
    return dist.PrefixStore(round_prefix(), store)


def stop_watchdog():
    """Ends this rank's watch cleanly (its watcher will not call it lost); no collective. For a run that
    every rank ends at the same point without communicating again (an input error they all raise).
    The watchdog object stays, so a collective that fails afterwards still ends with one line."""
    if _watchdog is not None:
        _watchdog.stop()


def end_distributed(close):
    """The clean end of a run on every rank: a barrier while the watchdog still watches (a rank lost now
    is still named), then the watchdog stops, then ``close`` (Trainer.close) destroys the groups."""
    if _watchdog is not None and _watchdog.running:
        dist.barrier()
    stop_watchdog()
    close()


def exit_if_peer_lost(error):
    """Called with an exception that reached the entry point. When it is a failed collective of a run
    this module watches, a peer or the launcher is gone: give the watchdog (while it runs) its threshold to
    name it (its verdict ends the process), else print one line, and exit without the collective shutdown,
    which would hang. Any other error returns, for the caller to raise."""
    if _watchdog is None or not wd.is_communication_error(error):
        return
    _watchdog.wait_for_verdict()  # a verdict ends this process from the watchdog's thread
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    rank = _watchdog.rank
    sys.stdout.flush()
    os.write(2, (f"megagopher: a collective failed on rank {rank} ({first}) and no lost rank was named; "
                 f"ending rank {rank}\n").encode())
    os._exit(EXIT_PEER_LOST)
