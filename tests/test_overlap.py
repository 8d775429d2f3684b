"""ZeRO-1's parameter all-gather overlaps the next forward pass (Megatron's overlap_param_gather).

One spawn of 4 gloo ranks:

- dp 4, gpt2 (tied embeddings) and llama (an output layer owned by the model itself), several buckets:
  right after ``optimizer.step()`` every bucket's all-gather is in flight and none has been waited on; in
  the next forward pass bucket k is waited on exactly once, by the forward pre-hook of the first module
  that uses one of its parameters, after every module that ran before it, and in the order the buckets
  were launched (the reverse of the layout, i.e. the order of use). Without overlap nothing is left in
  flight after the step.
- The same training with the overlap on and off gives bitwise equal losses, gradient norms and parameters
  (the gather is a copy; only the moment of waiting moves). The golden check against the serial run with
  the overlap on is tests/test_data_parallel.py for dp 4 and tp 2 x dp 2; here pp 2 x dp 2 under 1F1B,
  the interleaved schedule (vpp 2) and ZB-H1, with the tied embedding in its own bucket on both stages and
  the pipeline freeing its stage outputs.
- The safety waits: the wrapper's ``state_dict`` waits for every bucket; ``params_norm`` waits where the
  fp32 master weights are the gathered buffer itself, and keeps the overlap where 16-bit parameters have
  separate masters.
"""
import torch

from megagopher.testing import spawn
from layouts import check_equal, model_config, train


class _RecordedWait:
    """Stands in for a bucket's all-gather handle and records when it is waited on."""

    def __init__(self, work, index, events):
        self.work, self.index, self.events = work, index, events

    def wait(self):
        self.events.append(("wait", self.index))
        return self.work.wait()


def wait_recorder(events, state):
    """on_microbatch callback: records the order of step 0's gather launches; at the first micro-batch of
    step 1 (the first forward pass after an optimizer step) checks that every bucket's gather is in flight,
    then records the waits on them and the start of every module's forward pass (its pre-hook runs after
    the wrapper's own, which is registered first)."""

    def on_microbatch(step, index, last, ddp):
        if step == 0 and index == 0:  # record the order in which step 0's optimizer launches the gathers
            launch = ddp.buffer.start_bucket_param_sync
            state["launched"] = []

            def record_launch(bucket):
                state["launched"].append(bucket.index)
                launch(bucket)
            ddp.buffer.start_bucket_param_sync = record_launch
        recording = step == 1 and index == 0
        if step == 1 and index == 1:
            state["recording"] = False
        if not recording:
            return
        buckets = ddp.buffer.buckets
        state["launched by step 0"] = list(state["launched"])
        state["pending after step"] = [b.param_gather is not None for b in buckets]
        for b in buckets:
            if b.param_gather is not None:
                b.param_gather = _RecordedWait(b.param_gather, b.index, events)
        state["recording"] = True
        bucket_of = ddp.buffer.bucket_of
        for name, module in ddp.module.named_modules():
            own = {bucket_of[id(p)].index for p in module.parameters(recurse=False) if id(p) in bucket_of}
            if own:
                def record(mod, args, name=name, own=own):
                    if state["recording"]:
                        events.append(("forward", name, own))
                module.register_forward_pre_hook(record)
    return on_microbatch


def check_waits_at_first_use(events, launched, ddp, where):
    """Bucket k is waited on once, right before the first module owning one of its parameters runs and
    after every module that does not; the gathers were launched in the order they are waited on, i.e. of
    first use (descending bucket index: the layout is the reverse of the order of use)."""
    n = len(ddp.buffer.buckets)
    assert n >= 3, f"{where}: the test needs several buckets, got {n}"
    waits = [e[1] for e in events if e[0] == "wait"]
    assert sorted(waits) == list(range(n)), f"{where}: each bucket must be waited on exactly once: {waits}"
    assert waits == sorted(waits, reverse=True) == launched, \
        f"{where}: gathers launched in the order {launched}, waited on in the order {waits}"
    assert events[0][0] == "wait", f"{where}: the first module ran before its bucket was waited on"
    for i, event in enumerate(events):
        if event[0] != "wait":
            continue
        k = event[1]
        ran_before = [e for e in events[:i] if e[0] == "forward"]
        assert not [e for e in ran_before if k in e[2]], f"{where}: bucket {k} was used before it was waited on"
        following = next(e for e in events[i + 1:] if e[0] == "forward")
        assert k in following[2], f"{where}: bucket {k} was waited on before {following[1]}, which does not use it"
    first_use = [i for i, e in enumerate(events) if e[0] == "wait"]
    forwards_before_last_wait = [e for e in events[:first_use[-1]] if e[0] == "forward"]
    assert forwards_before_last_wait, f"{where}: every bucket was waited on before any module ran (no overlap)"
    return waits


def bitwise_equal(a, b, where):
    (hist_a, params_a, grads_a), (hist_b, params_b, grads_b) = a, b
    assert hist_a == hist_b, f"{where}: {hist_a} != {hist_b}"
    assert params_a.keys() == params_b.keys() and params_a
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), f"{where}: parameter {name} differs"
        assert torch.equal(grads_a[name], grads_b[name]), f"{where}: gradient of {name} differs"


def safety_waits():
    """state_dict waits for every bucket; params_norm waits with fp32 (master = parameters) and not with
    bf16 (separate masters)."""
    out = {}
    for precision in ("fp32", "bf16"):
        seen = {}

        def after_first_step(step, index, last, ddp):
            if step == 1 and index == 0:
                seen["pending"] = sum(b.param_gather is not None for b in ddp.buffer.buckets)

        def before_second_step(step, chunks, optimizer):
            if step == 1:
                optimizer.step()  # a step that leaves the gathers in flight, then the reads
                buckets = chunks[0].buffer.buckets
                in_flight = sum(b.param_gather is not None for b in buckets)
                optimizer.params_norm()
                after_norm = sum(b.param_gather is not None for b in buckets)
                chunks[0].state_dict()
                after_state_dict = sum(b.param_gather is not None for b in buckets)
                seen["counts"] = (len(buckets), in_flight, after_norm, after_state_dict)
        train(model_config("gpt2"), tp=1, distributed=True, precision=precision, steps=2,
              on_microbatch=after_first_step, before_step=before_second_step)
        n, in_flight, after_norm, after_state_dict = seen["counts"]
        assert seen["pending"] == n == in_flight, f"{precision}: {seen}"
        assert after_norm == (0 if precision == "fp32" else n), f"{precision}: params_norm left {after_norm}"
        assert after_state_dict == 0, f"{precision}: state_dict left {after_state_dict} gathers in flight"
        out[precision] = seen["counts"]
    return out


def _world4(rank, world):
    out = {"waits": {}}
    for flavour in ("gpt2", "llama"):
        events, state = [], {}
        overlapped, chunks = train(model_config(flavour), tp=1, distributed=True,
                                   on_microbatch=wait_recorder(events, state))
        where = f"{flavour} dp4"
        assert all(state["pending after step"]), f"{where}: not every gather in flight after the step"
        out["waits"][flavour] = check_waits_at_first_use(events, state["launched by step 0"], chunks[0], where)
        events, state = [], {}
        synchronous, _ = train(model_config(flavour), tp=1, distributed=True, overlap_param_gather=False,
                               on_microbatch=wait_recorder(events, state))
        assert not any(state["pending after step"]) and not [e for e in events if e[0] == "wait"], \
            f"{where}: no overlap, yet gathers in flight after the step"
        bitwise_equal(overlapped, synchronous, f"{where} overlap on vs off")
    # pp 2 x dp 2 with ZeRO-1 and the overlap on: the golden check against the serial run.
    cfg = model_config("gpt2", num_layers=4)
    serial = train(cfg)[0]
    checked = []
    for schedule, vpp in (("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        got, chunks = train(cfg, tp=1, pp=2, vpp=vpp, schedule=schedule, distributed=True)
        check_equal(f"gpt2 pp2 dp2 zero1 {schedule} vpp={vpp}", got, serial)
        checked.append(schedule)
    out["pipeline"] = checked
    out["safety"] = safety_waits()
    return out


def test_param_gather_waited_at_first_use_and_equal_to_serial():
    results = spawn(_world4, 4, timeout_s=300)
    for r in results:
        assert r["pipeline"] == ["1f1b", "interleaved", "zb-h1"]
        assert set(r["waits"]) == {"gpt2", "llama"} and all(len(w) >= 3 for w in r["waits"].values())
        assert set(r["safety"]) == {"fp32", "bf16"}
