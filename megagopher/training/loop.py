"""The training loop, read top to bottom: set up the process groups, build (or restore) the model chunks this
rank holds, then for each stage build its data, optimizer and LR schedule and run its steps.

One step (``train_step``):
  1. this DP rank's slice of global batch k, split into micro-batches (invariant 2);
  2. forward and backward over the micro-batches under the configured pipeline schedule; each
     micro-batch backpropagates sum(token losses) / (tokens in the *global* batch), so accumulation and
     data parallelism add up to the serial gradient (invariant 3);
  3. finish the gradient reductions (DP buckets, sequence-parallel norms, tied embeddings);
  4. one small all-reduce brings the loss from the last pipeline stage to every rank, together with
     "a rank saw a non-finite loss" and "a rank was asked to stop" flags, so every rank takes the same
     decision at the same step;
  5. the optimizer: global-norm clipping (invariant 4), mixed-precision update, maybe a skipped step.

Stages run one after another; each starts from the previous one's final weights (optionally growing the
model's depth by progressive stacking) and, by default, a fresh optimizer. Checkpoints are saved every
``checkpoint.save_interval`` steps, at the end of every stage and on SIGTERM/SIGINT; ``checkpoint.load``
resumes into the right stage and step.
"""
import dataclasses
import os
import signal
import time

import torch
import torch.distributed as dist

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.distributed import finalize_model_grads, wrap_data_parallel
from megagopher.memory import memory_report
from megagopher.model.moe import MoEAuxLosses, attach_aux_losses, moe_step_summary, update_expert_bias
from megagopher.model.mtp import MTPLosses, attach_mtp_losses, mtp_step_summary, mtp_token_counts
from megagopher.optimizer import LRSchedule, build_optimizer, global_batch_size_at
from megagopher.pipeline_parallel.schedules import forward_backward, forward_only
from megagopher.pipeline_parallel.stages import build_model_chunks
from megagopher.pipeline_parallel.trace import Tracer
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.tensor_parallel.cross_entropy import ZLoss
from megagopher.training import checkpoint as ckpt
from megagopher.training import data as data_lib
from megagopher.training.agreement import StepVote, agree, agree_on_step
from megagopher.common import PRECISION_DTYPES, unwrap_model
from megagopher.errors import InputError, NonFiniteLoss
from megagopher.config import to_toml, validate
from megagopher.training.distributed import setup_distributed
from megagopher.training.metrics import MetricsLogger, model_flops_per_token
from megagopher.training.resume import TrainState, check_load_paths, grow, restore_or_build, skip_finished_stages
from megagopher.training.wandb_sink import require_wandb


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.stop_requested = False
        # From the start: a SIGTERM or SIGINT during start-up or data building stops the run cleanly before
        # its first step (checked collectively at every stage start), not with a traceback mid-setup.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        # Invariant 6: every check that can fail runs here, identically on every rank, before any collective.
        self.dp = validate(cfg, self.world_size)
        self.vocab_size = data_lib.vocab_size_of(cfg)
        check_load_paths(cfg, self.vocab_size)  # read from disk, so not in validate
        require_wandb(cfg.run)  # the environment's, so not in validate (a checkpoint's config loads without it)
        self.eod = data_lib.eod_id_of(cfg)  # None unless some stage masks documents
        self.device = setup_distributed(cfg)
        p = cfg.parallel
        ps.initialize_model_parallel(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep)
        self.rank = dist.get_rank()
        model_parallel_seed(cfg.training.seed, ps.get_tp_rank(), ps.get_pp_rank(), self.device)
        self.tracer = Tracer(enabled=p.trace, device=self.device)
        self.last_z_loss = None  # the last step's mean z-loss term, logged when training.z_loss > 0
        self.last_moe = {}  # the last step's MoE metrics (model/moe.py moe_step_summary)
        self.last_mtp = {}  # the last step's multi-token prediction losses (model/mtp.py mtp_step_summary)
        self.optimizer, self.pending_optimizer = None, None
        c = cfg.checkpoint
        self.checkpointer = ckpt.Checkpointer(c.dir, c.keep_last, c.async_save, c.on_save_error)
        # The progress a checkpoint records, saved and restored explicitly (resume.TrainState).
        chunks, self.state, self.pending_optimizer = restore_or_build(
            cfg, TrainState(num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts), self._build_model,
            self.vocab_size, self.device)
        self.chunks = self._wrap(chunks)

    # -- construction ---------------------------------------------------------------------------------
    def _build_model(self, num_layers, num_experts):
        t = self.cfg.training
        self.model_cfg = self.cfg.model_at(num_layers=num_layers, vocab_size=self.vocab_size,
                                           num_experts=num_experts)
        chunks = build_model_chunks(self.model_cfg, sequence_parallel=self.cfg.parallel.sp, recompute=t.recompute,
                                    recompute_num_layers=t.recompute_num_layers or None,
                                    pp_layers=self.cfg.pp_layers_at(num_layers) or None)
        for chunk in chunks:
            chunk.initialize(t.seed)
            chunk.to(device=self.device, dtype=PRECISION_DTYPES[t.precision])
            if t.compile:  # per layer, as torchtitan does: one compiled graph serves every layer
                for layer in chunk.layers.values():
                    layer.compile()
        return chunks

    def _wrap(self, chunks):
        return wrap_data_parallel(chunks, self.cfg.parallel, distributed_optimizer=self.cfg.optimizer.distributed)

    def save(self):
        if self.cfg.checkpoint.dir:
            self.checkpointer.save(self.state.iteration, self.chunks, self.optimizer, self.state.state_dict(),
                                   self.cfg)

    # -- one step ---------------------------------------------------------------------------------------
    def train_step(self, batches, scfg, consumed_samples, gbs, next_batch=None):
        """One step on global batch [consumed_samples, + gbs); ``batches`` (a data.Prefetcher) starts
        preparing ``next_batch`` ((consumed samples, size) of the next step) while this one computes."""
        seq = scfg.model.seq_length
        indices = data_lib.global_batch_indices(consumed_samples, gbs, ps.get_dp_rank(), self.dp)
        following = data_lib.global_batch_indices(*next_batch, ps.get_dp_rank(), self.dp) if next_batch else None
        mbatches = batches.get(indices, following)
        global_tokens = self._tokens_with_loss(mbatches, gbs * seq)
        optimizer = self.optimizer

        def loss_fn(per_token_loss):
            return optimizer.scale_loss(per_token_loss.float().sum() / global_tokens)

        # The z-loss's gradient joins the loss's inside the cross entropy, whose value stays the LM loss (the
        # logged one); the model's ZLoss sums the term, reduced and logged beside it as the loss is.
        z_loss = ZLoss(scfg.training.z_loss) if scfg.training.z_loss > 0 else 0.0
        for chunk in self.chunks:
            unwrap_model(chunk).z_loss = z_loss
        # The MoE aux terms: each micro-batch's weighs 1 / (the global batch's micro-batches), as its LM
        # loss's tokens do, times the fp16 loss scale; so the objective is LM loss + the aux terms' mean.
        moe = None
        if self.model_cfg.num_experts:
            moe = MoEAuxLosses(float(optimizer.scale_loss(1.0)) * scfg.training.micro_batch_size / gbs)
            attach_aux_losses(self.chunks, moe)
        mtp = mtp_counts = None  # multi-token prediction: each depth's mean over its targets in the global batch
        if self.model_cfg.mtp_num_layers:
            mtp_counts = mtp_token_counts(mbatches, gbs, seq, self.model_cfg.mtp_num_layers, self.device)
            mtp = MTPLosses.for_step(self.model_cfg, mtp_counts, float(optimizer.scale_loss(1.0)))
            attach_mtp_losses(self.chunks, mtp)
        optimizer.zero_grad()
        loss_sum = forward_backward(self.chunks, mbatches, loss_fn, schedule=self.cfg.parallel.schedule,
                                    tracer=self.tracer)
        finalize_model_grads(self.chunks)
        self.last_moe = moe_step_summary(moe, self.model_cfg, self.device) if moe else {}
        self.last_mtp = mtp_step_summary(mtp, mtp_counts, self.device) if mtp else {}
        loss, bad_ranks, z_sum = self._agree_on_step(loss_sum, z_loss.pop() if z_loss else 0.0)
        loss /= global_tokens
        self.last_z_loss = z_sum / global_tokens if z_loss else None
        if bad_ranks:
            if scfg.training.nan_policy == "stop":
                raise NonFiniteLoss(f"non-finite loss {loss} at iteration {self.state.iteration} on rank(s) "
                                    f"{bad_ranks}; stopping (training.nan_policy = 'skip' skips such steps instead)")
            optimizer.zero_grad()
            return None, False, None
        updated, grad_norm = optimizer.step()
        if updated and moe is not None:  # DeepSeek-V3's balancing bias, from the loads moe_step_summary summed
            update_expert_bias(self.chunks, moe, self.model_cfg)
        return loss, updated, grad_norm

    def _agree_on_step(self, loss_sum, z_loss_sum=0.0):
        """One all-reduce: the global batch's loss and z-loss sums (from the last stage's TP rank 0 of every DP
        replica), which ranks saw a non-finite loss, whether any rank was asked to stop, and how many ranks have
        finished writing an asynchronous checkpoint (all of them: it is published now, on every rank)."""
        owner = ps.is_pipeline_last_stage() and ps.get_tp_rank() == 0  # every CP rank: its own tokens
        vote = StepVote(loss_sum=float(loss_sum) if owner else 0.0, z_loss_sum=float(z_loss_sum) if owner else 0.0,
                        stop_requested=self.stop_requested, write_done=self.checkpointer.write_done())
        verdict = agree_on_step(vote, self.device)
        self.stop_requested = verdict.stop_requested
        self.checkpointer.poll(verdict.every_write_done)
        return verdict.loss_sum, verdict.non_finite_ranks, verdict.z_loss_sum

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset, scfg):
        """Mean token loss over ``eval_iters`` global batches of ``dataset`` (forward only)."""
        t = scfg.training
        gbs, mbs, seq = t.global_batch_size, t.micro_batch_size, scfg.model.seq_length
        for c in self.chunks:
            c.eval()
        total, tokens = 0.0, 0.0
        for k in range(t.eval_iters):
            indices = data_lib.global_batch_indices(k * gbs, gbs, ps.get_dp_rank(), self.dp)
            mbatches = data_lib.microbatches(dataset, indices, mbs, self.device, self._masking(scfg))
            total += self._agree_on_step(forward_only(self.chunks, mbatches))[0]
            tokens += self._tokens_with_loss(mbatches, gbs * seq)
        for c in self.chunks:
            c.train()
        return total / tokens

    def _masking(self, scfg):
        return data_lib.DocumentMasking.from_config(scfg.data, self.eod)

    def _tokens_with_loss(self, mbatches, every):
        """How many tokens of the global batch carry loss: all of them (``every``), unless
        data.eod_mask_loss masks some: then the data-parallel replicas' counts, summed by one all-reduce
        (every TP, CP and pipeline rank of a replica counted the same whole sequences)."""
        if not mbatches or "loss_tokens" not in mbatches[0]:
            return every
        count = torch.tensor([float(sum(mb["loss_tokens"] for mb in mbatches))], dtype=torch.float64,
                             device=self.device)
        if self.dp > 1:
            dist.all_reduce(count, group=ps.get_dp_group())
        return max(float(count), 1.0)  # a batch of end-of-document tokens only: loss 0, not 0/0

    # -- the run ----------------------------------------------------------------------------------------
    def close(self):
        """Ends the run's communication in order on every rank (parallel_state.shutdown), after any ZeRO-1
        parameter all-gather still in flight (destroying a communicator under one can hang)."""
        for chunk in self.chunks or []:
            if hasattr(chunk, "finish_param_gather"):
                chunk.finish_param_gather()
        ps.shutdown()

    def _on_signal(self, signum, frame):
        self.stop_requested = True
        if self.rank == 0:
            print(f"megagopher: got {signal.Signals(signum).name}; stopping after this step (with a checkpoint "
                  "if it trained one since the last)", flush=True)

    def run(self):
        cfg = self.cfg
        run_dir = cfg.run.dir
        if self.rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            tmp = os.path.join(run_dir, "config.toml.tmp")
            with open(tmp, "w") as f:
                f.write(to_toml(cfg))
            os.replace(tmp, os.path.join(run_dir, "config.toml"))
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        # Every rank computes the report (no communication), so if it ever raises it raises everywhere,
        # never on rank 0 alone while the others wait in the next collective (invariant 6). It splits the
        # model as it is now built: parallel.pp_layers only at the configured depth.
        parallel = dataclasses.replace(cfg.parallel, pp_layers=cfg.pp_layers_at(self.state.num_layers))
        report = memory_report(self.model_cfg, parallel, cfg.training, cfg.optimizer,
                               world_size=self.world_size, device=self.device.type)
        if self.rank == 0:
            print(f"megagopher: {report['line']}", flush=True)
        logger, error = None, None
        try:  # rank 0 alone writes metrics; its verdict on the file reaches every rank before training
            logger = MetricsLogger(run_dir, self.rank == 0, cfg.run.tensorboard, device_name,
                                   resume_iteration=self.state.iteration, run_config=cfg)
        except InputError as e:
            error = e
        if not agree(error is None):
            raise error or InputError(f"{os.path.join(run_dir, 'metrics.jsonl')} cannot be used (see rank 0)")
        try:
            with kernels.use_backend(cfg.training.kernel_backend):
                self._run_stages(logger)
            self.checkpointer.wait()  # the run ends with its last checkpoint published
        except NonFiniteLoss:  # agreed by every rank, so the collective wait is safe
            self.checkpointer.wait()
            raise
        finally:
            logger.close()
        if cfg.parallel.trace:
            self.tracer.save(os.path.join(run_dir, "pipeline_trace.json"))

    def _run_stages(self, logger):
        cfg = self.cfg
        skip_finished_stages(cfg, self.state)
        if self.state.stage_index >= len(cfg.stages):
            if self.rank == 0:
                print(f"megagopher: nothing left to do: the checkpoint at iteration {self.state.iteration} finished "
                      "every stage (raise training.train_iters or add a stage to train on)", flush=True)
            return
        clock = {"total_iters": sum(st.train_iters for st in cfg.stages), "start": time.perf_counter(), "steps": 0}
        for stage_index in range(self.state.stage_index, len(cfg.stages)):
            self.state.stage_index = stage_index
            if not self._run_stage(stage_index, logger, clock):
                return
            # Every stage ends with a checkpoint of the stage with all its steps done: the next stage, or
            # the same one given more steps, starts from it.
            self.save()
            self.checkpointer.wait()
            self.state.next_stage()
            if cfg.run.stop_after_stage == cfg.stages[stage_index].name and stage_index + 1 < len(cfg.stages):
                if self.rank == 0:
                    print(f"megagopher: stopping after stage {cfg.stages[stage_index].name!r} "
                          "(run.stop_after_stage); run again without it, in the next stage's layout, to resume "
                          f"with stage {cfg.stages[stage_index + 1].name!r}", flush=True)
                return

    def _start_stage(self, stage_index):
        """Growth, data and optimizer of a stage (fresh unless the stage keeps the previous one's)."""
        stage, scfg = self.cfg.stages[stage_index], self.cfg.stage(stage_index)
        t, o = scfg.training, scfg.optimizer
        now = (self.state.num_layers, self.state.num_experts)
        grown = (stage.grow.get("num_layers", now[0]), stage.grow.get("num_experts", now[1]))
        if self.state.stage_iteration == 0 and grown != now:
            self.chunks = self._wrap(grow(self.cfg, self.state, self.chunks, self._build_model, *grown))
            self.optimizer = None
            # A grown model starts a fresh optimizer (as an uninterrupted run does): the saved state is
            # for the old depth's parameters (upcycled experts start with fresh moments too).
            self.pending_optimizer = None
        self._set_context(scfg.model)
        datasets = data_lib.build_datasets(scfg, self.vocab_size, t.train_iters)
        keep = stage.keep_optimizer if stage.keep_optimizer is not None else self.cfg.checkpoint.keep_optimizer
        keep = keep or stage_index == 0
        fresh_stage = self.state.stage_iteration == 0
        if self.optimizer is None or (fresh_stage and not keep):
            self.optimizer = build_optimizer(self.chunks, o, t)
        if self.pending_optimizer is not None:
            if not fresh_stage or keep:
                ckpt.load_optimizer(self.pending_optimizer, self.chunks, self.optimizer)
            self.pending_optimizer = None
        schedule = LRSchedule(o.lr, o.min_lr, o.warmup_iters, max(1, t.train_iters), o.decay, o.warmup_init_lr,
                              o.wsd_decay_fraction)
        return stage, scfg, datasets, schedule

    def _set_context(self, stage_model):
        """A stage may extend the context (model.seq_length, model.rope_theta): the model computes its rotary
        tables from its config at each forward, so the stage's rope_theta goes there."""
        if stage_model.rope_theta == self.model_cfg.rope_theta:
            return
        self.model_cfg = dataclasses.replace(self.model_cfg, rope_theta=stage_model.rope_theta)
        for chunk in self.chunks:
            unwrap_model(chunk).cfg = self.model_cfg

    def _run_stage(self, stage_index, logger, clock):
        """The steps of one stage; False when the run stops early (signal or exit_after_iters)."""
        stage, scfg, (train_ds, valid_ds), schedule = self._start_stage(stage_index)
        if not agree(not self.stop_requested):  # a signal during start-up, data building or growth
            if self.rank == 0:
                print(f"megagopher: stopping before the first step of stage {stage.name!r} at iteration "
                      f"{self.state.iteration}; nothing new to save", flush=True)
            return False
        t = scfg.training
        batches = data_lib.Prefetcher(train_ds, t.micro_batch_size, self.device, self._masking(scfg),
                                      mtp_depth=self.model_cfg.mtp_num_layers)
        try:
            return self._stage_steps(stage, scfg, schedule, batches, valid_ds, logger, clock)
        finally:
            batches.close()

    def _stage_steps(self, stage, scfg, schedule, batches, valid_ds, logger, clock):
        """The step loop of ``_run_stage``: steps, logging, evaluation, interval and stop saves."""
        t = scfg.training
        flops_per_token = model_flops_per_token(self.model_cfg, scfg.model.seq_length, t.recompute)
        exit_after, interval = self.cfg.training.exit_after_iters, self.cfg.checkpoint.save_interval

        def batch_size(consumed):
            return global_batch_size_at(consumed, t.global_batch_size, t.rampup_batch_size, t.micro_batch_size,
                                        self.dp)
        while self.state.stage_iteration < t.train_iters:
            self.state.stage_iteration += 1
            self.state.iteration += 1
            lr = schedule(self.state.stage_iteration)
            self.optimizer.set_lr(lr)
            start = time.perf_counter()
            gbs = batch_size(self.state.stage_samples)
            following = self.state.stage_samples + gbs
            next_batch = (following, batch_size(following)) if self.state.stage_iteration < t.train_iters else None
            loss, updated, grad_norm = self.train_step(batches, scfg, self.state.stage_samples, gbs, next_batch)
            self.state.stage_samples += gbs
            clock["steps"] += 1
            row = self._metrics_row(stage, scfg, lr, gbs, (loss, updated, grad_norm), start, flops_per_token)
            self._log(logger, row, t, clock)
            if valid_ds is not None and t.eval_interval and (
                    self.state.stage_iteration % t.eval_interval == 0 or self.state.stage_iteration == t.train_iters):
                logger.log_eval({"iteration": self.state.iteration, "stage": stage.name,
                                 "loss": self.evaluate(valid_ds, scfg)})
            if self.stop_requested or (exit_after and clock["steps"] >= exit_after):
                self.save()
                if self.rank == 0:
                    print(f"megagopher: stopping at iteration {self.state.iteration} after saving", flush=True)
                return False
            if interval and self.state.iteration % interval == 0 and self.state.stage_iteration < t.train_iters:
                self.save()
        return True

    def _metrics_row(self, stage, scfg, lr, gbs, outcome, start, flops_per_token):
        """One metrics.jsonl row (docs/ARCHITECTURE.md 4.3) for the step that began at ``start``."""
        loss, updated, grad_norm = outcome
        params_norm = self.optimizer.params_norm() if scfg.training.log_params_norm else None
        step_time = time.perf_counter() - start
        tokens = gbs * scfg.model.seq_length
        self.state.consumed_tokens += tokens
        self.state.skipped_total += int(not updated)
        row = {"iteration": self.state.iteration, "stage": stage.name, "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "loss_scale": self.optimizer.loss_scale, "skipped": not updated,
               "tokens": self.state.consumed_tokens, "step_time_s": step_time, "tokens_per_s": tokens / step_time,
               "tflops_per_device": flops_per_token * tokens / step_time / self.world_size / 1e12,
               "skipped_total": self.state.skipped_total, "global_batch_size": gbs}
        if params_norm is not None:
            row["params_norm"] = params_norm
        if self.last_z_loss is not None:
            row["z_loss"] = self.last_z_loss
        row.update(self.last_moe)
        row.update(self.last_mtp)
        return row

    def _log(self, logger, row, t, clock):
        per_step = (time.perf_counter() - clock["start"]) / clock["steps"]
        console = self.state.stage_iteration % t.log_interval == 0 or self.state.stage_iteration == t.train_iters
        memory = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        logger.log_step(row, console, (self.state.stage_iteration, t.train_iters, per_step),
                        (self.state.iteration, clock["total_iters"], per_step), memory)
