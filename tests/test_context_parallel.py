"""Context parallelism equals the serial model.

1. Gradients (one spawn of 4 gloo ranks): the model's loss and every parameter's gradient at cp = 2 and 4,
   and tp2 x cp2 with sequence parallelism, equal the serial model's (fp32), for learned and rotary
   positions with GQA, with and without document masking (positions reset and attention kept within each
   document of the packed rows).
2. Training through the real entry point: cp in {2, 4}, tp2 x cp2 with SP, cp2 x pp2 x dp2 (8 ranks, 1F1B
   and ZB-H1), cp2 x pp2 interleaved and GPipe (with full recompute), and cp2 with ZeRO-1 log the serial
   run's losses and gradient norms, with and without document masking; bf16 and fp16 with recompute at cp2
   stay within the format's rounding of the serial run; a checkpoint saved at cp2 resumes at cp1 and cp4
   with the next losses equal. bf16 at cp2 through the training harness of tests/layouts.py: losses,
   first-step gradients and final parameters within bf16's rounding of the serial bf16 run.
3. Memory: the activations autograd saves per rank at cp = 2 are half those at cp = 1 for the same sequence,
   and memory.py's report agrees within 10%.
"""
import pytest
import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.data.document_mask import document_mask
from megagopher.context_parallel import split_for_cp_rank
from megagopher.model import GPTConfig, GPTModel
from megagopher.testing import spawn
from layouts import FP32_ATOL as ATOL, FP32_RTOL as RTOL, check_close_bf16, gather_full, model_config, train
from train_utils import TINY, read_metrics, run_train, write_config

EOD = 3
FLAVOURS = ("gpt2", "llama")


def _cfg(flavour):
    return model_config(flavour, seq_length=32, vocab_size=40)


def _batch(cfg, masked):
    g = torch.Generator().manual_seed(5)
    sample = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=g)
    sample[0, [3, 4, 20]] = EOD  # documents that cross the chunk boundaries of cp = 2 and 4
    sample[1, [11]] = EOD
    tokens, labels = sample[:, :-1], sample[:, 1:]
    extra = document_mask(tokens, EOD, reset_position_ids=True, reset_attention_mask=True) if masked else {}
    return tokens, labels, extra


def _loss_and_grads(cfg, tp, cp, sp, masked):
    """The summed per-token loss over the whole batch and every parameter's full gradient."""
    if tp * cp > 1:
        ps.initialize_model_parallel(tp=tp, cp=cp)
    cp_rank = ps.get_cp_rank()
    model = GPTModel(cfg, sequence_parallel=sp).initialize(9)
    tokens, labels, extra = _batch(cfg, masked)
    kwargs = {}
    if "position_ids" in extra:
        kwargs["position_ids"] = split_for_cp_rank(extra["position_ids"], cp, cp_rank)
        kwargs["cu_seqlens"] = extra["cu_seqlens"]
    per_token = model(split_for_cp_rank(tokens, cp, cp_rank), labels=split_for_cp_rank(labels, cp, cp_rank),
                      **kwargs)
    loss = per_token.sum() / labels.numel()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if cp > 1:  # each CP rank's gradient covers its tokens: the data-parallel reduction sums them
            dist.all_reduce(g, group=ps.get_cp_group())
        if getattr(p, "sequence_parallel", False) and tp > 1:
            dist.all_reduce(g, group=ps.get_tp_group())
        grads[name] = gather_full(p, g)
    total = loss.detach().clone()
    if cp > 1:
        dist.all_reduce(total, group=ps.get_cp_group())
    ps.destroy_model_parallel()
    return total, grads


def _equivalence(rank, world):
    checked = []
    for flavour in FLAVOURS:
        cfg = _cfg(flavour)
        for masked in (False, True):
            ref_loss, ref_grads = _loss_and_grads(cfg, 1, 1, False, masked)
            for tp, cp, sp in ((1, 2, False), (1, 4, False), (2, 2, True)):
                where = f"{flavour} tp={tp} cp={cp} sp={sp} masked={masked}"
                loss, grads = _loss_and_grads(cfg, tp, cp, sp, masked)
                torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=where)
                for name, want in ref_grads.items():
                    torch.testing.assert_close(grads[name], want, rtol=RTOL, atol=ATOL,
                                               msg=lambda m: f"{where} grad {name}: {m}")
                checked.append(where)
    return checked


def test_context_parallel_gradients_equal_serial():
    results = spawn(_equivalence, 4, timeout_s=300)
    assert len(results[0]) == 2 * 2 * 3 and all(r == results[0] for r in results)


MASKED = ("--data.reset_position_ids=true", "--data.reset_attention_mask=true", "--data.eod_mask_loss=true",
          "--data.eod_id=3")
CP_TINY = TINY.replace("seq_length = 16", "seq_length = 32")
LAYOUTS = {  # name: (ranks, reference run, overrides)
    "cp2": (2, "serial", ("--parallel.cp=2", "--checkpoint.save_interval=2")),
    "cp4": (4, "serial", ("--parallel.cp=4",)),
    "tp2cp2sp": (4, "serial", ("--parallel.tp=2", "--parallel.cp=2", "--parallel.sp=true")),
    "cp2pp2dp2-1f1b": (8, "serial", ("--parallel.cp=2", "--parallel.pp=2", "--parallel.schedule=1f1b")),
    "cp2pp2dp2-zbh1-masked": (8, "serial-masked", ("--parallel.cp=2", "--parallel.pp=2",
                                                   "--parallel.schedule=zb-h1") + MASKED),
    "tp2cp2sp-masked": (4, "serial-masked", ("--parallel.tp=2", "--parallel.cp=2", "--parallel.sp=true") + MASKED),
    "cp2dp2-zero1-masked": (4, "serial-masked", ("--parallel.cp=2", "--optimizer.distributed=true") + MASKED),
    "cp2pp2-interleaved": (4, "serial", ("--parallel.cp=2", "--parallel.pp=2", "--parallel.vpp=2",
                                         "--parallel.schedule=interleaved")),
    "cp2pp2-gpipe-full-recompute-masked": (4, "serial-masked", ("--parallel.cp=2", "--parallel.pp=2",
                                                                "--parallel.schedule=gpipe",
                                                                "--training.recompute=full") + MASKED),
}


def test_context_parallel_training_logs_the_serial_losses_and_reshards(tmp_path):
    cfg = write_config(tmp_path, CP_TINY)
    runs = {}

    def train(name, nproc, *overrides):
        run_dir = str(tmp_path / name)
        proc = run_train(cfg, run_dir, f"--checkpoint.dir={tmp_path / (name + '_ckpt')}", *overrides, nproc=nproc)
        runs[name] = {r["iteration"]: r for r in read_metrics(run_dir)}
        return proc

    train("serial", 1)
    train("serial-masked", 1, *MASKED)
    for name, (nproc, _, overrides) in LAYOUTS.items():
        train(name, nproc, *overrides)
    masked, plain = runs["serial-masked"], runs["serial"]
    assert [masked[i]["loss"] for i in (1, 2)] != [plain[i]["loss"] for i in (1, 2)]  # the masks matter
    for name, (_, reference, _) in LAYOUTS.items():
        want = runs[reference]
        assert sorted(runs[name]) == [1, 2, 3, 4], name
        for i, row in runs[name].items():
            assert row["loss"] == pytest.approx(want[i]["loss"], rel=1e-5), (name, i)
            assert row["grad_norm"] == pytest.approx(want[i]["grad_norm"], rel=1e-4), (name, i)
    # bf16 and fp16 with recompute: the ring merges in fp32, so cp2 stays within the format's rounding of the
    # serial run (fp16 with its loss scale)
    for precision, recompute, rel in (("bf16", "selective", 2e-2), ("fp16", "full", 2e-3)):
        train(f"serial-{precision}", 1, f"--training.precision={precision}")
        train(f"cp2-{precision}", 2, "--parallel.cp=2", f"--training.recompute={recompute}",
              f"--training.precision={precision}")
        for i in (1, 2, 3, 4):
            assert runs[f"cp2-{precision}"][i]["loss"] == pytest.approx(runs[f"serial-{precision}"][i]["loss"],
                                                                        rel=rel), (precision, i)
    # the model state does not depend on cp: a cp2 checkpoint resumes at cp1 and cp4
    for name, nproc in (("resume-cp1", 1), ("resume-cp4", 4)):
        cp = "--parallel.cp=4" if nproc == 4 else "--parallel.cp=1"
        proc = train(name, nproc, cp, f"--checkpoint.load={tmp_path / 'cp2_ckpt'}/iter_0000002")
        assert "resumed from" in proc.stdout
        assert sorted(runs[name]) == [3, 4]
        assert runs[name][3]["loss"] == pytest.approx(runs["cp2"][3]["loss"], rel=1e-5), name
        assert runs[name][4]["loss"] == pytest.approx(runs["cp2"][4]["loss"], rel=1e-4), name


def _bf16_cp2(rank, world):
    """bf16 at cp 2 (selective recompute; the ring merges its blocks in fp32) against the serial bf16 run
    through the training harness: every step's loss, every first-step gradient and every final parameter
    within bf16's rounding (tests/layouts.py's bounds)."""
    checked = []
    for flavour in FLAVOURS:
        cfg = _cfg(flavour)
        ref, _ = train(cfg, precision="bf16")
        got, _ = train(cfg, tp=1, cp=2, recompute="selective", precision="bf16")
        check_close_bf16(f"{flavour} bf16 cp2 selective", got, ref)
        checked.append(flavour)
    return checked


def test_bf16_cp2_gradients_and_parameters_within_bf16_rounding_of_serial():
    assert spawn(_bf16_cp2, 2) == [list(FLAVOURS)] * 2


def _activation_bytes(rank, world):
    """Saved activation bytes of one micro-batch's forward at cp = 1 (this rank alone) and cp = 2, with the
    fused kernels (interpreted), and memory.py's predictions for both."""
    from megagopher import kernels
    from megagopher.memory import memory_report, saved_activation_bytes
    model_cfg = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, seq_length=64,
                     vocab_size=100, make_vocab_size_divisible_by=8, normalization="rmsnorm", activation="swiglu",
                     position_embedding="rope", tie_embeddings=False, bias=False)
    training = {"precision": "fp32", "recompute": "none", "micro_batch_size": 2}
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    for cp in (1, 2):
        if cp > 1:
            ps.initialize_model_parallel(cp=cp)
        model = GPTModel(GPTConfig(**model_cfg)).initialize(1)
        local = split_for_cp_rank(ids, cp, ps.get_cp_rank())
        with kernels.use_backend("triton"):
            _, measured, _ = saved_activation_bytes(lambda: model(local, labels=local), list(model.parameters()))
        predicted = memory_report(model_cfg, {"cp": cp}, training, {"distributed": False}, world_size=cp,
                                  device="cpu")["activations"]
        out[cp] = (measured, predicted)
        ps.destroy_model_parallel()
    return out


def test_activations_per_rank_halve_at_cp2_and_the_report_agrees():
    for result in spawn(_activation_bytes, 2):
        (m1, p1), (m2, p2) = result[1], result[2]
        assert abs(m2 / m1 - 0.5) < 0.05, (m1, m2)
        assert abs(p1 - m1) / m1 <= 0.10 and abs(p2 - m2) / m2 <= 0.10, (m1, p1, m2, p2)


STAGED = TINY.replace("train_iters = 4\n", "") + """
[checkpoint]
load = "auto"
[[stages]]
name = "short"
train_iters = 2
[[stages]]
name = "long"
train_iters = 2
model.seq_length = 32
model.rope_theta = 50.0
"""


def test_long_context_stage_runs_as_its_own_command_at_a_larger_cp(tmp_path):
    """Stage "short" at dp2 stops (run.stop_after_stage); stage "long" (twice the context, another RoPE
    base) resumes from its checkpoint at cp2 and logs what one uninterrupted serial run of both logs."""
    from megagopher.export.loading import model_config_of, open_checkpoint
    cfg = write_config(tmp_path, STAGED)
    serial = str(tmp_path / "serial")
    run_train(cfg, serial, f"--checkpoint.dir={tmp_path / 'serial_ckpt'}")
    run_dir, ckpt = str(tmp_path / "staged"), f"--checkpoint.dir={tmp_path / 'staged_ckpt'}"
    first = run_train(cfg, run_dir, ckpt, "--run.stop_after_stage=short", nproc=2)
    assert "stopping after stage 'short'" in first.stdout
    assert [r["stage"] for r in read_metrics(run_dir)] == ["short", "short"]
    second = run_train(cfg, run_dir, ckpt, "--parallel.cp=2", nproc=2)
    assert "resumed from" in second.stdout
    rows, want = read_metrics(run_dir), read_metrics(serial)
    assert [r["stage"] for r in rows] == ["short", "short", "long", "long"]
    # rel 1e-6: the toy model's losses move by ~2e-6 with the RoPE base (checked below), fp32 CP by ~1e-7
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in want], rel=1e-6)
    saved = model_config_of(open_checkpoint(str(tmp_path / "staged_ckpt")))
    assert (saved.seq_length, saved.rope_theta) == (32, 50.0)  # export and generation see the stage's context
    # and the stage's RoPE base is the one trained with: keeping the first stage's changes the losses
    kept = str(tmp_path / "kept")
    run_train(write_config(tmp_path, STAGED.replace("model.rope_theta = 50.0\n", ""), name="kept.toml"), kept,
              f"--checkpoint.dir={tmp_path / 'kept_ckpt'}")
    assert read_metrics(kept)[2]["loss"] != pytest.approx(want[2]["loss"], rel=1e-6)
