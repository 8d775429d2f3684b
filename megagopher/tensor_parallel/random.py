"""Random streams for dropout under tensor parallelism, and activation checkpointing that replays them.

Invariant 5 (after Megatron-LM's CudaRNGStatesTracker, made device-agnostic): dropout applied to a
TP-*sharded* activation (attention probabilities of this rank's heads; sequence-parallel chunks) must use a
different stream on every TP rank, or all ranks would drop the same pattern in different heads; dropout on a
*replicated* activation must use the same stream on every TP rank, or the replicas would diverge. The
default generator plays the shared stream; the tracker holds the per-TP-rank one and swaps it in
inside ``fork()``. Data-parallel replicas use the same seeds, so masks match across DP.

``checkpoint(fn, *args)`` recomputes ``fn`` in the backward pass after restoring the default generator and
every tracked stream to what they were in the forward, so recomputed dropout masks are identical.
"""
import contextlib

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Offset between the shared seed and the per-TP-rank seeds (Megatron uses 2718).
_TP_SEED_OFFSET = 2718


def _get_rng_state(device):
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(state, device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states for one device type; ``fork(name)`` runs a block on the named stream."""

    def __init__(self):
        self.states = {}
        self.device = torch.device("cpu")

    def reset(self, device=None):
        self.states = {}
        if device is not None:
            self.device = torch.device(device)

    def add(self, name, seed):
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_rng_state(self.device)
        torch.manual_seed(seed) if self.device.type == "cpu" else torch.cuda.manual_seed(seed)
        self.states[name] = _get_rng_state(self.device)
        _set_rng_state(saved, self.device)

    def get_states(self):
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states):
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name=MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} was never added (call model_parallel_seed first)")
        saved = _get_rng_state(self.device)
        _set_rng_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_rng_state(self.device)
            _set_rng_state(saved, self.device)


_TRACKER = RNGStatesTracker()


def get_rng_tracker():
    return _TRACKER


def model_parallel_seed(seed, tp_rank, pp_rank=0, device="cpu"):
    """Seeds the shared stream (same on all TP and DP ranks of a pipeline stage) and the per-TP-rank stream.
    Pipeline stages get different offsets so their layers do not replay one another's masks."""
    device = torch.device(device)
    shared = seed + 100 * pp_rank
    torch.manual_seed(shared)
    if device.type == "cuda":
        torch.cuda.manual_seed(shared)
    _TRACKER.reset(device)
    _TRACKER.add(MODEL_PARALLEL_RNG, shared + _TP_SEED_OFFSET + tp_rank)


class _CheckpointFunction(torch.autograd.Function):
    """Runs ``fn`` without saving activations; the backward restores the RNG streams of the forward,
    recomputes, and backpropagates through the recomputation."""

    @staticmethod
    def forward(ctx, fn, device, *args):
        ctx.fn, ctx.device = fn, device
        ctx.rng_state = _get_rng_state(device)
        ctx.tracker_states = _TRACKER.get_states()
        with torch.no_grad():
            outputs = fn(*args)
        tensors = [a for a in args if torch.is_tensor(a)]
        ctx.arg_is_tensor = [torch.is_tensor(a) for a in args]
        ctx.non_tensors = [a for a in args if not torch.is_tensor(a)]
        ctx.save_for_backward(*tensors)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        tensors = iter(ctx.saved_tensors)
        non_tensors = iter(ctx.non_tensors)
        args = []
        for is_t in ctx.arg_is_tensor:
            if is_t:
                t = next(tensors)
                d = t.detach()
                d.requires_grad_(t.requires_grad)
                args.append(d)
            else:
                args.append(next(non_tensors))
        # Replay the forward's streams, then put back the ones the backward pass is using now.
        now_rng, now_tracker = _get_rng_state(ctx.device), _TRACKER.get_states()
        _set_rng_state(ctx.rng_state, ctx.device)
        _TRACKER.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*args)
        finally:
            _set_rng_state(now_rng, ctx.device)
            _TRACKER.set_states(now_tracker)
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        in_grads = tuple(a.grad if torch.is_tensor(a) else None for a in args)
        return (None, None) + in_grads


def checkpoint(fn, *args):
    """Activation checkpointing with RNG replay: ``fn(*args)`` is recomputed in the backward pass."""
    device = next((a.device for a in args if torch.is_tensor(a)), torch.device("cpu"))
    return _CheckpointFunction.apply(fn, device, *args)
