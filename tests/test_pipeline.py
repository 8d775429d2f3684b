"""Pipeline schedules equal the serial model (fp32, dropout off): loss and every gradient to rounding.

One spawn of 4 gloo ranks covers pp in {2, 4} (re-initialising parallel_state between layouts): every
schedule, vpp in {1, 2} where it applies, and 1, pp and 2 pp + 1 micro-batches where the schedule allows
them (the interleaved schedule must reject 1 with a ValueError before communicating). Each rank also
computes the serial model, so the check needs no gathering across pipeline stages: a parameter of a
stage is compared with the serial parameter of the same name. The same spawn checks the schedules' own
memory bookkeeping, forward_only, the named p2p operations, and that tied embeddings stay bitwise equal
across the first and last stage over optimizer steps.

A spawn of 8 ranks checks tp 2 x pp 2 x dp 2 with sequence parallelism, activation recomputation and the
data-parallel wrapper (gradient reduction only after the last micro-batch; ZB-H1's deferred weight
gradients through ``accumulate_main_grad``).
"""
import faulthandler
import functools

import pytest
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.distributed import finalize_model_grads
from megagopher.distributed.ddp import wrap_data_parallel
from megagopher.model import GPTModel
from megagopher.pipeline_parallel import p2p
from megagopher.pipeline_parallel.plan import ScheduleError
from megagopher.pipeline_parallel.schedules import forward_backward, forward_only
from megagopher.pipeline_parallel.stages import build_model_chunks
from megagopher.testing import spawn
from layouts import FP32_ATOL as ATOL, FP32_RTOL as RTOL, ODD_VOCAB, SEED, gather_full, model_config
from layouts import random_microbatches as _microbatches

# (schedule, vpp) for every pp; the interleaved schedule with vpp = 1 is 1F1B and is not repeated.
SCHEDULES = [("gpipe", 1), ("gpipe", 2), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]


def _cfg(flavour, num_layers):
    return model_config(flavour, num_layers=num_layers, vocab_size=ODD_VOCAB[flavour])


class Checks:
    """Collects failed checks instead of raising, so a failing rank keeps taking part in the collectives of
    the later checks (a rank that stops would leave the others waiting); the test asserts at the end."""

    def __init__(self):
        self.failures = []

    def close(self, actual, expected, where, rtol=RTOL, atol=ATOL):
        try:
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
        except AssertionError as e:
            self.failures.append(f"{where}: {e}")

    def true(self, condition, where):
        if not condition:
            self.failures.append(where)


def _watchdog(seconds=240):
    """A rank stuck past ``seconds`` prints its stack and exits, so a hang fails the test instead of CI."""
    faulthandler.dump_traceback_later(seconds, exit=True)


def _loss_fn(num_tokens):
    return lambda per_token: per_token.sum() / num_tokens


@functools.lru_cache(maxsize=None)
def _serial_cached(flavour, num_layers, m, recompute):
    """The serial reference of _schedules_match_serial, shared by the schedules that use the same one."""
    cfg = _cfg(flavour, num_layers)
    data = _microbatches(cfg, m)
    return _serial(cfg, data, m * data[0]["tokens"].numel(), recompute)


def _serial(cfg, microbatches, num_tokens, recompute="none"):
    """The serial model's per-token loss sum and gradients (accumulated over the micro-batches)."""
    model = GPTModel(cfg, recompute=recompute).initialize(SEED)
    total = 0.0
    for mb in microbatches:
        per_token = model(input_ids=mb["tokens"], labels=mb["labels"])
        total += float(per_token.detach().sum())
        _loss_fn(num_tokens)(per_token).backward()
    return model, total


def _serial_name(name, serial):
    """A stage's parameter name in the serial model: the last stage's copy of a tied output head is the
    serial model's word embedding."""
    return "embedding.word.weight" if name == "output_layer" and name not in serial else name


def _grad(p):
    return p.main_grad if getattr(p, "main_grad", None) is not None else p.grad


def _check_grads(checks, chunks, serial_model, where):
    serial = dict(serial_model.named_parameters())
    checked = 0
    for chunk in chunks:
        for name, p in getattr(chunk, "module", chunk).named_parameters():
            grad, ref = gather_full(p, _grad(p)), serial[_serial_name(name, serial)].grad
            if getattr(p, "partition_dim", None) is not None:  # vocabulary padding differs with tp
                ref = ref.narrow(p.partition_dim, 0, p.full_shape[p.partition_dim])
            checks.close(grad, ref, f"{where}: grad {name}")
            checked += 1
    return checked


def _check_peaks(checks, stats, schedule, pp, vpp, m, where):
    """The runtime's own count of micro-batches alive on this stage (forward done, backward not)."""
    stage, peak = ps.get_pp_rank(), stats["peak"]
    if schedule == "gpipe":
        checks.true(peak["activations"] == m * vpp, f"{where}: gpipe peak {peak} != m * vpp")
    elif schedule in ("1f1b", "zb-h1"):
        checks.true(peak["activations"] == min(pp - stage, m), f"{where}: peak {peak} != min(pp - stage, m)")
    if schedule == "zb-h1":
        # Deferred W passes hold only the linear layers' inputs and output gradients; even counted as whole
        # micro-batches, this stage never holds more than 1F1B's first stage (pp), ZB-H1's memory claim.
        checks.true(peak["total"] <= pp, f"{where}: activations + deferred W {peak} > pp")
        checks.true(sum(op[0] == "W" for op in stats["order"]) == m, f"{where}: not one W pass per micro-batch")
    return peak


def _schedules_match_serial(rank, world):
    checks, checked, peaks = Checks(), [], {}
    for pp in (2, 4):
        for schedule, vpp in SCHEDULES:
            for m in (1, pp, 2 * pp + 1):
                flavour = "llama" if (m + vpp) % 2 else "gpt2"
                recompute = {1: "none", pp: "full", 2 * pp + 1: "selective"}[m]
                cfg = _cfg(flavour, num_layers=8)
                data = _microbatches(cfg, m)
                num_tokens = m * data[0]["tokens"].numel()
                where = f"{schedule} pp={pp} vpp={vpp} m={m} {flavour} recompute={recompute}"
                serial_model, serial_sum = _serial_cached(flavour, 8, m, recompute)  # before any layout
                ps.initialize_model_parallel(pp=pp, vpp=vpp)
                chunks = build_model_chunks(cfg, recompute=recompute, seed=SEED)
                if schedule == "interleaved" and m < pp:
                    with pytest.raises(ScheduleError, match=r"parallel.pp = \d+ micro-batches"):
                        forward_backward(chunks, data, _loss_fn(num_tokens), schedule=schedule)
                    checks.true(all(p.grad is None for c in chunks for p in c.parameters()),
                                f"{where}: rejected, yet ran")
                    ps.destroy_model_parallel()
                    continue
                stats = {}
                loss_sum = forward_backward(chunks, data, _loss_fn(num_tokens), schedule=schedule, stats=stats)
                finalize_model_grads(chunks)
                expected = torch.tensor(serial_sum if ps.is_pipeline_last_stage() else 0.0)
                checks.close(loss_sum, expected, f"{where}: loss sum", atol=1e-4)
                checks.true(loss_sum.device.type == "cpu", f"{where}: loss sum not on the CPU")
                _check_grads(checks, chunks, serial_model, where)
                peaks[where] = (ps.get_pp_rank(), _check_peaks(checks, stats, schedule, pp, vpp, m, where))
                if schedule == "1f1b" and m > 1:  # forward_only (evaluation) sees the same losses
                    with torch.no_grad():
                        checks.close(forward_only(chunks, data), expected, f"{where}: forward_only", atol=1e-4)
                checked.append(where)
                ps.destroy_model_parallel()
    return {"checked": checked, "peaks": peaks, "failures": checks.failures}


def _tied_embeddings_stay_equal(rank, world, schedule, vpp, steps=3):
    """Several AdamW steps: both copies of the tied embedding stay bitwise equal, and every parameter
    stays equal (to rounding) to the serial model's."""
    checks, pp = Checks(), world
    cfg = _cfg("gpt2", num_layers=8)
    serial_model = GPTModel(cfg).initialize(SEED)  # before any layout
    ps.initialize_model_parallel(pp=pp, vpp=vpp)
    chunks = build_model_chunks(cfg, seed=SEED)
    optimizer = torch.optim.AdamW([p for c in chunks for p in c.parameters()], lr=1e-2)
    serial_optimizer = torch.optim.AdamW(serial_model.parameters(), lr=1e-2)
    for step in range(steps):
        data = _microbatches(cfg, 2 * pp + 1, seed=100 + step)
        num_tokens = len(data) * data[0]["tokens"].numel()
        optimizer.zero_grad()
        forward_backward(chunks, data, _loss_fn(num_tokens), schedule=schedule)
        finalize_model_grads(chunks)
        optimizer.step()
        serial_optimizer.zero_grad()
        _serial_step(serial_model, data, num_tokens)
        serial_optimizer.step()
    # The two copies: first stage (chunk 0 of rank 0) and last stage (last chunk of rank pp - 1).
    first = chunks[0].embedding.word.weight.detach() if ps.is_pipeline_first_stage() else None
    last = chunks[-1].output_layer.detach() if ps.is_pipeline_last_stage() else None
    copies = [None] * world
    dist.all_gather_object(copies, (first, last))
    checks.true(torch.equal(copies[0][0], copies[pp - 1][1]), f"{schedule}: tied embedding copies diverged")
    serial = dict(serial_model.named_parameters())
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            checks.close(p.detach(), serial[_serial_name(name, serial)].detach(),
                         f"{schedule}: param {name} after {steps} steps", rtol=1e-4, atol=1e-5)
    ps.destroy_model_parallel()
    return checks.failures


def _serial_step(model, data, num_tokens):
    for mb in data:
        _loss_fn(num_tokens)(model(input_ids=mb["tokens"], labels=mb["labels"])).backward()


def _p2p_named_operations(rank, world):
    """The combined operations pair correctly on a ring of 2 (previous and next are the same rank) and
    of 4, with sequence-parallel-aware shapes."""
    out = []
    for pp in (2, 4):
        ps.initialize_model_parallel(pp=pp)
        stage = ps.get_pp_rank()
        shape = p2p.activation_shape(8, 2, 4, sequence_parallel=True, tp=2)
        assert shape == (4, 2, 4)
        act, grad = torch.full(shape, 10.0 + stage), torch.full(shape, -10.0 - stage)
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        # Steady state of 1F1B: stage s sends its activation on and receives a gradient from s + 1, while
        # s + 1 sends that gradient back and receives the activation.
        if stage % 2 == 0 and not last:
            got = p2p.communicate(send_next=act, recv_next=True, shape=shape)[1]
            assert torch.equal(got, torch.full(shape, -11.0 - stage))
        elif stage % 2 == 1:
            got = p2p.communicate(send_prev=grad, recv_prev=True, shape=shape)[0]
            assert torch.equal(got, torch.full(shape, 10.0 + stage - 1))
        # Both directions at once around the ring (the interleaved steady state), pp = 2 included.
        from_prev, from_next = p2p.communicate(send_next=act, send_prev=grad, recv_prev=True, recv_next=True,
                                              shape=shape)
        assert torch.equal(from_prev, torch.full(shape, 10.0 + (stage - 1) % pp))
        assert torch.equal(from_next, torch.full(shape, -10.0 - (stage + 1) % pp))
        if not last:
            p2p.communicate(send_next=act)
        if not first:
            assert torch.equal(p2p.communicate(recv_prev=True, shape=shape)[0], torch.full(shape, 10.0 + stage - 1))
        out.append(pp)
        ps.destroy_model_parallel()
    return out


def _world4(rank, world):
    _watchdog()
    return {"p2p": _p2p_named_operations(rank, world),
            "schedules": _schedules_match_serial(rank, world),
            "tied": _tied_embeddings_stay_equal(rank, world, "zb-h1", 1)
            + _tied_embeddings_stay_equal(rank, world, "interleaved", 2)}


@functools.lru_cache(maxsize=None)
def _world4_results():
    return spawn(_world4, 4, timeout_s=300)


def test_p2p_combined_operations():
    assert all(r["p2p"] == [2, 4] for r in _world4_results())


def test_schedules_match_serial_model():
    results = _world4_results()
    failures = [f"rank {rank}: {f}" for rank, r in enumerate(results) for f in r["schedules"]["failures"]]
    assert not failures, "\n".join(failures[:20])
    # 2 pp x (5 (schedule, vpp) x 3 micro-batch counts - the rejected interleaved m = 1).
    assert len(results[0]["schedules"]["checked"]) == 2 * (5 * 3 - 1)


def test_peak_microbatches_alive_per_stage():
    """gpipe: m (times vpp: every virtual micro-batch); 1f1b and zb-h1: at most pp - stage."""
    seen = set()
    for r in _world4_results():
        for where, (stage, peak) in r["schedules"]["peaks"].items():
            schedule, pp, vpp, m = (where.split()[0], *(int(where.split(k)[1].split()[0]) for k in
                                                         ("pp=", "vpp=", "m=")))
            if schedule == "gpipe":
                assert peak["activations"] == m * vpp, (stage, where, peak)
            elif schedule in ("1f1b", "zb-h1"):
                assert peak["activations"] <= pp - stage, (stage, where, peak)
                seen.add((schedule, pp, stage, peak["activations"]))
    # The bound is reached: with enough micro-batches stage s holds exactly pp - s of them.
    assert ("1f1b", 4, 0, 4) in seen and ("zb-h1", 4, 3, 1) in seen and ("zb-h1", 2, 0, 2) in seen


def test_tied_embeddings_bitwise_equal_after_optimizer_steps():
    failures = [f"rank {rank}: {f}" for rank, r in enumerate(_world4_results()) for f in r["tied"]]
    assert not failures, "\n".join(failures[:20])


def _tp_sp_dp_pp(rank, world):
    """tp 2 x pp 2 x dp 2, sequence parallel, data-parallel wrapper: every schedule equals serial."""
    _watchdog()
    checks, checked = Checks(), []
    tp, pp = 2, 2
    for schedule, vpp, m, recompute in (("1f1b", 1, 5, "selective"), ("zb-h1", 1, 5, "full"),
                                        ("interleaved", 2, 2, "none"), ("gpipe", 1, 2, "none"),
                                        ("zb-h1", 1, 1, "none")):
        cfg = _cfg("gpt2" if schedule != "gpipe" else "llama", num_layers=4 * vpp)
        dp = world // (tp * pp)
        everything = _microbatches(cfg, m * dp)  # the global batch: dp rank d takes micro-batches d*m ...
        num_tokens = len(everything) * everything[0]["tokens"].numel()
        serial_model, serial_sum = _serial(cfg, everything, num_tokens, recompute)  # before any layout
        ps.initialize_model_parallel(tp=tp, pp=pp, vpp=vpp)
        dp_rank = ps.get_dp_rank()
        mine = everything[dp_rank * m:(dp_rank + 1) * m]
        chunks = wrap_data_parallel(build_model_chunks(cfg, sequence_parallel=True, recompute=recompute,
                                                       seed=SEED),
                                    {"bucket_size_mb": 0.01, "overlap_grad_reduce": True})
        where = f"tp2 pp2 dp2 sp {schedule} vpp={vpp} m={m} recompute={recompute}"
        loss_sum = forward_backward(chunks, mine, _loss_fn(num_tokens), schedule=schedule)
        finalize_model_grads(chunks)
        totals = torch.tensor([float(loss_sum)])
        dist.all_reduce(totals)  # last-stage TP ranks of both replicas each hold their replica's sum
        checks.close(totals[0], torch.tensor(tp * serial_sum), f"{where}: loss sum", atol=1e-3)
        _check_grads(checks, chunks, serial_model, where)
        checked.append(where)
        ps.destroy_model_parallel()
    return {"checked": checked, "failures": checks.failures}


def test_tensor_sequence_data_and_pipeline_parallel_match_serial():
    results = spawn(_tp_sp_dp_pp, 8, timeout_s=300)
    failures = [f"rank {rank}: {f}" for rank, r in enumerate(results) for f in r["failures"]]
    assert not failures, "\n".join(failures[:20])
    assert len(results[0]["checked"]) == 5
