"""Issue 26's architectures resume bit-exactly after a SIGKILL, through the real entry point (torchrun and
``python -m megagopher.train``), as tests/test_checkpoint.py shows for the dense model.

Two models, each a few steps at a four-rank layout with a checkpoint every step:
  - DeepSeek-V3-style (examples/configs/deepseek_tiny_cpu.toml's [model], smaller): multi-head latent
    attention with a query latent, YaRN RoPE, one multi-token prediction module, sigmoid routing with the
    auxiliary-loss-free balancing bias (a buffer updated after every step: it must be checkpointed), group-
    limited routing, a shared expert, the first layer dense, the sequence-wise balance loss; at pp 2 x dp 2
    with ep 2 and ZeRO-1.
  - Qwen3/Mistral-style: QK-norm, q/k/v biases, a head width apart from hidden/heads, Llama 3 RoPE scaling,
    a sliding window shorter than the sequence on every other layer, hidden dropout; at tp 2 + SP x dp 2 with
    ZeRO-1 (dropout: every rank's random streams must come back, not only the weights).
The killed and resumed run must log exactly the reference run's rows (every loss, gradient norm, MTP loss
and MoE metric, bit for bit) and end with the same checkpoint (weights, Adam moments, the routers' biases).
"""
import re
import signal
import sys

import torch

from megagopher.testing import free_port
from megagopher.training.checkpoint import CheckpointReader, iter_dir
from megagopher.training.ckpt_format import all_checkpoint_dirs
from test_checkpoint import _run_until
from train_utils import read_metrics, run_train, write_config

COMMON = """
[training]
micro_batch_size = 2
global_batch_size = 8
train_iters = 4
seed = 11
log_interval = 1
[optimizer]
lr = 3e-3
warmup_iters = 1
distributed = true
[checkpoint]
save_interval = 1
keep_last = 5
[data]
source = "synthetic"
[run]
tensorboard = false
"""

DEEPSEEK = """
[model]
num_layers = 4
hidden_size = 32
num_attention_heads = 4
vocab_size = 96
seq_length = 16
normalization = "rmsnorm"
activation = "swiglu"
position_embedding = "rope"
tie_embeddings = false
bias = false
q_lora_rank = 16
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 4
v_head_dim = 8
num_experts = 8
moe_top_k = 2
moe_ffn_hidden_size = 16
moe_shared_experts = 1
moe_router = "sigmoid"
moe_bias_update_rate = 0.01
moe_n_group = 4
moe_topk_group = 2
moe_routed_scaling_factor = 2.5
moe_seq_aux_loss_coeff = 0.0001
first_k_dense = 1
mtp_num_layers = 1
mtp_loss_weight = 0.3
[model.rope_scaling]
type = "yarn"
factor = 4.0
original_max_position_embeddings = 8
mscale = 1.0
mscale_all_dim = 1.0
[parallel]
pp = 2
ep = 2
schedule = "1f1b"
""" + COMMON

QWEN = """
[model]
num_layers = 4
hidden_size = 32
num_attention_heads = 4
num_query_groups = 2
kv_channels = 12
vocab_size = 96
seq_length = 16
normalization = "rmsnorm"
activation = "swiglu"
position_embedding = "rope"
bias = false
qk_norm = true
qkv_bias = true
window_size = 6
window_pattern = ["local", "global"]
dropout = 0.1
[model.rope_scaling]
type = "llama3"
factor = 8.0
low_freq_factor = 1.0
high_freq_factor = 4.0
original_max_position_embeddings = 8
[parallel]
tp = 2
sp = true
""" + COMMON

# What a row holds that is not the step's arithmetic: wall-clock time and its rates.
TIMING = ("step_time_s", "tokens_per_s", "tflops_per_device")


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


def _first_difference(rows, reference):
    """(iteration, {key: (got, want)}) of the first row that differs, for the failure message."""
    for got, want in zip(rows, reference):
        if got != want:
            keys = sorted(k for k in {*got, *want} if got.get(k) != want.get(k))
            return got.get("iteration"), {k: (got.get(k), want.get(k)) for k in keys}
    return None, f"{len(rows)} rows, {len(reference)} in the reference"


def _newest_checkpoint(ckpt_dir):
    """The iteration load = "auto" resumes from: the newest renamed iter_N directory (ckpt_format's one policy;
    ``latest`` may still name the one before when the kill came between the rename and its update)."""
    return max(all_checkpoint_dirs(ckpt_dir), default=0)


def _saved(ckpt_dir, iteration):
    """{(kind, name): whole tensor} of a checkpoint: weights and buffers (the routers' balancing bias), and
    the Adam moments of the parameters, read layout-independently (train_utils.checkpoint_tensors does one
    kind at a time over every name, which a buffer, with no optimizer state, would fail)."""
    reader = CheckpointReader(iter_dir(ckpt_dir, iteration))
    return {(kind, name): reader.full_tensor(name, kind) for name in reader.names()
            for kind in ("param", "exp_avg", "exp_avg_sq") if reader.has(name, kind)}


def _check_resume(tmp_path, text, must_log):
    cfg = write_config(tmp_path, text)
    ref_dir, ref_ckpt = str(tmp_path / "ref"), str(tmp_path / "ref_ckpt")
    run_train(cfg, ref_dir, f"--checkpoint.dir={ref_ckpt}", nproc=4)
    reference = _rows(ref_dir)
    assert [r["iteration"] for r in reference] == [1, 2, 3, 4]
    assert all(k in reference[0] for k in must_log), (must_log, sorted(reference[0]))

    run_dir, ckpt_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    args = (f"--checkpoint.dir={ckpt_dir}", "--checkpoint.load=auto")
    killed = _run_until([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                         f"--master-port={free_port()}", "-m", "megagopher.train", "--config", cfg,
                         f"--run.dir={run_dir}", *args], run_dir, 2)
    assert killed.returncode == -signal.SIGKILL, f"the run to kill exited by itself, status {killed.returncode}"
    start = _newest_checkpoint(ckpt_dir)
    assert 1 <= start < 4, f"killed after iteration {start}'s checkpoint: nothing left to resume"
    proc = run_train(cfg, run_dir, *args, nproc=4)
    assert re.search(rf"resumed from .*iter_{start:07d}", proc.stdout), proc.stdout[-2000:]
    logged = [int(m) for m in re.findall(r"iter (\d+)/4", proc.stdout)]
    assert logged == list(range(start + 1, 5)), (start, logged)
    rows = _rows(run_dir)
    assert rows == reference, f"resumed from iteration {start}: first difference {_first_difference(rows, reference)}"
    got, want = _saved(ckpt_dir, 4), _saved(ref_ckpt, 4)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{key} differs after resuming from iteration {start}"
    return start, {name: t for (kind, name), t in want.items() if kind == "param"}


def test_deepseek_v3_style_resumes_bitwise_after_sigkill(tmp_path):
    start, params = _check_resume(tmp_path, DEEPSEEK, ("loss", "grad_norm", "mtp_loss", "moe_load_max_over_mean",
                                                       "moe_seq_aux_loss", "moe_tokens_per_expert"))
    biases = sorted(n for n in params if n.endswith(".mlp.router.expert_bias"))
    # three MoE layers after the dense first one, and the MTP module's (its layer is an MoE layer too)
    assert [n.split(".mlp.")[0] for n in biases] == ["layers.1", "layers.2", "layers.3", "mtp.layers.4.layer"]
    # The resume restored a bias that had moved: each router's, at the checkpoint resumed from. (At the end
    # one may be back at zero: at this rate the bias can flip every expert's selection, and its load error's
    # sign, from one step to the next.)
    resumed_from = CheckpointReader(iter_dir(str(tmp_path / "ref_ckpt"), start))
    assert all(resumed_from.full_tensor(n).abs().max() > 0 for n in biases), start


def test_qwen3_mistral_style_resumes_bitwise_after_sigkill(tmp_path):
    _, params = _check_resume(tmp_path, QWEN, ("loss", "grad_norm"))
    assert {"layers.0.attention.q_norm.weight", "layers.0.attention.qkv.bias"} <= set(params)
