"""Point-to-point communication between neighbouring pipeline stages (after Megatron-LM's p2p_communication).

Activations travel forward (to the next stage) and their gradients backward (to the previous stage). Both
have a shape known in advance, [s / tp under sequence parallelism else s, micro_batch_size, hidden], so a
receiver allocates its buffer without a handshake (``activation_shape``).

Every exchange is one ``batch_isend_irecv`` that posts its operations in a canonical order: the activation
(send to next, receive from previous) before the gradient (send to previous, receive from next). Two
neighbours therefore pair their messages the same way on gloo and on NCCL, even when pp = 2 makes the
previous and the next stage the same rank; tags (0 activations, 1 gradients) separate them where the
backend supports tags. ``communicate`` is Megatron's ``_communicate``: one call covers the one-way exchanges of warm-up and
cool-down and the combined ones of the steady state (Megatron's ``send_forward_recv_backward`` and its
mirror are ``communicate(send_next=..., recv_next=True)`` and ``communicate(send_prev=..., recv_prev=True)``).

``communicate(..., wait=False)`` returns an ``Exchange`` whose ``wait()`` gives the received tensors: the
schedules post sends and receives as soon as they know them and wait only when they use the data.
"""
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps

ACTIVATION_TAG, GRADIENT_TAG = 0, 1
_initialised_groups = set()


def activation_shape(seq_length, micro_batch_size, hidden_size, sequence_parallel=False, tp=1):
    """The shape of the hidden states between stages: [s(/tp), b, h]."""
    if sequence_parallel and tp > 1:
        if seq_length % tp:
            raise ValueError(f"model.seq_length = {seq_length} is not divisible by parallel.tp = {tp} "
                             "(sequence parallelism splits the sequence between pipeline stages)")
        seq_length //= tp
    return (seq_length, micro_batch_size, hidden_size)


class Exchange:
    """The pending operations of one batch; ``wait()`` returns (from_previous, from_next)."""

    def __init__(self, works, from_prev, from_next, keep_alive):
        self.works, self.from_prev, self.from_next = works, from_prev, from_next
        self._keep_alive = keep_alive  # send buffers must live until the sends complete

    def is_completed(self):
        if all(w.is_completed() for w in self.works):
            # Done: let the send buffers go now rather than at wait(). A stage's freed output lives on only
            # in its send buffer (schedules.py), and an exchange holding a receive may wait for a while.
            self.works, self._keep_alive = [], None
            return True
        return False

    def wait(self):
        for w in self.works:
            w.wait()
        self.works, self._keep_alive = [], None
        return self.from_prev, self.from_next


def _ensure_initialised(group, device):
    """NCCL creates a communicator lazily; a first collective over the whole pipeline group makes the
    first batched point-to-point call safe even when only some ranks of the group take part in it."""
    if dist.get_backend(group) != "nccl" or id(group) in _initialised_groups:
        return
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    _initialised_groups.add(id(group))


def communicate(send_next=None, send_prev=None, recv_prev=False, recv_next=False, shape=None,
                dtype=torch.float32, device=None, wait=True):
    """Sends ``send_next`` to the next stage and ``send_prev`` to the previous one, and receives a tensor
    of ``shape`` from the previous (``recv_prev``) and/or the next (``recv_next``) stage, in one batch.
    Returns (from_prev, from_next) (None where nothing was received), or an Exchange if not ``wait``."""
    group = ps.get_pp_group()
    device = device if device is not None else ps.get_device()
    next_rank, prev_rank = ps.get_pp_next_rank(), ps.get_pp_prev_rank()
    from_prev = torch.empty(shape, dtype=dtype, device=device) if recv_prev else None
    from_next = torch.empty(shape, dtype=dtype, device=device) if recv_next else None
    sends = [t.contiguous() if t is not None else None for t in (send_next, send_prev)]
    ops = []
    if sends[0] is not None:
        ops.append(dist.P2POp(dist.isend, sends[0], next_rank, group, ACTIVATION_TAG))
    if from_prev is not None:
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank, group, ACTIVATION_TAG))
    if sends[1] is not None:
        ops.append(dist.P2POp(dist.isend, sends[1], prev_rank, group, GRADIENT_TAG))
    if from_next is not None:
        ops.append(dist.P2POp(dist.irecv, from_next, next_rank, group, GRADIENT_TAG))
    works = []
    if ops:
        _ensure_initialised(group, device)
        works = dist.batch_isend_irecv(ops)
    exchange = Exchange(works, from_prev, from_next, sends)
    return exchange.wait() if wait else exchange

