"""Running ``megagopher.train`` as users do, for the end-to-end tests: one process or under torchrun; and
reading what a run saved, whatever layout wrote it, to compare it with the serial run's."""
import json
import os
import signal
import subprocess
import sys
import time

from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files
from megagopher.testing import free_port
from megagopher.training.checkpoint import CheckpointReader, iter_dir
from pooled_train import run_in_pool

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


def bpe_tokenizer_dir(directory, texts, vocab_size):
    """``directory`` (created) holding a GPT-2 BPE tokenizer of ``vocab_size`` trained on ``texts``."""
    os.makedirs(directory, exist_ok=True)
    write_tokenizer_files(directory, *train_bpe(count_words(texts), vocab_size))
    return str(directory)


def write_config(tmp_path, text=TINY, name="tiny.toml"):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def run_train(config, run_dir, *overrides, nproc=1, timeout=300, check=True, module="megagopher.train",
              launcher=None):
    """Runs the trainer; returns the CompletedProcess. ``launcher``: "pool" runs ``megagopher.train`` on the
    pooled gloo ranks of megagopher.testing.spawn (tests/pooled_train.py: no interpreter start per run, the
    default for the trainer itself); "process" starts ``python -m module``, under torchrun when nproc > 1, for
    runs that need real processes (signals, killed ranks, restarts, the watchdog, fault injection)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["--config", config, f"--run.dir={run_dir}", *overrides]
    launcher = launcher or ("pool" if module == "megagopher.train" else "process")
    if launcher == "pool":
        proc = run_in_pool(args, nproc, ROOT, {}, timeout)
        cmd = proc.args
    else:
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={free_port()}", "-m", module, *args]
        else:
            cmd = [sys.executable, "-m", module, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def launch_ranks(config, run_dir, *overrides, nproc=1, timeout=180):
    """``python -m megagopher.train`` as ``nproc`` ranks; ([exit status], [stderr lines]) per rank. The ranks get
    torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) but are started here, so each one's own exit
    status is seen: torchrun would terminate the others once one has exited."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "megagopher.train", "--config", config, f"--run.dir={run_dir}", *overrides]
    if nproc > 1:
        env.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)) if nproc > 1 else env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(nproc)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:   # only after a timeout is any still running
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], [e.splitlines() for e in errs]


def launcher_children(launcher_pid):
    """The pids of a launcher's child processes, read from /proc. torchrun starts each worker in a session
    of its own, so a signal to the launcher's process group does not reach them."""
    pids = []
    try:
        tasks = os.listdir(f"/proc/{launcher_pid}/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids


def kill_job(proc, limit_s=30):
    """SIGKILLs a launch, its workers first (none may run on once the launcher is gone: an orphan writing
    the checkpoint a later run writes too), and waits until none of them runs."""
    pids = [*launcher_children(proc.pid), proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    wait_gone(pids, limit_s)


def running(pid):
    """True while ``pid`` is a live process (a zombie, whose parent has not reaped it yet, has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


def wait_gone(pids, limit_s):
    """Seconds until every pid has ended; fails naming the ones still running after ``limit_s``."""
    start = time.monotonic()
    while any(running(p) for p in pids) and time.monotonic() - start < limit_s:
        time.sleep(0.05)
    alive = [p for p in pids if running(p)]
    assert not alive, f"still running after {limit_s} s: {alive}"
    return time.monotonic() - start


def read_metrics(run_dir, event="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("event", "train") == event]


# The golden check end to end (docs/ARCHITECTURE.md 3) compares what the runs saved, so it runs with:
#  - no gradient clipping: exp_avg after step 1 is then (1 - beta1) times the gradient itself;
#  - Adam's eps at 1e-4 instead of 1e-8, below nearly every gradient element (about 1e-2 here) but far above
#    rounding: with 1e-8 an element whose gradient is rounding noise (the key bias's is zero in exact
#    arithmetic: softmax ignores a shift) or cancels to near zero moves by up to lr, so another order of sums
#    moved such weights by 2e-4 of the tensor's largest after one step; with 1e-4, by 4e-5 after three.
GOLDEN = ("--optimizer.clip_grad=0", "--optimizer.eps=1e-4")
GRAD_RTOL = 1e-5   # step 1's per-parameter gradients, as the losses (measured: 5e-7)
STATE_RTOL = 1e-4  # weights and Adam moments after several steps, as the gradient norms (measured: 4e-5)


def checkpoint_tensors(root, iteration, kind="param"):
    """{name: whole tensor} of the checkpoint of ``iteration`` under ``root``, read layout-independently
    (CheckpointReader.full_tensor: TP shards joined, the vocabulary padding dropped, ZeRO-1 and pipeline
    pieces gathered by name). ``kind``: "param" or an optimizer state ("exp_avg", "exp_avg_sq")."""
    reader = CheckpointReader(iter_dir(str(root), iteration))
    return {name: reader.full_tensor(name, kind) for name in reader.names()}


def assert_same_tensors(got, want, rtol, what):
    """Every tensor equal to rounding: max |got - want| <= rtol * max |want|, per tensor. fp32 sums taken in
    another order (another layout) differ by rounding relative to the magnitudes summed, not to each
    element, so the scale is the tensor's largest element; a zero tensor must match exactly."""
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want)))
    for name, expected in want.items():
        actual = got[name]
        assert actual.shape == expected.shape, (what, name, tuple(actual.shape), tuple(expected.shape))
        scale, error = expected.abs().max().item(), (actual - expected).abs().max().item()
        assert error <= rtol * scale, f"{what}: {name}: max |difference| {error:.3g} > {rtol} x max |value| {scale:.3g}"


def assert_same_training_state(root, reference_root, iteration, rtol, kinds=("param", "exp_avg"), what=""):
    """The checkpoints of ``iteration`` under two roots hold the same weights and optimizer state to rounding.
    AdamW's first moment after a step is beta1 m + (1 - beta1) g (decoupled weight decay stays out of it), so
    with the same m before the step (the first step, or bitwise-loaded state) exp_avg compares the step's
    per-parameter gradients (clipping off, or clipped by the same global norm)."""
    for kind in kinds:
        got, want = checkpoint_tensors(root, iteration, kind), checkpoint_tensors(reference_root, iteration, kind)
        assert_same_tensors(got, want, rtol, f"{what} {kind} at iteration {iteration}")
