"""What a run reports: the console line, metrics.jsonl (docs/ARCHITECTURE.md 4.3), tensorboard scalars and,
when run.wandb_project is set, a wandb run (training/wandb_sink.py), plus the model-FLOPs accounting behind
TFLOP/s and MFU.

Model FLOPs follow Narayanan et al. 2021 (appendix): per token, a forward pass costs 2 FLOPs per
multiply-accumulate of every matmul (the projections, the MLP and the output head) plus the attention
score and context products (2 * 2 * s * d_attn per layer, counted in full as the paper does; a sliding-window
layer counts min(window, s) keys the same way, MLA its qk and v head widths, a MoE layer its top_k and shared
experts, each MTP module its layer and one more output-head pass: megagopher/memory_params.py); training
costs 3x the forward (backward = 2x forward), 4x with full recomputation. MFU divides the achieved rate
by the device's peak; the peak table covers the GPUs we know (dense bf16/fp16 tensor-core rates).
"""
import json
import math
import os
import shutil
import time

from megagopher.errors import InputError
from megagopher.memory_params import forward_macs_per_token

PEAK_TFLOPS_BF16 = {  # dense, no sparsity
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0,
    "A10": 125.0, "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "B200": 2250.0, "GH200": 989.0,
}


def model_flops_per_token(cfg, seq_length, recompute="none"):
    """Training FLOPs per token for GPTConfig ``cfg`` at ``seq_length`` (memory_params.forward_macs_per_token:
    MLA, sliding windows, the active experts and the MTP modules counted)."""
    forward = 2 * forward_macs_per_token(cfg, seq_length)
    return forward * (4 if recompute == "full" else 3)


def peak_tflops(device_name):
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in device_name:
            return value
    return None


def _num(value, fmt):
    """A number for the console line; '-' where a skipped step has none."""
    return "-" if value is None else format(value, fmt)


def _fmt_duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes metrics.jsonl (one flushed line per step), tensorboard scalars, the console line and, when
    ``run_config`` (the JobConfig) sets run.wandb_project, the same rows and the resolved config to wandb.
    Only the rank given ``enabled=True`` writes; the others do nothing."""

    def __init__(self, run_dir, enabled, tensorboard=True, device_name="", resume_iteration=0, run_config=None):
        self.enabled = enabled
        self.peak = peak_tflops(device_name)
        self.file = self.tb = self.wandb = None
        self.start_time = time.time()
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        # Rows past the iteration this run starts from are from a run killed after its last checkpoint
        # (or, starting fresh, from an earlier run in this directory): they go, so the file reads as one run.
        _truncate_after(path, resume_iteration)
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise InputError(f"{path}: cannot write the metrics file ({e.strerror})") from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if run_config is not None and run_config.run.wandb_project:
            from megagopher.config import to_tables
            from megagopher.training.wandb_sink import WandbSink
            try:  # last, so that no wandb run is left open when a file above cannot be used
                self.wandb = WandbSink(run_config.run, run_dir, to_tables(run_config), resume_iteration)
            except InputError:
                self.close()
                raise

    def log_step(self, row, console=True, stage_progress=None, run_progress=None, memory=None):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log("train", row)
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "tflops_per_device",
                        "moe_aux_loss", "moe_z_loss", "moe_load_max_over_mean", "moe_dropped", "moe_seq_aux_loss"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], row["iteration"])
            for k, value in enumerate(row.get("mtp_loss") or (), 1):  # multi-token prediction, each depth apart
                self.tb.add_scalar(f"train/mtp_loss_{k}", value, row["iteration"])
        if console:
            print(self._console_line(row, stage_progress, run_progress, memory), flush=True)

    def _console_line(self, row, stage_progress, run_progress, memory):
        parts = [f"[{row['stage']}]"]
        if stage_progress:
            done, total, per_step = stage_progress
            parts.append(f"iter {done}/{total}")
        parts += [f"tokens {row['tokens']:,}", f"loss {_num(row['loss'], '.4f')}", f"lr {row['lr']:.3e}",
                  f"grad norm {_num(row['grad_norm'], '.3f')}"]
        if row.get("loss_scale") is not None:
            parts.append(f"loss scale {row['loss_scale']:.0f}")
        if "moe_aux_loss" in row:  # MoE: the aux terms in the objective and the experts' load balance
            parts += [f"moe aux {row['moe_aux_loss']:.4f}", f"router z {row['moe_z_loss']:.4f}",
                      f"load max/mean {row['moe_load_max_over_mean']:.2f}"]
            if "moe_seq_aux_loss" in row:
                parts.append(f"seq aux {row['moe_seq_aux_loss']:.4f}")
            if row.get("moe_dropped"):
                parts.append(f"dropped {row['moe_dropped']}")
        if row.get("mtp_loss"):
            parts.append("mtp loss " + " ".join(f"{v:.4f}" for v in row["mtp_loss"]))
        parts += [f"skipped {row.get('skipped_total', int(row['skipped']))}",
                  f"{row['step_time_s'] * 1000:.1f} ms/step", f"{row['tokens_per_s']:,.0f} tok/s",
                  f"{row['tflops_per_device']:.3f} TFLOP/s/dev"]
        if self.peak:
            parts.append(f"MFU {100 * row['tflops_per_device'] / self.peak:.1f}%")
        if memory:
            parts.append(f"mem {memory / 2 ** 30:.2f} GiB")
        if stage_progress:
            done, total, per_step = stage_progress
            parts.append(f"eta stage {_fmt_duration((total - done) * per_step)}")
        if run_progress:
            done, total, per_step = run_progress
            parts.append(f"run {_fmt_duration((total - done) * per_step)}")
        return " | ".join(parts)

    def log_eval(self, row):
        if not self.enabled:
            return
        self.file.write(json.dumps({"event": "eval", **row}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log("eval", row)
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.tb.add_scalar(f"eval/{key}", value, row["iteration"])
        print(" | ".join([f"[{row.get('stage', '')}] eval at iter {row['iteration']}"] +
                         [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in row.items() if k not in ("iteration", "stage")]), flush=True)

    def close(self, exit_code=None):
        """exit_code: the wandb run's (None: from the error being raised through the caller, else 0)."""
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close(exit_code)


def _truncate_after(path, iteration):
    """On resume, drop rows written after the checkpoint we resume from (a crash can leave some), so the
    file reads as one uninterrupted run. Unreadable lines (a half-written last line, a damaged file) are
    dropped too; when there are any, the file as it was is kept as metrics.jsonl.damaged and one line says
    so. The new file is written under a temporary name and renamed."""
    if not os.path.lexists(path):
        return
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:  # a directory in its place, no permission
        raise InputError(f"{path}: cannot read the metrics file to resume it ({e.strerror})") from None
    keep, later, dropped = [], 0, 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if row.get("iteration", 0) <= iteration:
                keep.append(line + b"\n")
            else:
                later += 1
        except (ValueError, AttributeError):  # invalid UTF-8 or JSON, or not a row
            dropped += i < len(lines) - 1  # a last line with no newline is the one a killed run was writing
    if iteration == 0 and later:
        shutil.copyfile(path, path + ".previous")
        print(f"megagopher: {path} held {later} rows of an earlier run; starting fresh (the file as it was is "
              f"kept as {os.path.basename(path)}.previous)", flush=True)
    if dropped:
        shutil.copyfile(path, path + ".damaged")
        print(f"megagopher: {path}: {dropped} unreadable line(s) dropped on resume (the file as it was is kept "
              f"as {os.path.basename(path)}.damaged)", flush=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(keep)
    os.replace(tmp, path)
