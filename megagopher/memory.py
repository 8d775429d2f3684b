"""Predicted memory per rank: parameters, gradients, optimizer state and activations, for a config.

    report = memory_report(model_cfg, parallel, training, optimizer)   # the config's sections
    print(report["line"])                                              # bytes in report["params"], ...

Model states follow Megatron's accounting (Korthikanti et al. 2022 and the Megatron-Core docs), which is
what megagopher allocates (distributed/param_and_grad_buffer.py, optimizer/optimizer.py): parameters in
the training dtype, fp32 gradients, fp32 master weights (bf16/fp16 only) and two fp32 Adam moments,
the latter two divided by dp under the distributed optimizer.

Activations are counted tensor by tensor from what megagopher's layers save for the backward pass with
the fused (Triton) kernels, the path that runs on GPUs: a norm keeps its input and fp32 statistics,
flash attention keeps q, k, v, its output and the log-sum-exp, the unfused path keeps the softmax output
(and, with attention dropout, its mask and the dropped probabilities), every linear keeps its input, GeLU
its input and SwiGLU both halves. Under sequence parallelism megagopher's column-parallel linears keep
the *all-gathered* input, one copy per linear (Megatron-LM re-gathers it in the backward pass instead;
see docs/memory.md). Korthikanti et al.'s sbh(34 + 5as/h) is the same count for GPT-3's layer with
16-bit activations, 1-byte dropout masks and unfused attention; ``layer_activations`` itemises ours.
Parameter counts (kv_channels, QK-norm, q/k/v biases, MLA, MoE with DeepSeek routing, MTP), FLOPs and the
generation cache's bytes (``kv_cache_bytes``) live in memory_params.py; MLA's and MTP's activations in
memory_arch.py.

Pipelining multiplies the per-micro-batch activations by the micro-batches a stage holds at once: the
first stage of 1F1B and ZB-H1 holds min(pp, m), GPipe all m, the interleaved schedule
(vpp - 1) * (pp + m % pp) + 2 (pp - 1) + 1 micro-batch-chunks (Narayanan et al. 2021, with the leftover
micro-batches in the first group): the count comes from the pipeline plan's own bookkeeping. Not counted: the pipeline's
communication buffers, ZB-H1's deferred weight-gradient inputs, temporary buffers of the backward pass,
allocator fragmentation. Nor the stage outputs: the pipeline runtime frees each one once it is sent
(pipeline_parallel/schedules.py, Megatron's deallocate_output_tensor), so a stage holds only what autograd
saved; before it did, every micro-batch in flight also held its [s, b, h] output (docs/memory.md).

``saved_activation_bytes(fn)`` measures the same thing: the bytes of the distinct storages autograd saves
while ``fn`` runs (torch.autograd.graph.saved_tensors_hooks), parameters excluded. ``ActivationMeter``
measures a whole schedule: the peak over its passes of what a rank holds for backward passes to come.
"""
import weakref

import torch

from megagopher.common import device_type, element_bytes
from megagopher.config.model import GPTConfig
from megagopher.config.schema import coerce
from megagopher.kernels import dispatch
from megagopher.memory_arch import mla_activations, mtp_activations
from megagopher.memory_params import (expert_params, kv_cache_bytes, layer_params, moe_layer_count,  # noqa: F401
                                      moe_params, padded_vocab, stage_params)
from megagopher.pipeline_parallel.plan import build_plan, memory_bookkeeping
from megagopher.pipeline_parallel.stages import stage_layer_ranges


# -- activations -----------------------------------------------------------------------------------------

def layer_activations(cfg, s, b, tp=1, sp=False, recompute="none", e=2, mask_bytes=1, moe=False, ep=1):
    """Bytes one transformer layer (``moe``: a MoE layer) saves for the backward pass of one micro-batch,
    itemised.

    e: bytes per activation element (2 for bf16/fp16, 4 for fp32); mask_bytes: bytes per dropout-mask
    element (1 on CUDA, where dropout keeps a bool mask; e on CPU, which keeps a scaled float mask)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    sp = sp and tp > 1
    n = s * b                       # tokens of the micro-batch
    n_sp = n // tp if sp else n     # tokens a rank holds between the TP regions (norms, dropout, residual)
    stats = 1 if cfg.normalization == "rmsnorm" else 2  # fp32 rstd (and mean) per token
    norm = n_sp * h * e + stats * n_sp * 4
    if recompute == "full":  # checkpoint() keeps only the layer's input
        return {"layer input (full recompute)": n_sp * h * e}
    swiglu = cfg.activation == "swiglu"
    out = {"input norm (input, statistics)": norm}
    if not cfg.parallel_residual:
        out["post-attention norm (residual sum, statistics)"] = norm
    # The column-parallel linears' inputs: each norm's output, under SP gathered, kept once per norm (the
    # linears reading one norm's output, SwiGLU's gate and up, a parallel residual's QKV and fc1, are one
    # autograd function: tensor_parallel/layers.py).
    norms_feeding = 1 if cfg.parallel_residual else 2 - moe  # a MoE layer's router keeps its own input
    out["column-parallel inputs"] = norms_feeding * n * h * e
    if cfg.is_mla:  # model/mla.py: its down projections keep the attention norm's output themselves
        out["column-parallel inputs"] -= 0 if cfg.parallel_residual else n * h * e
        out.update(mla_activations(cfg, s, b, tp, sp, recompute, e, mask_bytes))
    else:
        out.update(_attention_activations(cfg, s, b, tp, recompute, e, mask_bytes))
    if moe:
        out.update(moe_activations(cfg, n, n_sp, tp, e, ep, b))
    else:
        out["MLP (activation input(s), fc2 input)"] = (3 if swiglu else 2) * n * f // tp * e
    if cfg.dropout > 0:
        out["hidden dropout masks"] = (1 if cfg.parallel_residual else 2) * n_sp * h * mask_bytes
    return out


def _attention_activations(cfg, s, b, tp, recompute, e, mask_bytes):
    """What model/attention.py's block keeps beyond its input (the column-parallel input above), itemised."""
    d, a, g, n = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups, s * b
    out = {}
    rope, grouped, qk_norm = cfg.position_embedding == "rope", a != g, cfg.qk_norm
    repeat_kv = cfg.core_attention == "unfused" and grouped and recompute != "selective"
    if not repeat_kv or qk_norm:  # v (and k) are views of the projection's output, which therefore stays alive
        out["qkv (projection output)"] = n * (a + 2 * g) * d // tp * e
    if qk_norm:  # Qwen3's per-head RMSNorm keeps its inputs, views of the above but for a grouped q's copy,
        # and fp32 statistics per head and token
        out["QK-norm (q input, statistics)"] = (n * a * d // tp * e if grouped else 0) + n * (a + g) // tp * 4
    if rope or grouped or qk_norm:  # q is a copy: rotated, normalised, or reshaped out of the grouped layout
        out["q (rotated or regrouped copy)"] = n * a * d // tp * e
    if (rope or qk_norm) and not repeat_kv:  # repeated to every head, k's copy is saved as that instead
        out["k (rotated copy)"] = n * g * d // tp * e
    if recompute != "selective":  # selective recompute keeps q, k, v and recomputes the rest of the core
        heads = a // tp
        if cfg.core_attention == "flash":
            out["flash attention (output, log-sum-exp)"] = n * a * d // tp * e + b * heads * s * 4
        else:
            if repeat_kv:  # copies, saved by the matmuls instead of the projection's output
                out["k, v repeated to every head"] = 2 * n * a * d // tp * e
            out["softmax output"] = b * heads * s * s * e
            if cfg.attention_dropout > 0:
                out["attention dropout (mask, output)"] = b * heads * s * s * (mask_bytes + e)
    # The projection's input is the attention output viewed as [s, b, heads * d]: the flash output's layout
    # makes that a view (counted above; the row-parallel linear keeps the view and flattens it only in its
    # backward), the unfused matmul's needs a copy, and under selective recompute the flash output is not
    # kept by the kernel, only as this input.
    if not (cfg.core_attention == "flash" and recompute != "selective"):
        out["output projection input"] = n * a * d // tp * e
    return out


def moe_activations(cfg, n, n_sp, tp, e, ep=1, b=1):
    """What a MoE layer keeps for its backward (model/moe.py, moe_router.py, moe_experts.py): the router's fp32
    input (and in a 16-bit model its weight's fp32 copy), logits and scores, top-k indices, the log-sum-exp, and
    the top-k weights and their sum when they are normalised (a sigmoid router also its scores' sum, the
    sequence-wise loss its [b, E] means, capacity its keep mask); the permuted rows (n * k of them: every token
    the experts see, gathered over TP, times top-k), the experts' MLP tensors on those rows and the grouped
    GEMMs' int32 offsets (per local expert), the combine's fp32 expert outputs, routing weights and int64 token
    indices (a view of nonzero's [rows, 2]; with biases also the two expanded biases' indices); and the shared
    experts' MLP. Under expert parallelism a rank's experts see n * k rows when the load is balanced (the count
    assumes it), and the all-to-all dispatcher keeps its two int64 regrouping permutations
    (model/moe_dispatch.py)."""
    h, k, experts, f = cfg.hidden_size, cfg.moe_top_k, cfg.num_experts, cfg.moe_ffn_hidden_size
    rows, swiglu = n * k, cfg.activation == "swiglu"
    per_token = h * 4 + 2 * experts * 4 + k * 8 + 4
    per_token += (k * 4 + 4 if cfg.moe_norm_topk_prob else 0) + (4 if cfg.moe_router == "sigmoid" else 0)
    router = n_sp * per_token + experts * 4 + 4 + (experts * h * 4 if e != 4 else 0)  # 16-bit: W's fp32 copy
    router += (b * experts * 4 if cfg.moe_seq_aux_loss_coeff > 0 else 0) + \
        (n_sp * experts if cfg.moe_capacity_factor > 0 else 0)
    out = {"MoE router (fp32 input, logits, scores, top-k)": router,
           "MoE permuted expert inputs": rows * h * e,
           "MoE experts (activation input(s), fc2 input, offsets)": (3 if swiglu else 2) * rows * f // tp * e
           + 2 * (experts // ep + 1) * 4,
           "MoE combine (fp32 outputs, weights, indices)": rows * (h * 4 + 4 + 16 + (16 if cfg.bias else 0))}
    if ep > 1:
        out["MoE all-to-all permutations (int64)"] = 2 * rows * 8
    if cfg.moe_shared_experts:
        fs = cfg.moe_shared_experts * f
        # Its input is the norm output the router keeps, unless the router's is an fp32 copy or (under
        # sequence parallelism) the shared fc1 keeps the gathered input.
        shared_input = 0 if e == 4 and n == n_sp else n * h * e
        out["MoE shared experts (input, activation input(s), fc2 input)"] = \
            shared_input + (3 if swiglu else 2) * n * fs // tp * e
    return out


def extra_activations(cfg, s, b, tp=1, sp=False, pre_process=True, post_process=True, e=2, mask_bytes=1):
    """Bytes saved outside the transformer layers, per micro-batch: token ids and the embedding's masks
    (first stage); rotary tables; final norm, output-layer input and the logits (last stage), which hold
    the cross entropy's gradient from its forward on (written in place in the logits' dtype: no second
    logits-sized buffer, no fp32 softmax; tensor_parallel/cross_entropy.py)."""
    h = cfg.hidden_size
    sp = sp and tp > 1
    n = s * b
    n_sp = n // tp if sp else n
    vocab_rows = padded_vocab(cfg, tp) // tp
    out = {}
    if pre_process:
        ids = 8 * n + (n if tp > 1 else 0)  # int64 ids (over TP: this shard's local ids, and the outside mask)
        if cfg.position_embedding == "learned":
            ids += 8 * s
        if cfg.dropout > 0:
            ids += n_sp * h * mask_bytes
        out["embedding (ids, masks)"] = ids
    if cfg.position_embedding == "rope":
        out["rotary tables"] = 2 * s * (cfg.rotary_dim // 2) * 4
    if post_process:
        stats = 1 if cfg.normalization == "rmsnorm" else 2
        out["final norm"] = n_sp * h * e + stats * n_sp * 4
        out["output layer input"] = n * h * e
        out["cross entropy (its gradient, in the logits)"] = n * vocab_rows * e
    return out


def in_flight_microbatch_chunks(schedule, pp, vpp, num_microbatches, pp_rank=0):
    """How many (micro-batch, chunk) activation sets pipeline rank ``pp_rank`` holds at its peak: the
    pipeline plan's own bookkeeping of the order that rank runs (plan.py), so the report and the runtime
    can never disagree (1F1B and ZB-H1: min(pp - rank, m); GPipe: m * vpp; interleaved: its warm-up + 1)."""
    if pp == 1:
        return 1
    orders, _ = build_plan(schedule, pp, vpp, num_microbatches)
    return memory_bookkeeping(orders[pp_rank])["activations"]


# -- the report ------------------------------------------------------------------------------------------

def _stage_layout(cfg, pp, vpp, pp_layers):
    """For every pipeline rank: [(layers, pre_process, post_process)] of its chunks."""
    ranges = stage_layer_ranges(cfg.num_layers, pp, vpp, pp_layers or None)
    stages = [[] for _ in range(pp)]
    for v, (start, end) in enumerate(ranges):
        stages[v % pp].append((end - start, v == 0, v == pp * vpp - 1, start))
    return stages


def _chunk_activations(cfg, chunk, t, p, e, mask_bytes):
    """Activation bytes of one model chunk per micro-batch, itemised."""
    layers, pre, post, start = chunk
    s = cfg.seq_length // p.cp  # context parallelism: each rank holds 1/cp of every sequence
    full = min(layers, t.recompute_num_layers or layers) if t.recompute == "full" else 0
    items = {}
    for i in range(layers):  # the first ``full`` layers are recomputed (GPTModel.recompute_layers)
        mode = "full" if i < full else (t.recompute if t.recompute != "full" else "none")
        for k, v in layer_activations(cfg, s, t.micro_batch_size, p.tp, p.sp, mode, e, mask_bytes,
                                      cfg.is_moe_layer(start + i), p.ep).items():
            items[k] = items.get(k, 0) + v
    parts = [extra_activations(cfg, s, t.micro_batch_size, p.tp, p.sp, pre, post, e, mask_bytes)]
    if post and cfg.mtp_num_layers:  # the MTP modules' layers run outside the model's recompute
        parts.append(mtp_activations(cfg, s, t.micro_batch_size, p.tp, p.sp, e, padded_vocab(cfg, p.tp) // p.tp))
        parts += [{"MTP transformer layers": sum(layer_activations(
            cfg, s, t.micro_batch_size, p.tp, p.sp, "none", e, mask_bytes, cfg.is_moe_layer(cfg.num_layers + k),
            p.ep).values())} for k in range(cfg.mtp_num_layers)]
    for part in parts:
        for k, v in part.items():
            items[k] = items.get(k, 0) + v
    return items


def memory_report(model_cfg, parallel=None, training=None, optimizer=None, world_size=None, device=None,
                  pp_rank=None):
    """Predicted bytes per rank, for the pipeline rank that needs the most (or ``pp_rank``).

    model_cfg: a GPTConfig or the [model] table; parallel, training, optimizer: the config's sections
    (section objects, or dicts of some of their keys). parallel.pp_layers must be the split of this depth
    (JobConfig.pp_layers_at). dp comes from parallel.dp, else from ``world_size``. device: "cuda" or "cpu"
    (dropout masks are 1 byte per element on CUDA, an activation element on CPU); default
    training.device, "auto" resolved by common.device_type. The activations are counted for the Triton
    kernels; "kernels" names the backend the kernels' one decision (kernels/dispatch.py ``resolve``)
    picks for this device and training.kernel_backend, and the line says so when it is another.
    Returns {"params", "grads", "optimizer", "activations", "total": bytes; "num_params": this rank's
    parameter count; "pp_rank"; "activation_items": the per-micro-batch breakdown; "kernels": the backend the
    kernels will run; "line": a summary}."""
    cfg = model_cfg if isinstance(model_cfg, GPTConfig) else GPTConfig(**model_cfg)
    p, t, o = coerce("parallel", parallel), coerce("training", training), coerce("optimizer", optimizer)
    dp = p.dp or (world_size // (p.tp * p.pp * p.cp) if world_size else 1)
    num_microbatches = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    device = device or t.device
    if device == "auto":
        device = device_type("auto")
    kernels = dispatch.resolve(device, t.kernel_backend, "flash_attention")[0]
    e = element_bytes(t.precision)
    mask_bytes = 1 if str(device).startswith("cuda") else e
    state_bytes = 8 if t.precision == "fp32" else 12  # moments, plus the fp32 master copy for 16-bit params
    reports = []
    for rank, chunks in enumerate(_stage_layout(cfg, p.pp, p.vpp, p.pp_layers)):
        n_params = sum(stage_params(cfg, p.tp, layers, pre, post, first_layer=start, ep=p.ep)
                       for layers, pre, post, start in chunks)
        # Under expert parallelism ZeRO-1 shards the experts' state over expert DP (dp * cp / ep ranks).
        moe_layers = sum(moe_layer_count(cfg, start, layers, post) for layers, _, post, start in chunks)
        n_experts = moe_layers * expert_params(cfg, p.tp, p.ep) if p.ep > 1 else 0
        per_chunk, items = [], {}
        for chunk in chunks:
            chunk_items = _chunk_activations(cfg, chunk, t, p, e, mask_bytes)
            # The rotary tables are cached (model/rope.py): one copy for every chunk and micro-batch in flight.
            tables = chunk_items.pop("rotary tables", 0)
            per_chunk.append(sum(chunk_items.values()))
            for k, v in chunk_items.items():
                items[k] = items.get(k, 0) + v
        in_flight = in_flight_microbatch_chunks(p.schedule, p.pp, p.vpp, num_microbatches, rank)
        # Chunks are held in turn; count the average chunk once per micro-batch-chunk in flight.
        activations = int(sum(per_chunk) / len(per_chunk) * in_flight) + tables
        if tables:
            items["rotary tables"] = tables
        model_states = {"params": n_params * e, "grads": n_params * 4,
                        "optimizer": (n_params - n_experts) * state_bytes // (dp * p.cp if o.distributed else 1)
                        + n_experts * state_bytes // (dp * p.cp // p.ep if o.distributed else 1)}
        reports.append({**model_states, "activations": activations, "total": sum(model_states.values()) + activations,
                        "num_params": n_params, "pp_rank": rank, "in_flight": in_flight, "activation_items": items})
    report = reports[pp_rank] if pp_rank is not None else max(reports, key=lambda r: r["total"])
    report["kernels"] = kernels
    report["line"] = _line(report, p.pp, dp, o.distributed, t.precision, t.recompute, p.schedule)
    return report


def _fmt(n):
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _line(r, pp, dp, distributed, precision, recompute, schedule):
    where = f" (pipeline rank {r['pp_rank']} of {pp}, {schedule}: {r['in_flight']} micro-batch(es) in flight)" \
        if pp > 1 else ""
    zero = f" (ZeRO-1 over dp {dp})" if distributed else ""
    # Counted for the Triton kernels; on another backend (PyTorch's references on CPU) the saved tensors differ.
    counted = "" if r["kernels"] == "triton" else f"; counted for the Triton kernels, these run {r['kernels']}"
    return (f"memory per rank{where}: params {_fmt(r['params'])} ({r['num_params'] / 1e6:.2f}M {precision}) "
            f"+ grads {_fmt(r['grads'])} (fp32) + optimizer {_fmt(r['optimizer'])}{zero} "
            f"+ activations {_fmt(r['activations'])} (recompute {recompute}{counted}) = {_fmt(r['total'])} predicted")


# -- measurement -----------------------------------------------------------------------------------------

def saved_activation_bytes(fn, exclude=()):
    """Runs ``fn()`` and returns (its result, bytes of the distinct storages autograd saved for backward,
    {storage: (bytes, shape, dtype)}). Tensors sharing storage with ``exclude`` (parameters) are skipped."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes():
            seen[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape), tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, sum(v[0] for v in seen.values()), seen


class ActivationMeter:
    """The activation bytes a rank holds for backward passes to come, at its peak over a schedule.

        with ActivationMeter(exclude=parameters) as meter:
            forward_backward(chunks, microbatches, loss_fn, schedule, meter=meter)
        meter.peak, meter.peak_by_kind   # bytes; {"saved": autograd's, "held": the runtime's own}

    While active, every tensor autograd saves is remembered by a weak reference (so the meter keeps
    nothing alive). ``sample(held)``, which the schedules call after every pass, counts the distinct
    storages of the saved tensors still alive and of ``held`` (the stage inputs and outputs the pipeline
    runtime keeps; a freed output points at a one-element placeholder). Storages of ``exclude`` are skipped."""

    def __init__(self, exclude=()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.saved, self.samples = [], []
        self.peak, self.peak_by_kind = 0, {"saved": 0, "held": 0}
        self._hooks = None

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        self.saved.append(weakref.ref(tensor))
        return tensor

    def sample(self, held=()):
        """Counts what is held now; returns the bytes and keeps the peak."""
        self.saved = [ref for ref in self.saved if ref() is not None]
        storages = {}  # data_ptr -> (kind, bytes); a storage seen as saved is not counted again as held
        for kind, tensors in (("saved", [ref() for ref in self.saved]), ("held", held)):
            for tensor in tensors:
                storage = tensor.untyped_storage() if tensor is not None else None
                if storage is None or not storage.nbytes():
                    continue
                ptr = storage.data_ptr()
                if ptr not in self.excluded and ptr not in storages:
                    storages[ptr] = (kind, storage.nbytes())
        by_kind = {kind: sum(n for k, n in storages.values() if k == kind) for kind in ("saved", "held")}
        total = sum(by_kind.values())
        self.samples.append(total)
        if total > self.peak:
            self.peak, self.peak_by_kind = total, by_kind
        return total
