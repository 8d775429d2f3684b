"""Data parallelism and the distributed optimizer equal the serial run (fp32, dropout off).

One spawn of 4 gloo ranks trains K optimizer steps with gradient accumulation under dp = 4 and tp2 x dp2
(sequence parallel), with and without the distributed optimizer (ZeRO-1), and compares the first step's
reduced gradients, every step's loss and gradient norm, and the final parameters with the serial run
(which every rank also computes). The same spawn checks that bucket reductions overlap the backward pass
and never start before the last micro-batch, and that an inf in one rank's fp16 gradient makes every rank
skip the step and lower the loss scale. A spawn of 8 ranks covers tp2 x dp4 and tp2 x pp2 x dp2 (1F1B and
ZB-H1, whose deferred weight gradients reach the buckets through ``param.accumulate_main_grad``).
ZeRO-1 runs with its parameter all-gathers overlapped with the next forward pass (the default; see
tests/test_overlap.py), so the final parameters are read after ``optimizer.finish_param_gather()``.
The harness (``train``, ``check_equal``) and its tolerances are tests/layouts.py's.
"""
import math

import torch

from megagopher.testing import spawn
from layouts import check_equal, model_config, train

FLAVOURS = ("gpt2", "llama")


def _cfg(flavour, num_layers=2):
    return model_config(flavour, num_layers=num_layers)


def overlap_recorder(events):
    """on_microbatch callback: records, during step 0, micro-batch starts, bucket launches and gradient
    arrivals (in autograd order)."""
    recording = [True]

    def on_microbatch(step, index, last, ddp):
        recording[0] = step == 0
        if recording[0]:
            events.append(("microbatch", index, last))
        if step == 0 and index == 0:
            original = ddp._start_bucket_sync

            def record_launch(bucket):
                if recording[0]:
                    events.append(("launch", bucket.index))
                original(bucket)

            def record_grad(param):
                if recording[0]:
                    events.append(("grad", id(param)))
            ddp._start_bucket_sync = record_launch
            for p in ddp.buffer.params:  # runs after the wrapper's own hook for the same parameter
                p.register_post_accumulate_grad_hook(record_grad)
    return on_microbatch


def check_overlap(events, ddp, overlap):
    """With accumulation, nothing is reduced before the last micro-batch; during the last one's backward
    each bucket is launched as soon as it is complete, before the backward pass has finished. Returns how
    many buckets were launched before the last gradient arrived."""
    last_start = next(i for i, e in enumerate(events) if e[0] == "microbatch" and e[2])
    assert last_start > 0, "the test needs gradient accumulation (several micro-batches)"
    assert not [e for e in events[:last_start] if e[0] == "launch"], "a bucket was reduced before the last micro-batch"
    during_last = events[last_start:]
    launches = [i for i, e in enumerate(during_last) if e[0] == "launch"]
    grads = [i for i, e in enumerate(during_last) if e[0] == "grad"]
    if not overlap:
        assert launches and min(launches) > grads[-1], "overlap_grad_reduce = false reduced during the backward pass"
        return 0
    buckets = ddp.buffer.buckets
    assert len(buckets) >= 3 and sorted(during_last[i][1] for i in launches) == list(range(len(buckets)))
    early = [i for i in launches if i < grads[-1]]
    assert early, "no bucket reduction started before the backward pass finished"
    return len(early)


def fp16_inf_skips_everywhere(rank, poisoned_rank):
    """An inf in one rank's gradient, after the DP reduction (so no other rank's gradients hold it): every
    rank skips the step, leaves parameters and optimizer state untouched and halves the loss scale
    (hysteresis 1); the next step updates again."""
    for distributed in (False, True):
        seen = {}

        def poison_then_check(step, chunks, optimizer):
            state = [t.clone() for s in optimizer.shards for t in (s.master, s.exp_avg, s.exp_avg_sq)]
            params = {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
            if step == 1:
                seen["params"], seen["state"] = params, state
                if rank == poisoned_rank:
                    optimizer.shards[0].grad[-1] = float("inf")
            if step == 2:  # right after the skipped step
                for n, p in params.items():
                    assert torch.equal(p, seen["params"][n]), f"the skipped step changed {n}"
                assert all(torch.equal(a, b) for a, b in zip(state, seen["state"])), \
                    "the skipped step changed the optimizer state"

        (hist, _, _), _ = train(_cfg("gpt2"), tp=1, distributed=distributed, precision="fp16", steps=3,
                                before_step=poison_then_check)
        (_, up0, _, scale0), (_, up1, norm1, scale1), (loss2, up2, norm2, scale2) = hist
        where = f"fp16 distributed={distributed} rank {rank}"
        assert up0 and not up1 and norm1 is None, f"{where}: {hist}"
        assert scale1 == scale0 / 2 == scale2, f"{where}: loss scale {scale0} -> {scale1} -> {scale2}"
        assert up2 and math.isfinite(norm2) and math.isfinite(loss2), f"{where}: {hist}"
    return True


def _world4(rank, world):
    serial = {flavour: train(_cfg(flavour))[0] for flavour in FLAVOURS}
    out = {}
    # dp = 4: both flavours, with and without ZeRO-1, each with the overlap trace.
    for flavour in FLAVOURS:
        for distributed in (False, True):
            events = []
            got, chunks = train(_cfg(flavour), tp=1, distributed=distributed, on_microbatch=overlap_recorder(events))
            check_equal(f"{flavour} dp4 distributed={distributed}", got, serial[flavour])
            out[f"early launches, {flavour} dp4 distributed={distributed}"] = check_overlap(events, chunks[0], True)
    # No overlap, one bucket (bucket_size_mb = 0): every reduction after the backward pass.
    events = []
    got, chunks = train(_cfg("gpt2"), tp=1, distributed=True,
                        parallel={"bucket_size_mb": 0, "overlap_grad_reduce": False},
                        on_microbatch=overlap_recorder(events))
    assert len(chunks[0].buffer.buckets) == 1
    check_equal("gpt2 dp4 one bucket, no overlap", got, serial["gpt2"])
    check_overlap(events, chunks[0], False)
    # tp2 x dp2 with sequence parallelism (and full recomputation once: hooks fire inside checkpoint()).
    for flavour in FLAVOURS:
        for distributed in (False, True):
            recompute = "full" if distributed else "none"
            got, _ = train(_cfg(flavour), tp=2, distributed=distributed, sp=True, recompute=recompute)
            check_equal(f"{flavour} tp2 dp2 sp distributed={distributed} recompute={recompute}", got, serial[flavour])
    out["fp16"] = fp16_inf_skips_everywhere(rank, poisoned_rank=3)
    return out


def _world8(rank, world):
    """tp2 x dp4, and tp2 x pp2 x dp2 under 1F1B and ZB-H1 (the tied embedding, split across the first and
    last stage, with ZeRO-1: its own bucket on both stages)."""
    layouts = [("gpt2", dict(tp=2, pp=2, schedule="zb-h1", distributed=True)),
               ("gpt2", dict(tp=2, pp=1, distributed=True)),
               ("llama", dict(tp=2, pp=2, schedule="1f1b", distributed=False))]
    serial = {flavour: train(_cfg(flavour, num_layers=4))[0] for flavour in FLAVOURS}
    checked = []
    for flavour, layout in layouts:
        got, _ = train(_cfg(flavour, num_layers=4), sp=True, **layout)
        where = f"{flavour} " + " ".join(f"{k}={v}" for k, v in layout.items())
        check_equal(where, got, serial[flavour])
        checked.append(where)
    return checked


def test_data_parallel_matches_serial_overlaps_and_skips_fp16_overflow():
    results = spawn(_world4, 4, timeout_s=300)
    for r in results:
        assert all(v >= 1 for k, v in r.items() if k.startswith("early launches")), r
        assert r["fp16"] is True


def test_tp_pp_dp_world8_matches_serial():
    results = spawn(_world8, 8, timeout_s=300)
    assert len(results[0]) == 3


def _dropped_wrapper_is_freed(rank, world):
    import gc
    import weakref
    from megagopher.distributed.ddp import DistributedDataParallel
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    ddp = DistributedDataParallel(module, bucket_size_mb=0.0001)
    ddp(torch.ones(2, 4)).sum().backward()
    ddp.finish_grad_sync()
    arrived = all(p.grad is None and p.main_grad.abs().sum() > 0 for p in module.parameters())
    refs = [weakref.ref(ddp), weakref.ref(module), weakref.ref(ddp.buffer)]
    del ddp, module
    gc.collect()
    return {"arrived": arrived, "alive": [r() is not None for r in refs]}


def test_a_dropped_wrapper_and_its_chunk_are_freed():
    """Autograd keeps a parameter's hooks in C++, out of the cycle collector's sight: a hook holding the
    wrapper strongly kept every dropped wrapper, its chunk, buffers and groups alive for the process's life."""
    for r in spawn(_dropped_wrapper_is_freed, 2):
        assert r["arrived"], r  # the hooks still move every gradient into main_grad while the wrapper lives
        assert r["alive"] == [False, False, False], r
