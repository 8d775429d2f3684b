"""Pipeline stages free their outputs once sent (Megatron's deallocate_output_tensor), and what a stage holds
for its backward passes is what megagopher/memory.py counts.

One spawn of 4 gloo ranks. pp = 4 under 1F1B and GPipe (gpt2 in fp32, llama in bf16), measured with
memory.ActivationMeter: the distinct storages of the tensors autograd saved and still holds, plus the
stage inputs and outputs the runtime keeps, sampled after every pass. The peak of a stage is exactly

    memory.in_flight_microbatch_chunks(schedule, pp, 1, m, stage) x (bytes one micro-batch's forward
    pass saves on that stage, memory.saved_activation_bytes)

plus the one element every freed output points at (the last stage instead keeps each micro-batch's loss
scalar). Without deallocation each micro-batch in flight also holds its [s, b, h] output, and the
difference is exactly that. The per-micro-batch count itself is checked against memory.py's formula by
tests/test_memory.py. The gradients are bitwise equal with and without deallocation (the golden check
against the serial model, with deallocation on, is tests/test_pipeline.py). pp = 2 (x dp 2) under the
interleaved schedule (vpp 2) and ZB-H1: outputs freed, gradients bitwise equal.
"""
import torch

from megagopher import parallel_state as ps
from megagopher.common import PRECISION_DTYPES
from megagopher.memory import ActivationMeter, in_flight_microbatch_chunks, saved_activation_bytes
from megagopher.model.rope import rope_tables
from megagopher.pipeline_parallel.schedules import deallocate_output_tensor, forward_backward
from megagopher.pipeline_parallel.stages import build_model_chunks
from megagopher.testing import spawn
from layouts import model_config, random_microbatches

S, B, H = 16, 2, 32


def _cfg(flavour, num_layers=8):
    return model_config(flavour, num_layers=num_layers, hidden_size=H, seq_length=S)


def _microbatches(cfg, m):
    return random_microbatches(cfg, m, mbs=B, seed=7)


def _run(cfg, precision, schedule, data, deallocate):
    """One forward-backward of fresh chunks: (the meter, this rank's gradients, the chunks)."""
    chunks = build_model_chunks(cfg, seed=11)
    for chunk in chunks:
        chunk.to(PRECISION_DTYPES[precision])
    params = [p for c in chunks for p in c.parameters()]
    tokens = len(data) * data[0]["tokens"].numel()
    with ActivationMeter(exclude=params) as meter:
        forward_backward(chunks, data, lambda per_token: per_token.float().sum() / tokens, schedule=schedule,
                         meter=meter, deallocate_outputs=deallocate)
    return meter, [p.grad.clone() for p in params], chunks


def _one_microbatch(chunk, data, dtype):
    """Bytes this stage keeps for the backward pass of one micro-batch, run as the runtime runs it: what
    its forward pass saves, and its input (which the runtime keeps for the input's gradient; autograd
    saves it too unless the first op keeps only a converted copy, as the CPU reference RMSNorm does)."""
    params = list(chunk.parameters())
    x = None if chunk.pre_process else torch.randn(S, B, H, dtype=dtype).requires_grad_()
    kwargs = {"input_ids": data["tokens"]} if x is None else {"hidden_states": x}
    if chunk.post_process:
        kwargs["labels"] = data["labels"]
    _, saved, storages = saved_activation_bytes(lambda: chunk(**kwargs), params)
    if x is not None and x.untyped_storage().data_ptr() not in storages:
        saved += x.untyped_storage().nbytes()
    return saved


def _stage_peaks(flavour, precision, schedule, m):
    pp, stage = ps.get_pp_size(), ps.get_pp_rank()
    cfg, dtype = _cfg(flavour), PRECISION_DTYPES[precision]
    data = _microbatches(cfg, m)
    kept, kept_grads, _ = _run(cfg, precision, schedule, data, deallocate=False)
    freed, freed_grads, chunks = _run(cfg, precision, schedule, data, deallocate=True)
    where = f"{flavour} {precision} {schedule} pp={pp} m={m} stage {stage}"
    assert all(torch.equal(a, b) for a, b in zip(kept_grads, freed_grads)), f"{where}: gradients differ"
    in_flight = in_flight_microbatch_chunks(schedule, pp, 1, m, stage)
    per_microbatch = _one_microbatch(chunks[0], data[0], dtype)
    if ps.is_pipeline_last_stage():  # the loss scalars; the output is not sent and not freed
        placeholder, output = in_flight * 4, in_flight * 4
    else:  # one element shared by every freed output; else the [s, b, h] outputs themselves
        placeholder, output = dtype.itemsize, in_flight * S * B * H * dtype.itemsize
    # The rotary tables are cached (model/rope.py): every micro-batch saves the same two tensors, held once.
    tables = sum(t.untyped_storage().nbytes() for t in rope_tables(cfg, S, "cpu")) \
        if cfg.position_embedding == "rope" else 0
    expected = in_flight * (per_microbatch - tables) + tables
    assert freed.peak == expected + placeholder, \
        f"{where}: held {freed.peak_by_kind} at the peak, expected {in_flight} x {per_microbatch} + {placeholder}"
    assert kept.peak == expected + output, f"{where}: without deallocation {kept.peak_by_kind}, expected " \
                                           f"{in_flight} x ({per_microbatch} saved + output)"
    return {"in_flight": in_flight, "per_microbatch": per_microbatch, "tables": tables, "kept": kept.peak,
            "freed": freed.peak}


def _other_schedules(rank):
    """pp = 2 under the interleaved schedule and ZB-H1: only the placeholder is held besides autograd's."""
    out = {}
    for schedule, vpp in (("interleaved", 2), ("zb-h1", 1)):
        ps.initialize_model_parallel(pp=2, vpp=vpp)
        cfg, data = _cfg("gpt2", num_layers=4 * vpp), _microbatches(_cfg("gpt2"), 5)
        kept, kept_grads, _ = _run(cfg, "fp32", schedule, data, deallocate=False)
        freed, freed_grads, _ = _run(cfg, "fp32", schedule, data, deallocate=True)
        assert all(torch.equal(a, b) for a, b in zip(kept_grads, freed_grads)), f"{schedule}: gradients differ"
        held_outputs = kept.peak_by_kind["held"]
        if ps.get_pp_rank() == 0:  # every chunk of stage 0 sends its output on
            assert held_outputs >= 2 * S * B * H * 4 and freed.peak_by_kind["held"] == 4, \
                f"{schedule}: kept {kept.peak_by_kind}, freed {freed.peak_by_kind}"
        assert freed.peak < kept.peak or ps.is_pipeline_last_stage(), f"{schedule}: nothing was freed"
        out[schedule] = (kept.peak, freed.peak)
        ps.destroy_model_parallel()
    return out


def _world4(rank, world):
    out = {}
    ps.initialize_model_parallel(pp=4)
    for flavour, precision in (("gpt2", "fp32"), ("llama", "bf16")):
        for schedule, m in (("1f1b", 8), ("gpipe", 3)):
            out[f"{flavour} {schedule}"] = _stage_peaks(flavour, precision, schedule, m)
    ps.destroy_model_parallel()
    out["other"] = _other_schedules(rank)
    return out


def test_stage_outputs_freed_and_held_bytes_match_the_count():
    results = spawn(_world4, 4, timeout_s=300)
    for stage, r in enumerate(results):
        # 1F1B: stage s holds min(pp - s, m) micro-batches; GPipe all m.
        assert r["gpt2 1f1b"]["in_flight"] == 4 - stage and r["gpt2 gpipe"]["in_flight"] == 3
        if stage < 3:  # what deallocation saves on the first stage: one [s, b, h] fp32 output per micro-batch
            saved = r["gpt2 1f1b"]["kept"] - r["gpt2 1f1b"]["freed"]
            assert saved == (4 - stage) * S * B * H * 4 - 4, (stage, r["gpt2 1f1b"])
        # bf16: the placeholder is 2 bytes; the last stage keeps three fp32 loss scalars instead.
        llama = r["llama gpipe"]
        held = 3 * (llama["per_microbatch"] - llama["tables"]) + llama["tables"]
        assert llama["freed"] - held == (2 if stage < 3 else 12), \
            (stage, r["llama gpipe"])
    assert set(results[0]["other"]) == {"interleaved", "zb-h1"}


def test_deallocated_output_keeps_its_gradient():
    """The freed output's storage is the shared placeholder, and backward through it gives the gradients of
    the output kept: for an output nothing saved (an add), one its own op saved (tanh saves its result:
    autograd's reference keeps those bytes), and a leaf passed straight through (a stage without layers)."""
    placeholder = torch.empty(1)
    for name in ("add", "tanh", "leaf"):
        a, w = torch.randn(6, 5, requires_grad=True), torch.randn(5, 5, requires_grad=True)
        make = {"add": lambda: a @ w + a.sum(), "tanh": lambda: torch.tanh(a @ w), "leaf": lambda: a}[name]
        grad = torch.randn(6, 5)
        expected = torch.autograd.grad(make(), (a, w), grad, allow_unused=True)
        out = make()
        deallocate_output_tensor(out, placeholder)
        assert out.shape == (6, 5) and out.untyped_storage().data_ptr() == placeholder.untyped_storage().data_ptr()
        torch.autograd.backward(out, grad_tensors=grad)
        for got, want in zip((a.grad, w.grad), expected):
            assert (got is None and want is None) or torch.equal(got, want), name
