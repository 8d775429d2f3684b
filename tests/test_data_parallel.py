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
"""
import math

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import PRECISION_DTYPES, all_gather_single
from megagopher.distributed import finalize_model_grads, wrap_data_parallel
from megagopher.model import GPTConfig
from megagopher.optimizer import build_optimizer
from megagopher.pipeline_parallel.schedules import forward_backward
from megagopher.pipeline_parallel.stages import build_model_chunks
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.testing import spawn
from megagopher.training.data import SyntheticDataset, global_batch_indices, microbatches

STEPS, GLOBAL_BATCH, MICRO_BATCH, SEED = 3, 16, 2, 1234
OPT = dict(lr=2e-3, min_lr=0.0, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-6, clip_grad=0.5)
# fp32 "to rounding": only the order of summation changes.
# - Losses and gradient norms agree to rtol 1e-5 at every step; the first step's reduced gradients agree
#   elementwise to 1e-6 of the largest gradient of their tensor (measured: about 2e-7).
# - Parameters after K Adam steps: Adam moves each element by about lr * g / (|g| + eps) whatever the
#   gradient's size, so an element with a tiny gradient turns that gradient's absolute rounding error,
#   divided by max(|g|, eps), into a relative error of its step. With eps = 1e-6 and gradient rounding
#   ~1e-9 that is at most ~1e-3 * lr per step; a real bug (a missing micro-batch, an average instead of
#   a sum, a wrong shard) moves parameters by O(lr).
RTOL = 1e-5
GRAD_TOL_OF_MAX = 1e-6
PARAM_ATOL = 5e-3 * OPT["lr"]

FLAVOURS = {
    "gpt2": dict(normalization="layernorm", activation="gelu", position_embedding="learned", tie_embeddings=True),
    "llama": dict(normalization="rmsnorm", activation="swiglu", position_embedding="rope", num_query_groups=2,
                  tie_embeddings=False, bias=False),
}


def _cfg(flavour, num_layers=2):
    return GPTConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=61,
                     make_vocab_size_divisible_by=8, **FLAVOURS[flavour])


def _global_name(name, param):
    """The serial model's name of a stage's parameter (the last stage's tied head is the embedding)."""
    return "embedding.word.weight" if getattr(param, "shared_embedding", False) else name


def _gather_full(param, tensor):
    """This parameter's full value from its TP shards (vocab padding rows dropped), and an expert
    parameter's from the expert-parallel ranks' blocks of experts."""
    if getattr(param, "partition_dim", None) is None or ps.get_tp_size() == 1:
        full = tensor
    else:
        parts = [torch.empty_like(tensor) for _ in range(ps.get_tp_size())]
        dist.all_gather(parts, tensor.contiguous(), group=ps.get_tp_group())
        full = torch.cat(parts, dim=param.partition_dim)
    if hasattr(param, "expert_first") and ps.get_ep_size() > 1:
        parts = [torch.empty_like(full) for _ in range(ps.get_ep_size())]
        dist.all_gather(parts, full.contiguous(), group=ps.get_ep_group())
        full = torch.cat(parts, dim=0)
    return full[:param.full_shape[0]] if param.partition_dim == 0 else full


def reduced_grads(chunks):
    """The full data-parallel-reduced gradients after finalize (ZeRO-1 shards all-gathered, TP joined)."""
    out = {}
    for ddp in chunks:
        grads = {}
        for buffer in ddp.grad_buffers:  # the experts' own buffer too, under expert parallelism
            grad = grads[id(buffer)] = buffer.grad_data.clone()
            if buffer.shard and buffer.dp_size > 1:
                for b in buffer.buckets:
                    lo, hi = b.shard_range(buffer.dp_rank, buffer.dp_size)
                    piece = grad[b.start:b.end]
                    all_gather_single(piece, piece[lo:hi].clone(), group=buffer.group)
        for name, p in ddp.module.named_parameters():
            buffer = ddp.bucket_of[id(p)].owner
            lo, hi = buffer.param_range[id(p)]
            out[_global_name(name, p)] = _gather_full(p, grads[id(buffer)][lo:hi].view(p.shape))
    return out


def train(cfg, tp=None, pp=1, schedule="1f1b", distributed=False, steps=STEPS, precision="fp32", parallel=None,
          sp=False, recompute="none", on_microbatch=None, before_step=None, vpp=1, overlap_param_gather=True, ep=1):
    """K steps of the training loop's contract (zero_grad, accumulate, finalize, step). tp None: the serial
    run, without parallel_state. Returns per-step (loss, updated, grad_norm, loss_scale), the full
    parameters by global name, and the first step's reduced gradients."""
    if tp is not None:
        ps.initialize_model_parallel(tp=tp, pp=pp, vpp=vpp, ep=ep)
    model_parallel_seed(SEED, ps.get_tp_rank(), ps.get_pp_rank())
    chunks = build_model_chunks(cfg, sequence_parallel=sp, recompute=recompute, seed=SEED)
    for chunk in chunks:
        chunk.to(PRECISION_DTYPES[precision])
    chunks = wrap_data_parallel(chunks, parallel or {"bucket_size_mb": 0.004, "overlap_grad_reduce": True},
                                distributed_optimizer=distributed, overlap_param_gather=overlap_param_gather)
    optimizer = build_optimizer(chunks, {**OPT, "distributed": distributed},
                                {"precision": precision, "initial_loss_scale": 1024.0, "hysteresis": 1})
    data = SyntheticDataset(cfg.vocab_size, cfg.seq_length, seed=5)
    global_tokens = GLOBAL_BATCH * cfg.seq_length

    def loss_fn(per_token):
        return optimizer.scale_loss(per_token.sum() / global_tokens)

    history, grads = [], {}
    for step in range(steps):
        optimizer.zero_grad()
        indices = global_batch_indices(step * GLOBAL_BATCH, GLOBAL_BATCH, ps.get_dp_rank(), ps.get_dp_size())
        mbs = microbatches(data, indices, MICRO_BATCH, "cpu")
        if pp > 1:
            loss_sum = forward_backward(chunks, mbs, loss_fn, schedule=schedule)
        else:  # the no-pipelining schedule, written out so the test can observe each micro-batch
            loss_sum = torch.zeros(())
            for i, mb in enumerate(mbs):
                last = i == len(mbs) - 1
                if on_microbatch:
                    on_microbatch(step, i, last, chunks[0])
                with torch.enable_grad():
                    if last:
                        per_token = chunks[0](mb["tokens"], labels=mb["labels"])
                        loss_fn(per_token).backward()
                    else:
                        with chunks[0].no_sync():
                            per_token = chunks[0](mb["tokens"], labels=mb["labels"])
                            loss_fn(per_token).backward()
                loss_sum += per_token.detach().float().sum()
        if ps.is_initialized():  # the loss lives on the last stage of every DP replica
            for group in (ps.get_dp_group(), ps.get_pp_group()):
                dist.all_reduce(loss_sum, group=group)
        finalize_model_grads(chunks)
        if step == 0:
            grads = reduced_grads(chunks)
        if before_step:
            before_step(step, chunks, optimizer)
        updated, grad_norm = optimizer.step()
        history.append((float(loss_sum) / global_tokens, updated, grad_norm, optimizer.loss_scale))
    optimizer.finish_param_gather()  # the last step's ZeRO-1 all-gathers: no forward pass waits for them
    params = {_global_name(n, p): _gather_full(p, p.detach().float())
              for ddp in chunks for n, p in ddp.module.named_parameters()}
    ps.destroy_model_parallel()
    return (history, params, grads), chunks


def check_equal(where, got, ref):
    (hist, params, grads), (ref_hist, ref_params, ref_grads) = got, ref
    assert params.keys() <= ref_params.keys() and grads.keys() == params.keys() and params, where
    for name, g in grads.items():
        atol = GRAD_TOL_OF_MAX * float(ref_grads[name].abs().max())
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=atol,
                                   msg=lambda m: f"{where}: first step's gradient of {name}: {m}")
    for (loss, updated, norm, _), (ref_loss, _, ref_norm, _) in zip(hist, ref_hist):
        assert updated, where
        assert math.isclose(loss, ref_loss, rel_tol=RTOL), f"{where}: loss {loss} vs serial {ref_loss}"
        assert math.isclose(norm, ref_norm, rel_tol=RTOL), f"{where}: grad norm {norm} vs serial {ref_norm}"
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=RTOL, atol=PARAM_ATOL,
                                   msg=lambda m: f"{where}: parameter {name} after {STEPS} steps: {m}")


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
