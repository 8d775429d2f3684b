"""Pipeline schedules as plans: the order of F, B and W passes on every rank, and a time-step table.

A plan is pure Python (no tensors, no communication), so every rank computes every rank's plan, checks it
before anything communicates (invariant 6), and the tests and the benchmark can reason about it offline.

Operations are ``(op, microbatch, chunk)``: op ``"F"`` (forward), ``"B"`` (backward; with ZB-H1 only the
input-gradient half) or ``"W"`` (ZB-H1's deferred weight-gradient half). Chunk ``c`` on pipeline rank ``r``
is virtual stage ``c * pp + r`` (Narayanan et al. 2021, section 2.2): virtual stages run round-robin over
the ranks, so chunk 0 of every rank comes before chunk 1 of any.

``time_steps(orders, pp, vpp)`` places every rank's operations, in order, on the earliest unit time step
whose inputs were produced on an earlier step (an "as soon as possible" list schedule). The runtime uses
the table only to pair messages: whatever a rank produces at step t for a neighbour, the neighbour posts
the matching receive at its own step t, in the same canonical order, so sends and receives always match
on gloo and on NCCL, and no rank waits on a message that is produced later than the one it needs.
"""

import functools

from megagopher.common import SCHEDULES  # noqa: F401 (the schedule names, re-exported for the tools)
from megagopher.config.validate import ScheduleError, validate_schedule  # the rule, with every other rule


def rank_order(schedule, pp, vpp, num_microbatches, rank):
    """The ordered operations of pipeline rank ``rank`` (validated by the callers: build_plan, simulated_events)."""
    build = {"gpipe": gpipe_order, "1f1b": one_f_one_b_order, "interleaved": interleaved_order,
             "zb-h1": zb_h1_order}[schedule]
    if schedule == "interleaved" and vpp == 1:
        return one_f_one_b_order(pp, num_microbatches, rank)  # interleaving one chunk is 1F1B
    if schedule in ("gpipe", "interleaved"):
        return build(pp, num_microbatches, rank, vpp)
    return build(pp, num_microbatches, rank)


def gpipe_order(pp, m, rank, vpp=1):
    """GPipe (Huang et al. 2019): every forward, then every backward (virtual stages in pipeline order)."""
    forwards = [("F", mb, c) for c in range(vpp) for mb in range(m)]
    backwards = [("B", mb, c) for c in reversed(range(vpp)) for mb in range(m)]
    return forwards + backwards


def one_f_one_b_order(pp, m, rank):
    """PipeDream-Flush (Narayanan et al. 2021): warm-up forwards, then one forward one backward, then the
    cool-down backwards. At most pp - rank micro-batches are in flight."""
    warmup = min(pp - rank - 1, m)
    order = [("F", mb, 0) for mb in range(warmup)]
    for k in range(m - warmup):  # steady state
        order += [("F", warmup + k, 0), ("B", k, 0)]
    order += [("B", mb, 0) for mb in range(m - warmup, m)]  # cool-down
    return order


def zb_h1_order(pp, m, rank):
    """ZB-H1 (Qi et al. 2023, section 3.1): 1F1B's forwards and input-gradient backwards (B) in 1F1B's order,
    with the weight-gradient passes (W) split off. Rank r keeps up to r W passes pending and runs them in
    the cool-down, where 1F1B would idle: the bubble shrinks from (p-1)(F+B+W) to (p-1)(F+B-W), while
    at most pp - rank micro-batches hold full activations (the same as 1F1B)."""
    pending, order = [], []

    def backward(mb):
        order.append(("B", mb, 0))
        pending.append(mb)
        if len(pending) > rank:
            order.append(("W", pending.pop(0), 0))

    warmup = min(pp - rank - 1, m)
    order += [("F", mb, 0) for mb in range(warmup)]
    for k in range(m - warmup):  # steady state: F, B, W
        order.append(("F", warmup + k, 0))
        backward(k)
    for mb in range(m - warmup, m):  # cool-down: B, W, with the deferred W passes filling the bubble
        backward(mb)
    order += [("W", mb, 0) for mb in pending]
    return order


def interleaved_groups(pp, m):
    """Sizes of the groups of micro-batches that go through all chunks together: pp each, except that the
    first group also takes the m % pp left over (m >= pp). A group of at least pp micro-batches keeps rank
    0 busy until the first micro-batch of the group returns for the next chunk, so with the leftover in
    the first group the bubble is the theoretical (p-1) / (v m + p-1) for every m, multiple of pp or not.
    (A short group instead, as in Megatron-Core's table, leaves rank 0 waiting once per chunk.)"""
    return [pp + m % pp] + [pp] * (m // pp - 1)


def interleaved_chunk_order(pp, vpp, m):
    """The (microbatch, chunk) order of forwards on every rank: each group of micro-batches runs through
    chunk 0, then chunk 1, ... Backwards use the same order with the chunks reversed."""
    table, start = [], 0
    for size in interleaved_groups(pp, m):
        table += [(mb, c) for c in range(vpp) for mb in range(start, start + size)]
        start += size
    return table


def interleaved_order(pp, m, rank, vpp):
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2): 1F1B over the m * vpp virtual micro-batches.
    The warm-up runs (vpp - 1) * g forwards everywhere (g: the first group's size) plus 2 per later rank,
    so the first backward of the last virtual stage is ready when rank 0 needs it; the bubble is divided
    by vpp."""
    table = interleaved_chunk_order(pp, vpp, m)
    forwards = [("F", mb, c) for mb, c in table]
    backwards = [("B", mb, vpp - 1 - c) for mb, c in table]
    total = len(table)
    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * interleaved_groups(pp, m)[0], total)
    order = forwards[:warmup]
    for k in range(total - warmup):  # steady state
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[total - warmup:]  # cool-down


def simulate(orders, pp, vpp, durations=None):
    """Runs every rank's operations in order, each as early as its input allows (the pass it needs ended;
    communication is free): {(op, microbatch, virtual stage): (start, end)}. ``durations`` maps "F", "B",
    "W" to times (default 1 each). Raises ScheduleError if the orders deadlock."""
    durations = durations or {"F": 1, "B": 1, "W": 1}
    num_virtual = pp * vpp
    done = {}
    position, clock = [0] * pp, [0] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for rank in range(pp):
            while position[rank] < len(orders[rank]):
                kind, mb, chunk = orders[rank][position[rank]]
                v = chunk * pp + rank
                if kind == "F":
                    need = ("F", mb, v - 1) if v > 0 else None
                elif kind == "B":
                    need = ("B", mb, v + 1) if v < num_virtual - 1 else ("F", mb, v)
                else:
                    need = ("B", mb, v)
                if need is not None and need not in done:
                    break
                start = max(clock[rank], done[need][1] if need is not None else 0)
                done[(kind, mb, v)] = (start, start + durations[kind])
                clock[rank] = start + durations[kind]
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: orders[r][position[r]] for r in range(pp) if position[r] < len(orders[r])}
            raise ScheduleError(f"pipeline schedule deadlocks: ranks wait on {stuck}")
    return done


def time_steps(orders, pp, vpp):
    """Places each rank's operations (in order) on unit time steps, as early as their inputs allow.
    Returns ``table[rank][step]`` (an operation or None). Raises ScheduleError if the orders deadlock."""
    done = simulate(orders, pp, vpp)
    table = [[None] * max(end for _, end in done.values()) for _ in range(pp)]
    for (kind, mb, v), (step, _) in done.items():
        table[v % pp][step] = (kind, mb, v // pp)
    return table


def simulated_events(schedule, pp, vpp, m, t_f=1.0, t_b=2.0, t_w=1.0):
    """The plan as trace events per rank (trace.py's format) with a stage's pass times F = t_f, B = t_b
    (ZB-H1: B and W = t_w are the two halves, t_b defaults to t_f; a chunk of vpp takes 1/vpp of them),
    for pictures and as the bubble of the plan itself."""
    if schedule == "zb-h1" and t_b == 2.0:
        t_b = t_f
    validate_schedule(schedule, pp, vpp, m)
    orders = [rank_order(schedule, pp, vpp, m, r) for r in range(pp)]
    done = simulate(orders, pp, vpp, {"F": t_f / vpp, "B": t_b / vpp, "W": t_w / vpp})
    events = [[] for _ in range(pp)]
    for (kind, mb, v), (start, end) in sorted(done.items(), key=lambda item: item[1]):
        events[v % pp].append({"op": kind, "microbatch": mb, "chunk": v // pp, "step": 1, "start": start,
                               "end": end})
    return events


@functools.lru_cache(maxsize=64)
def build_plan(schedule, pp, vpp, num_microbatches):
    """Every rank's order and the shared time-step table, validated and built once per (schedule, pp, vpp,
    number of micro-batches) and then reused by every step (a ramp-up has a few sizes). The result is
    shared: callers must not modify it."""
    validate_schedule(schedule, pp, vpp, num_microbatches)
    orders = [rank_order(schedule, pp, vpp, num_microbatches, r) for r in range(pp)]
    return orders, time_steps(orders, pp, vpp)


@functools.lru_cache(maxsize=16)
def forward_only_plan(pp, vpp, num_microbatches):
    """The time-step table of evaluation: every micro-batch through every chunk, forwards only (GPipe's
    first half), built once per shape."""
    validate_schedule("gpipe", pp, vpp, num_microbatches)
    orders = [[("F", mb, c) for c in range(vpp) for mb in range(num_microbatches)] for _ in range(pp)]
    return time_steps(orders, pp, vpp)


def memory_bookkeeping(order):
    """Peaks over an order of the (microbatch, chunk) pairs whose forward ran and backward did not (full
    activations alive: "activations"), of those whose backward ran and deferred W did not (only the linear
    layers' inputs and output gradients alive: "deferred_w"), and of both together ("total")."""
    alive = deferred = 0
    split_backward = any(kind == "W" for kind, _, _ in order)
    peaks = {"activations": 0, "deferred_w": 0, "total": 0}
    for kind, _, _ in order:
        if kind == "F":
            alive += 1
        elif kind == "B":
            alive -= 1
            deferred += split_backward
        else:
            deferred -= 1
        for key, value in (("activations", alive), ("deferred_w", deferred), ("total", alive + deferred)):
            peaks[key] = max(peaks[key], value)
    return peaks


def theoretical_bubble(schedule, pp, vpp, m, t_f=1.0, t_b=2.0, t_w=None):
    """The textbook bubble fraction (idle / total time per rank) for equal-cost stages.
    1F1B and GPipe: (p-1) / (m + p-1); interleaved: (p-1) / (v m + p-1) (bubble divided by v);
    ZB-H1: (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W)) with B and W the two halves of the backward
    (t_b is then the input-gradient half and t_w the weight-gradient half; by default t_b = t_w = t_f)."""
    p = pp
    if schedule == "zb-h1":
        t_b = t_f if t_w is None else t_b
        t_w = t_f if t_w is None else t_w
        bubble = (p - 1) * (t_f + t_b - t_w)
        return bubble / (m * (t_f + t_b + t_w) + bubble)
    v = vpp if schedule == "interleaved" else 1
    return (p - 1) / (v * m + p - 1)
