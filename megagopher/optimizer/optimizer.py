"""The optimizer step of a training iteration: mixed precision, ZeRO-1 sharding, global-norm clipping,
AdamW. After Megatron-Core's Float16OptimizerWithFloat16Params and DistributedOptimizer, folded into one
class because they differ only in *which part* of the flat buffers a rank updates.

The trainer talks to it through a small interface, whatever the precision or sharding behind it:
    scale_loss(loss)   the loss to backpropagate (the fp16 loss scaler multiplies here)
    step()             -> (updated, grad_norm): unscales, checks for inf/NaN on every rank (fp16), computes
                       the global gradient norm (invariant 4), clips, runs AdamW, writes the parameters
                       back (under ZeRO-1 by launching each bucket's all-gather, waited on at the bucket's
                       first use in the next forward pass). A skipped step returns (False, None).
    finish_param_gather()  waits for those all-gathers: call it before reading or writing the parameters
                       outside a forward pass (checkpoint saving, copying weights, the end of training).
    zero_grad(), set_lr(lr), loss_scale (None unless fp16), params_norm(), state_dict(), load_state_dict()

How it works. The data-parallel wrapper keeps each chunk's parameters and fp32 gradients in flat buffers
(distributed/param_and_grad_buffer.py). The optimizer works on *shards*: contiguous ranges of those
buffers. Without the distributed optimizer a rank's one shard is the whole buffer; with it (ZeRO-1,
Rajbhandari et al. 2020) it is this rank's 1/dp of every bucket, whose gradient the reduce-scatter has
just summed. Per shard it holds the fp32 master weights and Adam's two moments, flat, and updates them
elementwise; weight decay is applied only to the ranges of matrices (never to biases and norm weights,
as in Megatron-LM), and only ranges of parameters this rank "counts" enter the norm (clip.counts_once).

Memory per parameter (Megatron's accounting; Korthikanti et al. keep the same table), d = data-parallel size:
    precision  params  grads  master  moments    non-distributed   distributed
    fp32         4       4      -        8           16              8 + 8/d
    bf16/fp16    2       4      4        8           18              6 + 12/d
fp32 models need no master copy: the fp32 parameters are updated in place.
"""
import math

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import PRECISION_DTYPES
from megagopher.config.schema import coerce
from megagopher.distributed.ddp import DistributedDataParallel
from megagopher.distributed.param_and_grad_buffer import ParamAndGradBuffer
from megagopher.optimizer.clip import clip_by_norm, counts_once, global_norm_of_parts
from megagopher.optimizer.grad_scaler import DynamicLossScaler

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


def _merge(ranges):
    """Joins touching [lo, hi) ranges (sorted) so the update runs one op per run of parameters."""
    out = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _complement(ranges, size):
    """The ranges of [0, size) that ``ranges`` (sorted, disjoint) leave out."""
    out, at = [], 0
    for lo, hi in ranges:
        if lo > at:
            out.append((at, lo))
        at = hi
    return out + ([(at, size)] if at < size else [])


def _views(shard, ranges):
    """(master, grad, exp_avg, exp_avg_sq) lists of views of ``shard``'s flat tensors over ``ranges``."""
    tensors = (shard.master, shard.grad, shard.exp_avg, shard.exp_avg_sq)
    return tuple([t[lo:hi] for lo, hi in ranges] for t in tensors)


# torch's fused AdamW kernel (what torch.optim.AdamW(fused=True) runs): one pass over the flat buffers instead
# of five, on the devices that have it; elsewhere the same arithmetic as separate tensor ops.
_FUSED_DEVICES = ("cpu", "cuda") if hasattr(torch, "_fused_adamw_") else ()


class _Shard:
    """One contiguous range [start, end) of a buffer that this rank updates, and its optimizer state."""

    def __init__(self, buffer, start, end):
        self.buffer, self.start, self.end = buffer, start, end
        self.model_params = buffer.param_data[start:end]
        self.grad = buffer.grad_data[start:end]
        if buffer.dtype == torch.float32:
            self.master = self.model_params  # the fp32 parameters are their own master weights
        else:
            self.master = self.model_params.detach().float().clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        decay, counted = [], []
        for p in sorted(buffer.params, key=lambda q: buffer.param_range[id(q)][0]):
            p_lo, p_hi = buffer.param_range[id(p)]
            lo, hi = max(p_lo, start) - start, min(p_hi, end) - start
            if lo >= hi:
                continue
            if p.ndim > 1:
                decay.append((lo, hi))
            if counts_once(p):
                counted.append((lo, hi))
        self.decay_ranges, self.norm_ranges = _merge(decay), _merge(counted)
        # The fused step's operands, made once: views of the flat tensors, the matrices' ranges (decayed) and
        # the rest, and the step count as the one-element tensor the kernel reads (refilled, not reallocated).
        self.groups = [_views(self, self.decay_ranges), _views(self, _complement(self.decay_ranges, end - start))]
        self.step_tensor = torch.zeros((), dtype=torch.float32, device=self.master.device)

    @property
    def has_master_copy(self):
        return self.master is not self.model_params


class Optimizer:
    """AdamW over the flat fp32 shards of the model chunks' buffers (see the module docstring)."""

    def __init__(self, model_chunks, lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, clip_grad=1.0,
                 distributed=False, loss_scaler=None):
        self.chunks = list(model_chunks)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, (beta1, beta2), eps
        self.clip_grad, self.distributed, self.scaler = clip_grad, distributed, loss_scaler
        self.buffers, self._unwrapped = [], []
        for chunk in self.chunks:
            if isinstance(chunk, DistributedDataParallel):
                if chunk.use_distributed_optimizer != distributed:
                    raise ValueError(f"optimizer.distributed = {distributed} but the model chunks were wrapped "
                                     f"with distributed_optimizer={chunk.use_distributed_optimizer}")
                self.buffers.extend(chunk.grad_buffers)
            else:
                # A model without the data-parallel wrapper: give it a local buffer (no communication)
                # and copy its .grad in at step time.
                if distributed and ps.get_dp_size() > 1:
                    raise ValueError("optimizer.distributed = true needs the model chunks wrapped by "
                                     "megagopher.distributed.wrap_data_parallel(..., distributed_optimizer=True)")
                params = [p for p in chunk.parameters() if p.requires_grad]
                buffer = ParamAndGradBuffer(params, expose_main_grad=False)
                self.buffers.append(buffer)
                self._unwrapped.append(buffer)
        self.shards = [_Shard(b, lo, hi) for b in self.buffers for lo, hi in b.owned_ranges()]
        self.step_count = 0

    def _norm(self, tensor_of):
        """The global L2 norm of ``tensor_of(shard)`` over the counted ranges (clip.global_norm). Shards of
        a distributed optimizer are disjoint over their buffer's group (dense: DP x CP, experts: expert DP
        x CP), and the ranks of an expert-parallel group hold different experts: the squares are summed
        over those groups too."""
        dense, expert = [], []
        for s in self.shards:
            (expert if s.buffer.expert else dense).extend(tensor_of(s)[lo:hi] for lo, hi in s.norm_ranges)
        sharded = self.distributed and ps.get_dp_size() * ps.get_cp_size() > 1
        parts = [(dense, [ps.get_dp_cp_group()] if sharded else [])]
        # Every rank passes the same parts: a stage without MoE layers (first_k_dense, moe_layer_freq) has no
        # expert shards but joins the expert part's all-reduce over the model-parallel group all the same.
        if ps.get_ep_size() > 1 or any(s.buffer.expert for s in self.shards):
            parts.append((expert, ([ps.get_expert_dp_group()] if self.distributed else []) + [ps.get_ep_group()]))
        return global_norm_of_parts(parts)

    # -- the trainer's interface -------------------------------------------------------------------

    @property
    def loss_scale(self):
        return self.scaler.scale if self.scaler is not None else None

    def scale_loss(self, loss):
        return loss * self.scaler.scale if self.scaler is not None else loss

    def set_lr(self, lr):
        self.lr = lr

    def zero_grad(self):
        for chunk in self.chunks:
            if isinstance(chunk, DistributedDataParallel):
                chunk.zero_grad_buffer()
            else:
                for p in chunk.parameters():
                    p.grad = None
        for buffer in self._unwrapped:
            buffer.grad_data.zero_()

    @torch.no_grad()
    def step(self):
        self.finish_param_gather()  # a bucket no forward pass used: its gather must not land on the update
        self._collect_unwrapped_grads()
        grads = [s.grad for s in self.shards]
        if self.scaler is not None:
            for g in grads:
                g.mul_(1.0 / self.scaler.scale)
            found_inf = self._found_inf_anywhere(grads)
            self.scaler.update(found_inf)
            if found_inf:  # every rank agrees, so every rank skips, and the parameters stay replicated
                return False, None
        norm = self._norm(lambda s: s.grad)
        clip_by_norm(grads, norm, self.clip_grad)
        self.step_count += 1
        for shard in self.shards:
            self._adamw(shard)
            if shard.has_master_copy:
                shard.model_params.copy_(shard.master)
        for chunk in self.chunks:  # chunk 0 first: its forward runs first
            if isinstance(chunk, DistributedDataParallel):
                chunk.start_param_gather()
        for buffer in self._unwrapped:
            buffer.all_gather_params()
        return True, float(norm)

    def finish_param_gather(self):
        """Waits for the ZeRO-1 parameter all-gathers still in flight (none without ZeRO-1)."""
        for buffer in self.buffers:
            buffer.finish_param_sync()

    def _finish_gather_if_master_is_model(self):
        """fp32 master weights *are* the parameter buffer that the all-gather writes: wait before touching
        them. 16-bit models keep separate masters, which the gather never writes, so the overlap is kept."""
        if any(not s.has_master_copy for s in self.shards):
            self.finish_param_gather()

    @torch.no_grad()
    def params_norm(self):
        """The global L2 norm of the (master) parameters, each counted once. Collective."""
        self._finish_gather_if_master_is_model()
        return float(self._norm(lambda s: s.master))

    # -- internals ---------------------------------------------------------------------------------

    def _collect_unwrapped_grads(self):
        for buffer in self._unwrapped:
            for p in buffer.params:
                if p.grad is not None:
                    lo, hi = buffer.param_range[id(p)]
                    buffer.grad_data[lo:hi].copy_(p.grad.reshape(-1))

    def _found_inf_anywhere(self, grads):
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else ps.get_device())
        for g in grads:
            found = torch.maximum(found, (~torch.isfinite(g)).any().float())
        if ps.is_initialized():  # model-parallel x data-parallel covers every rank
            for group in (ps.get_model_parallel_group(), ps.get_dp_cp_group()):
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())

    def _adamw(self, s):
        """Decoupled weight decay (Loshchilov & Hutter 2019), the arithmetic of torch.optim.AdamW: its fused
        kernel over the shard's decayed (matrices) and undecayed views where the device has one."""
        if s.master.device.type not in _FUSED_DEVICES:
            return self._adamw_unfused(s)
        s.step_tensor.fill_(self.step_count)
        for (params, grads, exp_avgs, exp_avg_sqs), decay in zip(s.groups, (self.weight_decay, 0.0)):
            if params:
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [s.step_tensor] * len(params),
                                    lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=decay,
                                    eps=self.eps, amsgrad=False, maximize=False)

    def _adamw_unfused(self, s):
        """The same step as separate tensor ops (devices without torch's fused kernel)."""
        lr, (beta1, beta2), t = self.lr, self.betas, self.step_count
        if self.weight_decay:
            for lo, hi in s.decay_ranges:
                s.master[lo:hi].mul_(1.0 - lr * self.weight_decay)
        s.exp_avg.lerp_(s.grad, 1.0 - beta1)
        s.exp_avg_sq.mul_(beta2).addcmul_(s.grad, s.grad, value=1.0 - beta2)
        denom = (s.exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(self.eps)
        s.master.addcdiv_(s.exp_avg, denom, value=-lr / (1.0 - beta1 ** t))

    # -- checkpoints -------------------------------------------------------------------------------
    # state_dict() is this rank's shards as they are (resuming needs the same layout). Checkpoints do not
    # use it: training/ckpt_save.py writes ranges of the shards (self.shards) where they are, indexed by
    # parameter name, and training/ckpt_load.py reads them back under any dp, ZeRO-1 setting or TP size.

    def scalar_state(self):
        """The non-tensor state (JSON-able): the step count and the loss scaler's."""
        return {"step": self.step_count, "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_scalar_state(self, state):
        if not state:
            return
        self.step_count = int(state["step"])
        if self.scaler is not None and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])

    def _layout(self):
        return {"distributed": self.distributed, "dp_size": ps.get_dp_size() * ps.get_cp_size(),
                "shards": [(s.start, s.end) for s in self.shards],
                "buffer_numel": [b.numel for b in self.buffers]}

    def state_dict(self):
        """This rank's optimizer state as it is (its shards only, under ZeRO-1): fp32 master weights, Adam
        moments, step count, loss-scaler state. The moments are references; a master that is a view of the
        fp32 parameters is copied (saving a view would save the whole parameter buffer)."""
        def shard_state(s):
            return {"master": s.master if s.has_master_copy else s.master.clone(), "exp_avg": s.exp_avg,
                    "exp_avg_sq": s.exp_avg_sq}
        self._finish_gather_if_master_is_model()
        return {**self.scalar_state(), "layout": self._layout(), "dp_rank": ps.get_dp_rank(),
                "shards": [shard_state(s) for s in self.shards]}

    @torch.no_grad()
    def load_state_dict(self, state):
        if state["layout"] != self._layout():
            raise ValueError(f"optimizer state was saved with layout {state['layout']}, this run has "
                             f"{self._layout()}: state_dict() needs the same layout (dp, optimizer.distributed, "
                             "model); training/checkpoint.py reshards")
        self._finish_gather_if_master_is_model()
        for shard, saved in zip(self.shards, state["shards"]):
            for key in STATE_KEYS:
                getattr(shard, key).copy_(saved[key])
        self.load_scalar_state(state)

    def state_bytes(self):
        """Bytes of the tensors the optimizer holds beyond the model's own (master copies, moments)."""
        total = 0
        for s in self.shards:
            tensors = [s.exp_avg, s.exp_avg_sq] + ([s.master] if s.has_master_copy else [])
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def build_optimizer(model_chunks, opt_cfg=None, training_cfg=None):
    """``opt_cfg``: the ``[optimizer]`` section; ``training_cfg``: ``[training]`` (precision and loss-scaler
    keys). Each is a section object or a dict of some of its keys (checked like a config file's; missing
    keys take their defaults). Call after wrap_data_parallel and after casting the chunks."""
    o, t = coerce("optimizer", opt_cfg), coerce("training", training_cfg)
    dtype = PRECISION_DTYPES[t.precision]
    dtypes = {p.dtype for c in model_chunks for p in c.parameters() if p.requires_grad}
    if dtypes != {dtype}:
        raise ValueError(f"training.precision = {t.precision!r} expects {dtype} parameters but the "
                         f"model has {sorted(map(str, dtypes))}: cast the chunks (chunk.to(dtype)) before "
                         "wrap_data_parallel and build_optimizer")
    scaler = None
    if t.precision == "fp16":
        scaler = DynamicLossScaler(initial_scale=t.initial_loss_scale, min_scale=t.min_loss_scale,
                                   growth_interval=t.loss_scale_window, hysteresis=t.hysteresis)
    return Optimizer(model_chunks, lr=o.lr, weight_decay=o.weight_decay, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                     clip_grad=o.clip_grad, distributed=o.distributed, loss_scaler=scaler)
