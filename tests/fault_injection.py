"""Runs ``megagopher.train`` with a fault injected, for the resume tests (the library has no fault hooks):

    python tests/fault_injection.py kill-in-save ITERATION --config FILE.toml [--section.key=value ...]

kill-in-save: the process SIGKILLs itself half-way through writing the checkpoint of ITERATION, right
after its own shard file is written and before the checkpoint is renamed into place, like a job killed
mid-save (under torchrun every rank does, at the same point).
"""
import os
import signal
import sys

from megagopher import train
from megagopher.training import checkpoint, ckpt_save


def kill_in_save(iteration):
    original = ckpt_save.write_shard
    marker = os.path.basename(checkpoint.iter_dir("", iteration)) + ".tmp"

    def write_then_die(tensors, path):
        record = original(tensors, path)
        if os.path.basename(os.path.dirname(path)) == marker:
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    ckpt_save.write_shard = write_then_die


if __name__ == "__main__":
    fault, iteration, *argv = sys.argv[1:]
    if fault != "kill-in-save":
        sys.exit(f"unknown fault {fault!r}; valid: kill-in-save")
    kill_in_save(int(iteration))
    sys.exit(train.main(argv))
