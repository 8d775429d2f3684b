"""Shared facts of the layout tests: model flavours, tolerances, and the serial-run harness.

Every layout test (tensor, sequence, context, pipeline, data and expert parallelism, recomputation, the
kernels inside the model) checks one thing: the model under a parallel layout equals the serial model, in
the same precision (torchtitan's loss-equivalence methodology, Megatron-Core's layout tests). The facts such
a check rests on live here once, as Megatron's and torchtitan's test utilities keep theirs:

- the model flavours: GPT-2 (LayerNorm, GELU, learned positions, tied embeddings), Llama (RMSNorm, SwiGLU,
  RoPE, grouped-query attention, no biases) and CodeGen (partial RoPE, parallel residual, unfused
  attention), and the tiny sizes they run at;
- the tolerances of "equal to rounding" in fp32 and in bf16, with the reason for each;
- ``train``: K steps of the training loop's contract (zero_grad, accumulate, finalize, step) under any
  layout, or serially, returning losses, first-step reduced gradients and final parameters by global name;
  ``check_equal`` / ``check_close_bf16`` compare a layout's run with the serial one.

Spawned ranks pickle functions by module, so everything a rank runs is module-level here or in the test file.
"""
import math

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.common import PRECISION_DTYPES, all_gather_single
from megagopher.distributed import finalize_model_grads, wrap_data_parallel
from megagopher.model import GPTConfig
from megagopher.model.mtp import MTPLosses, attach_mtp_losses, mtp_inputs, mtp_token_counts
from megagopher.optimizer import build_optimizer
from megagopher.pipeline_parallel.schedules import forward_backward
from megagopher.pipeline_parallel.stages import build_model_chunks
from megagopher.tensor_parallel import model_parallel_seed
from megagopher.training.data import SyntheticDataset, global_batch_indices, microbatches

# ---- model flavours -------------------------------------------------------------------------------------
GPT2 = dict(normalization="layernorm", activation="gelu", position_embedding="learned", tie_embeddings=True)
LLAMA = dict(normalization="rmsnorm", activation="swiglu", position_embedding="rope", num_query_groups=2,
             tie_embeddings=False, bias=False)
CODEGEN = dict(normalization="layernorm", activation="gelu", position_embedding="rope", rotary_percent=0.5,
               parallel_residual=True, tie_embeddings=False, core_attention="unfused")
FLAVOURS = {"gpt2": GPT2, "llama": LLAMA, "codegen": CODEGEN}
# The tiny sizes every layout test starts from (each may override some): 61 is no multiple of 8 * tp, so the
# vocabulary-parallel layers hold padding rows.
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=61,
            make_vocab_size_divisible_by=8)
# Another odd vocabulary per flavour, for the tests that run several flavours side by side under TP.
ODD_VOCAB = {"gpt2": 101, "llama": 97, "codegen": 120}


def model_dict(flavour, **overrides):
    """The tiny model of ``flavour`` as a config dict (what memory_report takes); overrides win."""
    return {**TINY, **FLAVOURS[flavour], **overrides}


def model_config(flavour, **overrides):
    return GPTConfig(**model_dict(flavour, **overrides))


def tp_model_config(flavour, **overrides):
    """8 heads (Llama: 4 key/value groups), so tp 2 and 4 split heads and groups, and the flavour's odd
    vocabulary: the tensor-parallel tests' model."""
    gqa = {"num_query_groups": 4} if flavour == "llama" else {}
    return model_config(flavour, **{"num_attention_heads": 8, "vocab_size": ODD_VOCAB[flavour], **gqa, **overrides})


# ---- tolerances -----------------------------------------------------------------------------------------
# fp32 "to rounding": a layout changes only the order of summation, a few ulps (1.2e-7 each) per op.
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6
# bf16 "to rounding" (check_close_bf16): bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3). A
# layout rounds its partial sums in bf16 at other places than the serial run (a TP shard's GEMM, an expert's
# slice of the tokens, a CP chunk), so
# - a first-step gradient element carries a few roundings of the largest terms it sums: allowed 8 u (2^-6)
#   of its tensor's largest gradient (measured: at most 1.6 u, ep4 and cp2); a bug (a gradient scaled or
#   dropped, a shard summed twice) is off by O(1) of that scale;
# - the loss is an fp32 mean of per-token losses from bf16 logits, their roundings averaging out: allowed
#   2 u relative (measured: 5e-5);
# - a final parameter is its fp32 master rounded to bf16, so two runs whose masters differ by a hair can sit
#   one bf16 ulp apart (2^-7 relative at most); beyond that, Adam moves an element by about lr a step
#   whatever its gradient's size, so an element whose gradient is within the bf16 noise of zero may step
#   the other way: at most 2 lr per step apart (measured: 1.35 lr after 3 steps). Such elements are few
#   (of a gradient spread like a normal whose largest element is ~4 sigma, ~1% lie within 8 u of that
#   largest from zero): at most 5% of a tensor may lie more than lr / 2 beyond the ulp (measured: at most
#   1%), while a bug in the update (a shard not stepped, a stale gather) moves a whole shard by O(lr).
BF16_GRAD_TOL_OF_MAX = 2.0 ** -6
BF16_LOSS_RTOL = 2.0 ** -8
BF16_PARAM_RTOL = 2.0 ** -7
BF16_STEPPED_ASIDE = 0.05


# ---- gathering a layout's tensors ---------------------------------------------------------------------
def gather_full(param, tensor, keep_padding=False):
    """``param``'s full tensor (its value or gradient ``tensor``) from this rank's TP shard and, for an
    expert parameter, the expert-parallel ranks' blocks of experts; the vocabulary padding rows dropped
    unless ``keep_padding``."""
    dim = getattr(param, "partition_dim", None)
    full = tensor
    if dim is not None and ps.get_tp_size() > 1:
        parts = [torch.empty_like(tensor) for _ in range(ps.get_tp_size())]
        dist.all_gather(parts, tensor.contiguous(), group=ps.get_tp_group())
        full = torch.cat(parts, dim=dim)
    if hasattr(param, "expert_first") and ps.get_ep_size() > 1:
        parts = [torch.empty_like(full) for _ in range(ps.get_ep_size())]
        dist.all_gather(parts, full.contiguous(), group=ps.get_ep_group())
        full = torch.cat(parts, dim=0)
    return full if dim is None or keep_padding else full.narrow(dim, 0, param.full_shape[dim])


def random_microbatches(cfg, count, mbs=2, seed=0):
    """``count`` micro-batches of random tokens and labels [mbs, seq_length]."""
    gen = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, cfg.vocab_size, (mbs, cfg.seq_length), generator=gen),
             "labels": torch.randint(0, cfg.vocab_size, (mbs, cfg.seq_length), generator=gen)}
            for _ in range(count)]


# ---- the training harness -------------------------------------------------------------------------------
STEPS, GLOBAL_BATCH, MICRO_BATCH, SEED = 3, 16, 2, 1234
OPT = dict(lr=2e-3, min_lr=0.0, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-6, clip_grad=0.5)
# fp32 "to rounding" after optimizer steps:
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


def _global_name(name, param):
    """The serial model's name of a stage's parameter (the last stage's tied head is the embedding)."""
    return "embedding.word.weight" if getattr(param, "shared_embedding", False) else name


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
            out[_global_name(name, p)] = gather_full(p, grads[id(buffer)][lo:hi].view(p.shape))
    return out


def _accumulate(chunks, mbs, loss_fn, step, on_microbatch):
    """The no-pipelining schedule, written out so a test can observe each micro-batch; the loss sum."""
    loss_sum = torch.zeros(())
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        if on_microbatch:
            on_microbatch(step, i, last, chunks[0])
        with torch.enable_grad():
            if last:
                per_token = chunks[0](mb["tokens"], labels=mb["labels"], **mtp_inputs(mb))
                loss_fn(per_token).backward()
            else:
                with chunks[0].no_sync():
                    per_token = chunks[0](mb["tokens"], labels=mb["labels"], **mtp_inputs(mb))
                    loss_fn(per_token).backward()
        loss_sum += per_token.detach().float().sum()
    return loss_sum


def train(cfg, tp=None, pp=1, schedule="1f1b", distributed=False, steps=STEPS, precision="fp32", parallel=None,
          sp=False, recompute="none", on_microbatch=None, before_step=None, vpp=1, overlap_param_gather=True, ep=1,
          cp=1):
    """K steps of the training loop's contract (zero_grad, accumulate, finalize, step). tp None: the serial
    run, without parallel_state. Returns per-step (loss, updated, grad_norm, loss_scale), the full
    parameters by global name, and the first step's reduced gradients."""
    if tp is not None:
        ps.initialize_model_parallel(tp=tp, pp=pp, vpp=vpp, ep=ep, cp=cp)
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
        mbs = microbatches(data, indices, MICRO_BATCH, "cpu", mtp_depth=cfg.mtp_num_layers)  # this CP rank's chunks
        if cfg.mtp_num_layers:  # each depth's mean over the global batch's targets, weighted as training/loop.py does
            counts = mtp_token_counts(mbs, GLOBAL_BATCH, cfg.seq_length, cfg.mtp_num_layers, "cpu")
            attach_mtp_losses(chunks, MTPLosses.for_step(cfg, counts, float(optimizer.scale_loss(1.0))))
        if pp > 1:
            loss_sum = forward_backward(chunks, mbs, loss_fn, schedule=schedule)
        else:
            loss_sum = _accumulate(chunks, mbs, loss_fn, step, on_microbatch)
        if ps.is_initialized():  # the loss lives on the last stage of every DP replica, split over CP
            for group in (ps.get_dp_group(), ps.get_pp_group()) + ((ps.get_cp_group(),) if cp > 1 else ()):
                dist.all_reduce(loss_sum, group=group)
        finalize_model_grads(chunks)
        if step == 0:
            grads = reduced_grads(chunks)
        if before_step:
            before_step(step, chunks, optimizer)
        updated, grad_norm = optimizer.step()
        history.append((float(loss_sum) / global_tokens, updated, grad_norm, optimizer.loss_scale))
    optimizer.finish_param_gather()  # the last step's ZeRO-1 all-gathers: no forward pass waits for them
    params = {_global_name(n, p): gather_full(p, p.detach().float())
              for ddp in chunks for n, p in ddp.module.named_parameters()}
    ps.destroy_model_parallel()
    return (history, params, grads), chunks


def _check_first_step_grads(where, got, ref, tol_of_max):
    """Every parameter's first-step reduced gradient within ``tol_of_max`` of its tensor's largest element."""
    (_, params, grads), (_, ref_params, ref_grads) = got, ref
    assert params.keys() <= ref_params.keys() and grads.keys() == params.keys() and params, where
    for name, g in grads.items():
        atol = tol_of_max * float(ref_grads[name].abs().max())
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=atol,
                                   msg=lambda m: f"{where}: first step's gradient of {name}: {m}")


def check_equal(where, got, ref):
    """fp32: a layout's ``train`` result equals the serial run's to rounding (the bounds above)."""
    (hist, params, grads), (ref_hist, ref_params, _) = got, ref
    _check_first_step_grads(where, got, ref, GRAD_TOL_OF_MAX)
    for (loss, updated, norm, _), (ref_loss, _, ref_norm, _) in zip(hist, ref_hist):
        assert updated, where
        assert math.isclose(loss, ref_loss, rel_tol=RTOL), f"{where}: loss {loss} vs serial {ref_loss}"
        assert math.isclose(norm, ref_norm, rel_tol=RTOL), f"{where}: grad norm {norm} vs serial {ref_norm}"
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=RTOL, atol=PARAM_ATOL,
                                   msg=lambda m: f"{where}: parameter {name} after {STEPS} steps: {m}")


def check_close_bf16(where, got, ref):
    """bf16: a layout's ``train`` result is within bf16's rounding of the serial bf16 run (the bounds above):
    every step's loss, every parameter's first-step reduced gradient, every final parameter."""
    (hist, params, grads), (ref_hist, ref_params, _) = got, ref
    _check_first_step_grads(where, got, ref, BF16_GRAD_TOL_OF_MAX)
    for step, ((loss, updated, _, _), (ref_loss, *_)) in enumerate(zip(hist, ref_hist)):
        assert updated, where
        assert math.isclose(loss, ref_loss, rel_tol=BF16_LOSS_RTOL), f"{where}: step {step} loss {loss} vs {ref_loss}"
    lr, steps = OPT["lr"], len(hist)
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=BF16_PARAM_RTOL, atol=2 * lr * steps,
                                   msg=lambda m: f"{where}: parameter {name} after {steps} steps: {m}")
        beyond_ulp = (value - ref_params[name]).abs() - BF16_PARAM_RTOL * ref_params[name].abs()
        aside = float((beyond_ulp > lr / 2).float().mean())
        assert aside <= BF16_STEPPED_ASIDE, \
            f"{where}: {aside:.1%} of parameter {name} is more than lr / 2 from the serial run after {steps} steps"
