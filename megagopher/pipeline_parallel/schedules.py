"""Forward-backward schedules over the micro-batches of one global batch.

``forward_backward(model_chunks, microbatches, loss_fn, schedule)`` is the one entry point the trainer
calls; ``parallel.schedule`` picks gpipe, 1f1b (PipeDream-Flush), interleaved (virtual stages) or zb-h1
(zero bubble). ``loss_fn(per_token_loss) -> scalar`` turns a micro-batch's per-token losses into what is
backpropagated (the trainer divides by the global batch's token count, invariant 3, and applies the loss
scale). The return value is the sum of the per-token losses this rank computed, a CPU tensor (0 on ranks
without the loss), for logging. Without pipelining (pp = 1) it is plain gradient accumulation.

How a pipeline step runs: plan.py gives every rank's order of F, B and W passes (warm-up / steady state /
cool-down, per schedule) and a shared time-step table. This rank walks its row of the table; after the
pass of step t it posts one batched exchange holding what it produced at step t for a neighbour and the
receives of what the neighbours produced at step t (p2p.py). Receives are waited on only when their
data is used, sends only when their buffer is reused, so ranks run as fast as the data flows while every
send and receive is paired identically on both sides.

Data parallelism: every backward (and ZB-H1 W pass) runs under the data-parallel wrapper's ``no_sync()``
except the last one of each chunk, so gradients are reduced once, after the last micro-batch.

Stage outputs are freed once sent (Megatron's deallocate_output_tensor): the backward pass of a stage
needs its output's autograd node and the gradient the next stage sends back, never the output's values
(the last op of a stage, the residual add, saves nothing). So as soon as the output has been handed to the
send, its storage is swapped for a one-element placeholder expanded to the same shape; the send keeps the
original storage alive until it completes. What a stage then holds for its micro-batches in flight is
exactly what autograd saved (megagopher/memory.py's count), not one more [s, b, h] activation per
micro-batch. The placeholder keeps the output's shape, so ``torch.autograd.backward``'s check of the
gradient's shape still holds (Megatron instead shrinks the output to one element and calls the autograd
engine directly to skip that check).
"""
import contextlib

import torch

from megagopher import parallel_state as ps
from megagopher.common import unwrap_model
from megagopher.model.mtp import mtp_inputs
from megagopher.pipeline_parallel import p2p
from megagopher.pipeline_parallel.plan import (ScheduleError, build_plan, forward_only_plan, memory_bookkeeping,
                                               validate_schedule)
from megagopher.tensor_parallel.weight_grad import store as weight_grad_store

__all__ = ["forward_backward", "forward_only", "forward_backward_no_pipelining", "deallocate_output_tensor",
           "validate_schedule", "ScheduleError", "memory_bookkeeping"]


def _no_sync(chunk, sync):
    """The wrapper's no_sync() unless this pass is the one that should synchronise gradients."""
    if sync or not hasattr(chunk, "no_sync"):
        return contextlib.nullcontext()
    return chunk.no_sync()


def _span(tracer, op, microbatch, chunk):
    return tracer.span(op, microbatch, chunk) if tracer is not None else contextlib.nullcontext()


def deallocate_output_tensor(out, placeholder):
    """Releases ``out``'s storage, keeping its autograd node for the backward pass: its data becomes
    ``placeholder`` (one element of out's dtype) expanded to out's shape. A view is left alone: its bytes
    belong to its base. Were ``out`` saved by the op that made it, autograd would hold its own reference to
    the bytes: the gradients stay right, only nothing is freed."""
    if out is None or out._base is not None:
        return
    out.data = placeholder.view((1,) * out.ndim).expand(out.shape)


def document_inputs(microbatch):
    """The model inputs of a micro-batch besides tokens and labels: document masking's position ids and
    packed-document boundaries (training/data.py), present only when the run masks documents."""
    return {k: microbatch[k] for k in ("position_ids", "cu_seqlens") if k in microbatch}


def forward_backward_no_pipelining(model_chunks, microbatches, loss_fn, tracer=None, stats=None, meter=None):
    """pp = 1: plain gradient accumulation over the micro-batches."""
    if len(model_chunks) != 1:
        raise ValueError(f"without pipelining there is one model chunk, got {len(model_chunks)}")
    chunk = model_chunks[0]
    total = torch.zeros((), device=microbatches[0]["tokens"].device) if microbatches else torch.zeros(())
    for i, mb in enumerate(microbatches):
        last = i == len(microbatches) - 1
        with _no_sync(chunk, last):
            with _span(tracer, "F", i, 0):
                per_token = chunk(input_ids=mb["tokens"], labels=mb["labels"], **document_inputs(mb),
                                  **mtp_inputs(mb))
                loss = loss_fn(per_token)
            if meter is not None:
                meter.sample([])  # the micro-batch's saved tensors are all that is held
            with _span(tracer, "B", i, 0):
                loss.backward()
        total += per_token.detach().float().sum()  # on the device: no synchronisation per micro-batch
    if stats is not None:
        stats.update(order=[op for i in range(len(microbatches)) for op in (("F", i, 0), ("B", i, 0))],
                     peak={"activations": 1, "deferred_w": 0, "total": 1})
    return total.cpu()


def forward_backward(model_chunks, microbatches, loss_fn, schedule="1f1b", tracer=None, tensor_shape=None,
                     dtype=None, stats=None, meter=None, deallocate_outputs=True):
    """Runs the forward and backward passes of every micro-batch on this rank's model chunks.

    tensor_shape: shape of the activations between stages (default: from the model's config and the
                  micro-batch, [s(/tp), b, h]); dtype: their dtype (default: the model's parameters').
    stats: a dict to fill with this rank's order of passes and the peak number of micro-batches alive
           ("activations": forward done, backward not; "deferred_w": ZB-H1 W passes pending).
    meter: an object whose ``sample(held)`` is called after every pass with the tensors the runtime keeps
           for later backward passes (stage inputs and outputs); memory.ActivationMeter measures with it.
    deallocate_outputs: free each stage output's storage once it is sent (the module docstring); False
           keeps them, only to measure what that costs.
    """
    if tracer is not None and hasattr(tracer, "begin_step"):
        tracer.begin_step()
    pp, vpp, m = ps.get_pp_size(), len(model_chunks), len(microbatches)
    if vpp != ps.get_vpp_size():
        raise ValueError(f"forward_backward got {vpp} model chunks but parallel.vpp = {ps.get_vpp_size()}")
    _, table = build_plan(schedule, pp, vpp, m)  # validated and built once per (schedule, pp, vpp, m)
    if pp == 1:
        return forward_backward_no_pipelining(model_chunks, microbatches, loss_fn, tracer, stats, meter)
    runtime = _PipelineRuntime(model_chunks, microbatches, loss_fn, table, tracer, tensor_shape, dtype,
                               split_backward=schedule == "zb-h1", meter=meter,
                               deallocate_outputs=deallocate_outputs)
    total = runtime.run()
    if stats is not None:
        stats.update(order=runtime.order, peak=runtime.peak, steps=len(table[0]))
    return total


def forward_only(model_chunks, microbatches, tensor_shape=None, dtype=None):
    """Forward passes only (evaluation): the sum of the per-token losses on the last stage (a CPU tensor,
    0 elsewhere). Runs under torch.no_grad(); the micro-batches flow through the stages as in GPipe."""
    pp, vpp, m = ps.get_pp_size(), len(model_chunks), len(microbatches)
    if vpp != ps.get_vpp_size():
        raise ValueError(f"forward_only got {vpp} model chunks but parallel.vpp = {ps.get_vpp_size()}")
    table = forward_only_plan(pp, vpp, m)
    with torch.no_grad():
        if pp == 1:
            total = torch.zeros((), device=microbatches[0]["tokens"].device)
            for mb in microbatches:
                out = model_chunks[0](input_ids=mb["tokens"], labels=mb["labels"], **document_inputs(mb))
                total += out.float().sum()
            return total.cpu()
        runtime = _PipelineRuntime(model_chunks, microbatches, None, table, None, tensor_shape, dtype,
                                   split_backward=False)
        return runtime.run()


class _PipelineRuntime:
    """One rank's execution of a plan's time-step table."""

    def __init__(self, chunks, microbatches, loss_fn, table, tracer, tensor_shape, dtype, split_backward,
                 meter=None, deallocate_outputs=True):
        self.chunks, self.microbatches, self.loss_fn, self.tracer = chunks, microbatches, loss_fn, tracer
        self.table, self.split_backward, self.meter = table, split_backward, meter
        self.deallocate_outputs = deallocate_outputs
        self.placeholders = {}  # dtype -> the one element every freed output of that dtype points at
        self.pp, self.rank, self.vpp = ps.get_pp_size(), ps.get_pp_rank(), len(chunks)
        self.num_virtual = self.pp * self.vpp
        module = unwrap_model(chunks[0])
        params = [p for p in module.parameters() if p.is_floating_point()]
        self.dtype = dtype or (params[0].dtype if params else torch.float32)
        self.device = microbatches[0]["tokens"].device
        self.shape = tuple(tensor_shape) if tensor_shape is not None else self._default_shape(module)
        self.row = table[self.rank]
        self.order = [op for op in self.row if op is not None]
        # The last B (and W) of each chunk synchronises data-parallel gradients.
        self.last_of = {}
        for kind, mb, c in self.order:
            self.last_of[(kind, c)] = mb
        self.inputs, self.outputs, self.inbox, self.sends = {}, {}, {}, []
        self.peak = {"activations": 0, "deferred_w": 0, "total": 0}
        self.total = torch.zeros((), device=self.device)

    def _default_shape(self, module):
        cfg = getattr(module, "cfg", None)
        if cfg is None:
            raise ValueError("forward_backward: pass tensor_shape= for a model chunk without a GPT config")
        b, s = self.microbatches[0]["tokens"].shape
        return p2p.activation_shape(s, b, cfg.hidden_size, getattr(module, "sp", False), ps.get_tp_size())

    def virtual_stage(self, chunk):
        return chunk * self.pp + self.rank

    def run(self):
        weight_grad_store.clear()
        capture = weight_grad_store.capture() if self.split_backward else contextlib.nullcontext()
        try:
            with capture:
                for step, op in enumerate(self.row):
                    to_next = to_prev = None
                    if op is not None:
                        kind, mb, chunk = op
                        if kind == "F":
                            to_next = self.forward(mb, chunk)
                        elif kind == "B":
                            to_prev = self.backward(mb, chunk)
                        else:
                            self.weight_pass(mb, chunk)
                        self._bookkeep()
                    self._exchange(step, to_next, to_prev)
            for exchange in self.sends:
                exchange.wait()
        finally:
            weight_grad_store.clear()
        if self.inputs or self.outputs or self.inbox:
            raise RuntimeError("pipeline schedule finished with activations or messages left over")
        return self.total.float().cpu()

    def _exchange(self, step, to_next, to_prev):
        """Posts what this rank produced at ``step`` and the receives of what its neighbours produced."""
        prev_op = self.table[(self.rank - 1) % self.pp][step]
        next_op = self.table[(self.rank + 1) % self.pp][step]
        # A neighbour's F on a virtual stage before the last one feeds us; its B on a stage after the first.
        recv_prev = prev_op is not None and prev_op[0] == "F" and \
            prev_op[2] * self.pp + (self.rank - 1) % self.pp < self.num_virtual - 1
        recv_next = next_op is not None and next_op[0] == "B" and \
            next_op[2] * self.pp + (self.rank + 1) % self.pp > 0
        if to_next is None and to_prev is None and not recv_prev and not recv_next:
            return
        self.sends = [e for e in self.sends if not e.is_completed()]
        exchange = p2p.communicate(send_next=to_next, send_prev=to_prev, recv_prev=recv_prev,
                                   recv_next=recv_next, shape=self.shape, dtype=self.dtype,
                                   device=self.device, wait=False)
        if to_next is not None or to_prev is not None:
            self.sends.append(exchange)
        if recv_prev:  # activation for our next virtual stage: (prev stage + 1) // pp is our chunk
            mb, v = prev_op[1], prev_op[2] * self.pp + (self.rank - 1) % self.pp + 1
            self.inbox[("F", mb, v // self.pp)] = (exchange, 0)
        if recv_next:
            mb, v = next_op[1], next_op[2] * self.pp + (self.rank + 1) % self.pp - 1
            self.inbox[("B", mb, v // self.pp)] = (exchange, 1)

    def _received(self, kind, mb, chunk):
        exchange, index = self.inbox.pop((kind, mb, chunk))
        return exchange.wait()[index]

    def forward(self, mb, chunk):
        v, data = self.virtual_stage(chunk), self.microbatches[mb]
        kwargs = document_inputs(data)  # every stage's attention and rotary positions need them
        x = None
        if v == 0:
            kwargs["input_ids"] = data["tokens"]
        else:
            x = self._received("F", mb, chunk).requires_grad_()
            kwargs["hidden_states"] = x
        last = v == self.num_virtual - 1
        if last:
            kwargs.update(labels=data["labels"], **mtp_inputs(data))  # multi-token prediction's on the last stage
        with _span(self.tracer, "F", mb, chunk):
            out = self.chunks[chunk](**kwargs)
            if last:
                self.total += out.detach().float().sum()
                out = self.loss_fn(out) if self.loss_fn is not None else None
        if torch.is_grad_enabled():  # kept for the backward pass (not in forward_only)
            self.inputs[(mb, chunk)], self.outputs[(mb, chunk)] = x, out
        if last:
            return None
        if tuple(out.shape) != self.shape:
            raise ValueError(f"pipeline stage output has shape {tuple(out.shape)}, expected {self.shape} "
                             "(activation shape between stages)")
        send = out.detach().to(self.dtype)  # shares out's storage (same dtype), which the send keeps alive
        if self.deallocate_outputs and torch.is_grad_enabled():
            if out.dtype not in self.placeholders:
                self.placeholders[out.dtype] = torch.empty(1, dtype=out.dtype, device=out.device)
            deallocate_output_tensor(out, self.placeholders[out.dtype])
        return send

    def backward(self, mb, chunk):
        v = self.virtual_stage(chunk)
        out, x = self.outputs.pop((mb, chunk)), self.inputs.pop((mb, chunk))
        grad = None if v == self.num_virtual - 1 else self._received("B", mb, chunk).to(out.dtype)
        sync = self.last_of[("B", chunk)] == mb
        defer = weight_grad_store.defer() if self.split_backward else contextlib.nullcontext()
        with _no_sync(self.chunks[chunk], sync), defer, _span(self.tracer, "B", mb, chunk):
            torch.autograd.backward(out, grad_tensors=grad)
        if self.split_backward:
            weight_grad_store.flush((mb, chunk))
        if x is None:
            return None
        return (x.grad if x.grad is not None else torch.zeros_like(x)).to(self.dtype)

    def weight_pass(self, mb, chunk):
        sync = self.last_of[("W", chunk)] == mb
        with _no_sync(self.chunks[chunk], sync), _span(self.tracer, "W", mb, chunk):
            weight_grad_store.run((mb, chunk))

    def _bookkeep(self):
        """Micro-batches alive on this rank, from the runtime's own state (not from the plan)."""
        alive, deferred = len(self.outputs), weight_grad_store.pending()
        for key, value in (("activations", alive), ("deferred_w", deferred), ("total", alive + deferred)):
            self.peak[key] = max(self.peak[key], value)
        if self.meter is not None:
            self.meter.sample([t for t in (*self.inputs.values(), *self.outputs.values()) if t is not None])
