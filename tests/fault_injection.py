"""Runs ``megagopher.train`` with a fault injected, for the fault tests (the library has no fault hooks):

    python tests/fault_injection.py FAULT ARG... -- --config FILE.toml [--section.key=value ...]

kill-in-save ITERATION        SIGKILL right after this rank's shard file of ITERATION's checkpoint is
                              written, before the checkpoint is published (under torchrun every rank
                              does, at the same point; with checkpoint.async_save, from the writer thread)
signal-at PHASE SIGNAL [RANK] the process sends itself SIGNAL (TERM, INT or KILL) when PHASE begins, on
                              RANK only (default: every rank). PHASE: startup (process groups), data (the
                              first dataset build), step (the step of iteration 2), eval (the first
                              evaluation), save (writing iteration 2's checkpoint), boundary (the start
                              of the second stage)
fsize-limit-at ITERATION BYTES from ITERATION's checkpoint on, files may not grow past BYTES (setrlimit
                              RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG, as on a full disk)
exit-at ITERATION RANK ROUND [ITERATION RANK ROUND ...]
                              RANK's process exits at once (os._exit(1), as a crashed worker) when the step of
                              ITERATION begins, in round ROUND of a torchrun job (TORCHELASTIC_RESTART_COUNT)
"""
import os
import resource
import signal
import sys

from megagopher import train
from megagopher.training import checkpoint, ckpt_save, loop

SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}


def _iter_tmp(path, iteration):
    return os.path.basename(os.path.dirname(path)) == os.path.basename(checkpoint.iter_dir("", iteration)) + ".tmp"


def kill_in_save(iteration):
    original = ckpt_save.write_shard

    def write_then_die(tensors, path):
        record = original(tensors, path)
        if _iter_tmp(path, int(iteration)):
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    ckpt_save.write_shard = write_then_die


def _once(fire):
    """A hook that fires the first time ``fire(*args)`` is true."""
    state = {"done": False}

    def check(*args):
        if not state["done"] and fire(*args):
            state["done"] = True
            return True
        return False
    return check


def signal_at(phase, name, rank=None):
    sig = SIGNALS[name]
    mine = rank is None or int(os.environ.get("RANK", "0")) == int(rank)

    def send():
        if mine:
            os.kill(os.getpid(), sig)

    def wrap(owner, attr, when=lambda *a: True):
        original, fire = getattr(owner, attr), _once(when)

        def hooked(*args, **kwargs):
            if fire(*args):
                send()
            return original(*args, **kwargs)
        setattr(owner, attr, hooked)

    if phase == "startup":
        wrap(loop, "setup_distributed")
    elif phase == "data":
        wrap(loop.data_lib, "build_datasets")
    elif phase == "step":
        wrap(loop.Trainer, "train_step", lambda trainer, *a: trainer.state.iteration == 2)
    elif phase == "eval":
        wrap(loop.Trainer, "evaluate")
    elif phase == "save":
        wrap(ckpt_save, "write_shard", lambda tensors, path: _iter_tmp(path, 2))
    elif phase == "boundary":
        wrap(loop.Trainer, "_start_stage", lambda trainer, index: index == 1)
    else:
        sys.exit(f"unknown phase {phase!r}")


def fsize_limit_at(iteration, limit):
    original = checkpoint.begin_save

    def limited(root, it, *args, **kwargs):
        if it >= int(iteration):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return original(root, it, *args, **kwargs)

    checkpoint.begin_save = limited


def exit_at(*triples):
    """Each (iteration, rank, round) triple: that rank dies when that iteration's step begins in that round."""
    here = (int(os.environ.get("RANK", "0")), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    deaths = {int(it) for it, rank, rnd in zip(triples[::3], triples[1::3], triples[2::3])
              if (int(rank), int(rnd)) == here}
    original = loop.Trainer.train_step

    def step_or_die(trainer, *args, **kwargs):
        if trainer.state.iteration in deaths:
            os._exit(1)
        return original(trainer, *args, **kwargs)

    loop.Trainer.train_step = step_or_die


FAULTS = {"kill-in-save": kill_in_save, "signal-at": signal_at, "fsize-limit-at": fsize_limit_at, "exit-at": exit_at}

if __name__ == "__main__":
    args = sys.argv[1:]
    fault, rest = args[0], args[1:]
    if fault not in FAULTS:
        sys.exit(f"unknown fault {fault!r}; valid: {', '.join(FAULTS)}")
    split = rest.index("--") if "--" in rest else next(i for i, a in enumerate(rest) if a.startswith("--"))
    FAULTS[fault](*rest[:split])
    sys.exit(train.main([a for a in rest[split:] if a != "--"]))
