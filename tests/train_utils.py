"""Running ``megagopher.train`` as users do, for the end-to-end tests: one process or under torchrun."""
import json
import os
import subprocess
import sys

from megagopher.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
[model]
num_layers = 4
hidden_size = 32
num_attention_heads = 4
num_query_groups = 2
vocab_size = 90
seq_length = 16
normalization = "rmsnorm"
activation = "swiglu"
position_embedding = "rope"
make_vocab_size_divisible_by = 8
[training]
micro_batch_size = 2
global_batch_size = 8
train_iters = 4
seed = 7
log_interval = 1
[optimizer]
lr = 3e-3
warmup_iters = 1
[data]
source = "synthetic"
[run]
tensorboard = false
"""


def write_config(tmp_path, text=TINY, name="tiny.toml"):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def run_train(config, run_dir, *overrides, nproc=1, timeout=300, check=True, module="megagopher.train"):
    """Runs the trainer; returns the CompletedProcess. Under torchrun when nproc > 1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["--config", config, f"--run.dir={run_dir}", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir, event="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("event", "train") == event]
