"""Tensor-parallel communication at its minimum, overlapped, and weight gradients fused into main_grad.

1. Collectives per transformer layer and micro-batch, counted at torch.distributed on 2 TP ranks (every
   collective function wrapped, also where megagopher modules bound it under another name), isolated by
   differencing a 2-layer and a 1-layer model: without sequence parallelism 2 all-reduces forward (the two
   row-parallel outputs) and one backward per column-parallel input (2; 1 in a parallel-residual layer,
   whose attention and MLP read one normalised input); with it the all-reduces become reduce-scatters
   (forward) and all-gathers (backward) and each column-parallel input is all-gathered forward and its
   gradient reduce-scattered backward. Each moves s*b*h elements of the model's dtype. The vocab-parallel
   loss communicates once (an all-gather of a few floats per token), and under SP a layer keeps one
   gathered copy per norm output, as memory.py counts.
2. The column-parallel backward launches its input-gradient collective with async_op=True before the
   weight-gradient GEMM(s) and waits for it after them.
3. Under the data-parallel wrapper the weight-gradient GEMM accumulates into the fp32 main_grad (no
   model-dtype gradient is made), every bucket still learns that its gradients are in, and ZB-H1's W pass
   does the same.
4. SwiGLU's gate and up are one weight, rows interleaved channel by channel (every contiguous TP shard
   holds whole channels), starting from the separate projections' values.
"""
import collections
import contextlib
import sys

import torch
import torch.distributed as dist

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.distributed import finalize_model_grads, wrap_data_parallel
from megagopher.memory import layer_activations, saved_activation_bytes
from megagopher.model import GPTModel
from megagopher.model.gpt import TransformerLayer, rope_tables
from megagopher.tensor_parallel import (ColumnParallelLinear, column_parallel_linears, init_parameters,
                                        vocab_parallel_cross_entropy, weight_grad)
from megagopher.tensor_parallel.layers import seed_for
from megagopher.tensor_parallel.weight_grad import store
from megagopher.testing import spawn
from layouts import FLAVOURS, model_config, tp_model_config

S, B, H = 16, 2, 32

# The collective functions of torch.distributed and the size each one moves (bytes of the full tensor).
COLLECTIVES = {
    "all_reduce": ("all_reduce", lambda a, kw: a[0]),
    "all_gather_into_tensor": ("all_gather", lambda a, kw: a[0]),
    "all_gather_single": ("all_gather", lambda a, kw: a[0]),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, kw: a[1]),
    "reduce_scatter_single": ("reduce_scatter", lambda a, kw: a[1]),
    "all_gather": ("all_gather (list)", lambda a, kw: a[1]),
    "reduce_scatter": ("reduce_scatter (list)", lambda a, kw: a[0]),
    "broadcast": ("broadcast", lambda a, kw: a[0]),
    "all_to_all_single": ("all_to_all", lambda a, kw: a[0]),
}


@contextlib.contextmanager
def counted(records, phase):
    """Wraps every collective of torch.distributed, and every megagopher module's own binding of one
    (common.all_gather_single is torch's function under another name), appending (phase[0], op, bytes)."""
    patched = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrapper(name, fn):
        op, tensor_of = COLLECTIVES[name]

        def counting(*args, **kwargs):
            t = tensor_of(args, kwargs)
            records.append((phase[0], op, t.numel() * t.element_size()))
            return fn(*args, **kwargs)
        return counting

    wrappers = {id(fn): wrapper(name, fn) for name, fn in originals.items()}
    modules = [dist] + [m for n, m in list(sys.modules.items()) if n.startswith("megagopher") and m is not None]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if callable(value) and id(value) in wrappers:
                patched.append((module, attr, value))
                setattr(module, attr, wrappers[id(value)])
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def _cfg(flavour, num_layers):
    return tp_model_config(flavour, num_layers=num_layers, hidden_size=H, seq_length=S)


def _collectives(flavour, num_layers, sp, dtype):
    """Counter of (phase, op, bytes) of one micro-batch's forward and backward at tp = 2."""
    cfg = _cfg(flavour, num_layers)
    model = GPTModel(cfg, sequence_parallel=sp).initialize(3).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    records, phase = [], ["forward"]
    with counted(records, phase):
        loss = model(ids, labels=ids).float().mean()
        phase[0] = "backward"
        loss.backward()
    return collections.Counter(records)


def expected_per_layer(cfg, sp, element_size):
    """The minimum: two row-parallel outputs and one communication per distinct column-parallel input."""
    inputs = 1 if cfg.parallel_residual else 2
    size = S * B * H * element_size
    if not sp:
        return {("forward", "all_reduce", size): 2, ("backward", "all_reduce", size): inputs}
    return {("forward", "all_gather", size): inputs, ("forward", "reduce_scatter", size): 2,
            ("backward", "reduce_scatter", size): inputs, ("backward", "all_gather", size): 2}


def _cross_entropy_collectives():
    """The vocab-parallel loss: one all-gather of 3 (4 with label smoothing) fp32 floats per token on each
    rank, nothing in its backward."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(S, B, 24, generator=gen, requires_grad=True)
    labels = torch.randint(0, 45, (S, B), generator=gen)
    for eps, rows in ((0.0, 3), (0.1, 4)):
        records, phase = [], ["forward"]
        with counted(records, phase):
            loss = vocab_parallel_cross_entropy(logits, labels, vocab_size=45, label_smoothing=eps)
            phase[0] = "backward"
            loss.sum().backward()
        assert records == [("forward", "all_gather", 2 * rows * S * B * 4)], (eps, records)


def _saved_bytes_per_layer():
    """Under SP a norm's output is gathered and kept once for all the linears reading it (SwiGLU's gate and
    up, a parallel residual's QKV and fc1): the layer saves exactly what memory.layer_activations counts."""
    for flavour in FLAVOURS:
        cfg = tp_model_config(flavour, num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=S,
                              core_attention="flash", num_query_groups=2 if flavour == "llama" else 4)
        layer = TransformerLayer(cfg, True)
        init_parameters(layer, 1)
        layer.to(torch.bfloat16)
        x = torch.randn(S // 2, B, 64, dtype=torch.bfloat16, requires_grad=True)
        rope = rope_tables(cfg, S, x.device) if cfg.position_embedding == "rope" else ()
        with kernels.use_backend("triton"):
            _, measured, _ = saved_activation_bytes(lambda: layer(x, *rope), list(layer.parameters()) + list(rope))
        predicted = sum(layer_activations(cfg, S, B, tp=2, sp=True, e=2).values())
        assert measured == predicted, f"{flavour}: a layer saves {measured} bytes, memory.py counts {predicted}"


def _count_per_layer(rank, world):
    ps.initialize_model_parallel(tp=2)
    found = {}
    for flavour in FLAVOURS:
        for sp in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                one, two = (_collectives(flavour, n, sp, dtype) for n in (1, 2))
                assert not one - two, f"{flavour} sp={sp}: the 1-layer model communicates what 2 layers do not"
                per_layer = dict(two - one)
                where = f"{flavour} sp={sp} {dtype}"
                expected = expected_per_layer(_cfg(flavour, 1), sp, torch.empty((), dtype=dtype).element_size())
                assert per_layer == expected, f"{where}: per layer {per_layer}, expected {expected}"
                found[where] = per_layer
    _cross_entropy_collectives()
    _saved_bytes_per_layer()
    ps.destroy_model_parallel()
    return found


def test_collectives_per_layer_and_microbatch_are_the_minimum():
    """Also: the loss's one collective, and the activation memory of one gathered input per norm."""
    found = spawn(_count_per_layer, 2)[0]
    assert len(found) == len(FLAVOURS) * 2 * 2


class _Recorded:
    """A collective's handle that logs its wait."""

    def __init__(self, work, events):
        self.work, self.events = work, events

    def wait(self):
        self.events.append("wait")
        return self.work.wait()


@contextlib.contextmanager
def recorded(events, monkeypatch_targets):
    """Logs collective launches (with their async_op), waits, and weight-gradient GEMMs, in order."""
    saved = [(m, a, getattr(m, a)) for m, a in monkeypatch_targets]

    def launch(fn):
        def run(*args, **kwargs):
            events.append(("launch", bool(kwargs.get("async_op"))))
            work = fn(*args, **kwargs)
            return _Recorded(work, events) if kwargs.get("async_op") else work
        return run

    def gemm(fn):
        def run(*args, **kwargs):
            events.append("wgrad")
            return fn(*args, **kwargs)
        return run

    for module, attr, fn in saved:
        setattr(module, attr, gemm(fn) if module is weight_grad else launch(fn))
    try:
        yield
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def _overlap(rank, world):
    from megagopher.tensor_parallel import mappings
    ps.initialize_model_parallel(tp=2)
    targets = [(dist, "all_reduce"), (mappings, "reduce_scatter_single"), (weight_grad, "weight_grad"),
               (weight_grad, "weight_grad_into")]
    gen = torch.Generator().manual_seed(1)
    seen = []
    for sp in (False, True):
        for wrapped in (False, True):
            for consumers in (1, 2):
                linears = [ColumnParallelLinear(8, 12, sequence_parallel=sp, init_std=1.0) for _ in range(consumers)]
                for seed, lin in enumerate(linears):
                    init_parameters(lin, seed)
                if wrapped:
                    wrap_data_parallel([torch.nn.ModuleList(linears)])
                x = torch.randn(4 // (2 if sp else 1), 3, 8, generator=gen, requires_grad=True)
                outs = column_parallel_linears(x, *linears) if consumers > 1 else (linears[0](x),)
                loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
                events = []
                with recorded(events, targets):
                    loss.backward()
                where = f"sp={sp} wrapped={wrapped} consumers={consumers}"
                assert events == [("launch", True)] + ["wgrad"] * consumers + ["wait"], f"{where}: {events}"
                # The input gradient is still the sum over ranks of every consumer's partial gradient.
                full_w = [torch.cat([torch.empty_like(lin.weight)] * 2) for lin in linears]
                for lin, full in zip(linears, full_w):
                    dist.all_gather_into_tensor(full, lin.weight.detach(), group=ps.get_tp_group())
                expected = sum((i + 1) * full.sum(0) for i, full in enumerate(full_w)).expand(x.shape)
                torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6, msg=where)
                seen.append(where)
    ps.destroy_model_parallel()
    return seen


def test_input_gradient_collective_overlaps_the_weight_gradient_gemm():
    assert len(spawn(_overlap, 2)[0]) == 8


def _llama(num_layers=2):
    return model_config("llama", num_layers=num_layers, hidden_size=H, seq_length=S, bias=True, vocab_size=64)


def _linear_weights(model):
    return [p for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("embedding")]


def test_weight_gradients_accumulate_into_main_grad():
    cfg = _llama()
    batches = [torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reference = GPTModel(cfg).initialize(1)
    for ids in batches:
        reference(ids, labels=ids).mean().backward()
    model = GPTModel(cfg).initialize(1)
    grads_seen = []
    for p in _linear_weights(model):  # registered first, so it runs before the wrapper's own hook
        p.register_post_accumulate_grad_hook(lambda q: grads_seen.append(q.grad))
    (ddp,) = wrap_data_parallel([model], {"bucket_size_mb": 0.002})
    assert len(ddp.buffer.buckets) >= 4
    calls = collections.Counter()
    original_gemm, original_into = weight_grad.weight_grad, weight_grad.weight_grad_into
    try:
        weight_grad.weight_grad = lambda *a: calls.update(["model-dtype dW"]) or original_gemm(*a)
        weight_grad.weight_grad_into = lambda *a: calls.update(["into main_grad"]) or original_into(*a)
        for i, ids in enumerate(batches):
            last = i == len(batches) - 1
            with (contextlib.nullcontext() if last else ddp.no_sync()):
                ddp(ids, labels=ids).mean().backward()
            launched = [b.launched for b in ddp.buffer.buckets]
            assert all(launched) if last else not any(launched), f"micro-batch {i}: buckets launched {launched}"
    finally:
        weight_grad.weight_grad, weight_grad.weight_grad_into = original_gemm, original_into
    finalize_model_grads([ddp])
    linear_weights = _linear_weights(model)
    assert calls == {"into main_grad": len(linear_weights) * len(batches)}, calls
    assert grads_seen and all(g is None for g in grads_seen), "a model-dtype weight gradient reached .grad"
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is None, name
        torch.testing.assert_close(p.main_grad, ref.grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_bf16_weight_gradient_accumulates_in_fp32():
    """bf16 operands, fp32 accumulator: main_grad is the fp32 sum of both micro-batches' products, not the
    sum of two bf16-rounded gradients."""
    gen = torch.Generator().manual_seed(2)
    lin = ColumnParallelLinear(64, 48, bias=False).to(torch.bfloat16)
    (ddp,) = wrap_data_parallel([lin])
    xs = [torch.randn(16, 2, 64, generator=gen).to(torch.bfloat16) for _ in range(2)]
    dys = [torch.randn(16, 2, 48, generator=gen).to(torch.bfloat16) for _ in range(2)]
    with ddp.no_sync():
        ddp(xs[0]).backward(dys[0])
    ddp(xs[1]).backward(dys[1])
    wide = sum(dy.reshape(-1, 48).float().t() @ x.reshape(-1, 64).float() for x, dy in zip(xs, dys))
    rounded = sum((dy.reshape(-1, 48).t() @ x.reshape(-1, 64)).float() for x, dy in zip(xs, dys))
    torch.testing.assert_close(lin.weight.main_grad, wide, rtol=1e-6, atol=1e-6)
    assert (rounded - wide).abs().max() > 1e-3 * wide.abs().max(), "the bf16 rounding this test looks for is absent"
    assert lin.weight.grad is None


def _model_dtype_weight_grad_forbidden(x, grad_out):
    raise AssertionError("a model-dtype weight gradient was computed")


def test_zero_bubble_weight_pass_accumulates_into_main_grad():
    cfg = _llama(num_layers=1)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(4))
    reference = GPTModel(cfg).initialize(1)
    reference(ids, labels=ids).mean().backward()
    model = GPTModel(cfg).initialize(1)
    (ddp,) = wrap_data_parallel([model])
    store.clear()
    original_gemm = weight_grad.weight_grad
    weight_grad.weight_grad = _model_dtype_weight_grad_forbidden
    try:
        with store.capture():
            loss = ddp(ids, labels=ids).mean()
            with store.defer():
                loss.backward()
            store.flush("mb0")
            linear_weights = _linear_weights(model)
            assert all(torch.count_nonzero(p.main_grad) == 0 for p in linear_weights), "B computed a dW"
            store.run("mb0")
    finally:
        weight_grad.weight_grad = original_gemm
        store.clear()
    assert all(b.launched for b in ddp.buffer.buckets), "the W pass did not report its gradients ready"
    finalize_model_grads([ddp])
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.main_grad, ref.grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_fused_gate_up_layout():
    """SwiGLU's fc1 holds gate and up rows interleaved channel by channel, each starting from the values the
    separate projections (fc1 = gate, fc_up = up) had, and the MLP computes fc2(silu(x Wg^T) * (x Wu^T))."""
    cfg = _llama(num_layers=1)
    model = GPTModel(cfg).initialize(7)
    mlp = model.layers["0"].mlp
    weight = mlp.fc1.weight.detach()
    assert weight.shape == (2 * cfg.ffn_hidden_size, cfg.hidden_size)
    for rows, name in ((weight[0::2], "layers.0.mlp.fc1.weight"), (weight[1::2], "layers.0.mlp.fc_up.weight")):
        gen = torch.Generator().manual_seed(seed_for(7, name))
        expected = torch.empty(rows.shape).normal_(0.0, cfg.init_std, generator=gen)
        assert torch.equal(rows, expected), name
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        x = torch.randn(S, B, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
        bias = mlp.fc1.bias
        gate, up = x @ weight[0::2].t() + bias[0::2], x @ weight[1::2].t() + bias[1::2]
        expected = mlp.fc2(torch.nn.functional.silu(gate) * up)
        torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)
