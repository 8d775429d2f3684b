"""The training loop, read top to bottom: set up the process groups, build the model chunks this rank holds,
then for each stage build its data, optimizer and LR schedule and run its steps.

One step (``train_step``):
  1. this DP rank's slice of global batch k, split into micro-batches (invariant 2);
  2. forward and backward over the micro-batches under the configured pipeline schedule; each
     micro-batch backpropagates sum(token losses) / (tokens in the *global* batch), so accumulation and
     data parallelism add up to the serial gradient (invariant 3);
  3. finish the gradient reductions (DP buckets, sequence-parallel norms, tied embeddings);
  4. the optimizer: global-norm clipping (invariant 4), mixed-precision update, maybe a skipped step;
  5. the logged loss is brought from the last pipeline stage to every rank (one scalar all-reduce).
"""
import os
import time

import torch
import torch.distributed as dist

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.distributed import finalize_model_grads, wrap_data_parallel
from megagopher.optimizer import LRSchedule, build_optimizer
from megagopher.pipeline_parallel.schedules import forward_backward
from megagopher.pipeline_parallel.stages import build_model_chunks
from megagopher.pipeline_parallel.trace import Tracer
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.training import data as data_lib
from megagopher.training.config import model_config, stage_config, to_toml
from megagopher.training.distributed import setup_distributed, validate_run
from megagopher.training.metrics import MetricsLogger, model_flops_per_token

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.vocab_size = data_lib.vocab_size_of(cfg)
        # Invariant 6: every check that can fail runs here, identically on every rank, before any collective.
        self.dp = validate_run(cfg, self.world_size, self.vocab_size)
        self.device = setup_distributed(cfg)
        p = cfg["parallel"]
        ps.initialize_model_parallel(tp=p["tp"], pp=p["pp"], vpp=p["vpp"], cp=p["cp"])
        self.rank = dist.get_rank()
        self.is_logger = self.rank == 0
        t = cfg["training"]
        model_parallel_seed(t["seed"], ps.get_tp_rank(), ps.get_pp_rank(), self.device)
        self.model_cfg = model_config(cfg, vocab_size=self.vocab_size)
        self.tracer = Tracer(enabled=p["trace"])
        self.iteration, self.consumed_tokens, self.stage_index, self.stage_iteration = 0, 0, 0, 0
        self.skipped_total = 0
        self.chunks = self._build_model(self.model_cfg)
        self.optimizer = None

    # -- construction ---------------------------------------------------------------------------------
    def _build_model(self, model_cfg):
        t, p = self.cfg["training"], self.cfg["parallel"]
        chunks = build_model_chunks(model_cfg, sequence_parallel=p["sp"], recompute=t["recompute"],
                                    recompute_num_layers=t["recompute_num_layers"] or None,
                                    pp_layers=p["pp_layers"] or None)
        for chunk in chunks:
            chunk.initialize(t["seed"])
            chunk.to(device=self.device, dtype=DTYPES[t["precision"]])
        return wrap_data_parallel(chunks, p, distributed_optimizer=self.cfg["optimizer"]["distributed"])

    def _build_optimizer(self, scfg):
        return build_optimizer(self.chunks, scfg["optimizer"], scfg["training"])

    # -- one step ---------------------------------------------------------------------------------------
    def train_step(self, dataset, scfg, consumed_samples):
        t = scfg["training"]
        gbs, mbs, seq = t["global_batch_size"], t["micro_batch_size"], scfg["model"]["seq_length"]
        indices = data_lib.global_batch_indices(consumed_samples, gbs, ps.get_dp_rank(), self.dp)
        mbatches = data_lib.microbatches(dataset, indices, mbs, self.device)
        global_tokens = gbs * seq
        optimizer = self.optimizer

        def loss_fn(per_token_loss):
            return optimizer.scale_loss(per_token_loss.float().sum() / global_tokens)

        optimizer.zero_grad()
        loss_sum = forward_backward(self.chunks, mbatches, loss_fn, schedule=self.cfg["parallel"]["schedule"],
                                    tracer=self.tracer)
        finalize_model_grads(self.chunks)
        updated, grad_norm = optimizer.step()
        return self._global_loss(loss_sum) / global_tokens, updated, grad_norm

    def _global_loss(self, loss_sum):
        """Sum of token losses of the global batch, on every rank: the last stage's TP rank 0 of every DP
        replica contributes, everyone else adds zero."""
        owner = ps.is_pipeline_last_stage() and ps.get_tp_rank() == 0 and ps.get_cp_rank() == 0
        value = torch.tensor([float(loss_sum) if owner else 0.0], dtype=torch.float64)
        if self.device.type == "cuda":
            value = value.to(self.device)
        dist.all_reduce(value)
        return float(value.item())

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset, scfg):
        """Mean token loss over ``eval_iters`` global batches of ``dataset`` (forward only)."""
        from megagopher.pipeline_parallel.schedules import forward_only
        t = scfg["training"]
        gbs, mbs, seq = t["global_batch_size"], t["micro_batch_size"], scfg["model"]["seq_length"]
        for c in self.chunks:
            c.eval()
        total = 0.0
        for k in range(t["eval_iters"]):
            indices = data_lib.global_batch_indices(k * gbs, gbs, ps.get_dp_rank(), self.dp)
            mbatches = data_lib.microbatches(dataset, indices, mbs, self.device)
            total += self._global_loss(forward_only(self.chunks, mbatches))
        for c in self.chunks:
            c.train()
        return total / (t["eval_iters"] * gbs * seq)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        run_dir = cfg["run"]["dir"]
        if self.is_logger:
            os.makedirs(run_dir, exist_ok=True)
            tmp = os.path.join(run_dir, "config.toml.tmp")
            with open(tmp, "w") as f:
                f.write(to_toml(cfg))
            os.replace(tmp, os.path.join(run_dir, "config.toml"))
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        logger = MetricsLogger(run_dir, self.is_logger, cfg["run"]["tensorboard"], device_name,
                               resume_iteration=self.iteration)
        total_iters = sum(st["train_iters"] for st in cfg["stages"])
        run_start, steps_done = time.perf_counter(), 0
        with kernels.use_backend(cfg["training"]["kernel_backend"]):
            for stage_index in range(self.stage_index, len(cfg["stages"])):
                stage = cfg["stages"][stage_index]
                scfg = stage_config(cfg, stage_index)
                t = scfg["training"]
                train_ds, valid_ds = data_lib.build_datasets(scfg, self.vocab_size, t["train_iters"], self.dp)
                if self.optimizer is None or not stage.get("keep_optimizer", cfg["checkpoint"]["keep_optimizer"]):
                    self.optimizer = self._build_optimizer(scfg)
                o = scfg["optimizer"]
                schedule = LRSchedule(o["lr"], o["min_lr"], o["warmup_iters"], max(1, t["train_iters"]), o["decay"],
                                      o["warmup_init_lr"], o["wsd_decay_fraction"])
                seq = scfg["model"]["seq_length"]
                flops_per_token = model_flops_per_token(self.model_cfg, seq, t["recompute"])
                while self.stage_iteration < t["train_iters"]:
                    self.stage_iteration += 1
                    self.iteration += 1
                    lr = schedule(self.stage_iteration)
                    self.optimizer.set_lr(lr)
                    start = time.perf_counter()
                    consumed = (self.stage_iteration - 1) * t["global_batch_size"]
                    loss, updated, grad_norm = self.train_step(train_ds, scfg, consumed)
                    step_time = time.perf_counter() - start
                    tokens = t["global_batch_size"] * seq
                    self.consumed_tokens += tokens
                    self.skipped_total += int(not updated)
                    steps_done += 1
                    per_step = (time.perf_counter() - run_start) / steps_done
                    row = {"iteration": self.iteration, "stage": stage["name"], "loss": loss, "lr": lr,
                           "grad_norm": grad_norm, "loss_scale": self.optimizer.loss_scale,
                           "skipped": not updated, "tokens": self.consumed_tokens, "step_time_s": step_time,
                           "tokens_per_s": tokens / step_time,
                           "tflops_per_device": flops_per_token * tokens / step_time / self.world_size / 1e12}
                    console = self.stage_iteration % t["log_interval"] == 0 or self.stage_iteration == t["train_iters"]
                    memory = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
                    logger.log_step(row, console, (self.stage_iteration, t["train_iters"], per_step),
                                    (self.iteration, total_iters, per_step), memory)
                    if valid_ds is not None and t["eval_interval"] and (
                            self.stage_iteration % t["eval_interval"] == 0 or self.stage_iteration == t["train_iters"]):
                        logger.log_eval({"iteration": self.iteration, "stage": stage["name"],
                                         "loss": self.evaluate(valid_ds, scfg)})
                self.stage_index, self.stage_iteration = stage_index + 1, 0
        if cfg["parallel"]["trace"]:
            self.tracer.save(os.path.join(run_dir, "pipeline_trace.json"))
        logger.close()
