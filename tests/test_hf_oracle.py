"""An outside oracle for the gradients: transformers' autograd on its own model code.

The golden tests compare megagopher with itself (same layers, same hand-written backward, same cross
entropy), so a backward error that does not depend on the layout (a bias gradient, the SwiGLU interleave,
a gradient reduction counted twice) passes all of them. Here a small random transformers model of every
architecture the import takes (Llama with GQA and biases, GPT-NeoX, GPT-2 tied, CodeGen, Mixtral) is
imported with ``import_hf`` and both sides take the gradient of the same loss, the mean token cross
entropy of the same batch, in fp32:

  - at tp 1 (one process, plain ``.grad``), and at tp 2 x pp 2 with sequence parallelism, the data-parallel
    wrapper's fp32 ``main_grad`` buffers and the 1F1B schedule over 4 micro-batches; Mixtral also at
    pp 2 x ep 2 (dp 2: the experts' all-to-all and buffer). Every rank's shards are gathered to full tensors
    and their gradients mapped to our names through export/hf_arch.py's rules (the import's mapping);
  - end to end: ``STEPS`` optimizer steps of megagopher (its Optimizer and constant LRSchedule) against a
    plain loop of transformers and torch.optim.AdamW, with settings where Adam cannot hide a gradient off
    by a constant factor (``OPT``): the same losses, gradient norms and parameters.

One 4-rank spawn runs every layout of every architecture (``_layouts``). Adam (Kingma & Ba 2015) with
decoupled weight decay (Loshchilov & Hutter 2019); the layouts are Megatron-LM's (Shoeybi et al. 2019,
Narayanan et al. 2021).
"""
import copy
import tempfile

import pytest
import torch
import torch.nn.functional as F

from megagopher.export.hf_rules import rules
from megagopher.export.hf_import import import_hf, our_tensors, read_weights
from megagopher.testing import spawn

VOCAB = 150  # padded to 256 at tp 1 and tp 2: padding rows to drop, and real rows in both tp-2 shards
SEQ, ROWS, STEPS = 8, 4, 3  # a global batch of ROWS sequences of SEQ tokens, one sequence per micro-batch
# eps = 10 is far above every gradient entry (test_adam_settings_expose_the_gradient_scale checks < 1), so
# an update is lr * m_hat / (sqrt(v_hat) + 10), about lr / 10 * gradient, as plain SGD: a gradient off by a
# factor c moves its parameter c times as far. With Adam's usual eps the update is about lr whatever the
# scale (m_hat / sqrt(v_hat)): every gradient doubled after the norm left the losses and norms equal and
# moved only entries whose gradient is near eps. Clipping is off, so each parameter's update depends on its
# own gradient alone (the global norm, which clipping would use, is compared by itself); weight decay on
# matrices only, megagopher's rule, given to torch.optim.AdamW as two parameter groups; lr large enough
# that decay and updates move the parameters far beyond rounding; betas are megagopher's defaults.
OPT = {"lr": 1.0, "eps": 10.0, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "clip_grad": 0.0}
# fp32 to rounding: both sides sum the same products in another order (at most 7e-8 apart, seen here).
RTOL, ATOL = 1e-5, 5e-7
ARCHS = ("llama", "gpt_neox", "gpt2", "codegen", "mixtral")
# CodeGen's attention has no biases; megagopher's CodeGen has zero ones that train: both models part at
# the first update by design, so CodeGen's end to end check stops at the gradients.
TRAINED = ("llama", "gpt_neox", "gpt2", "mixtral")


def tf():
    import transformers  # here, not at import time: the spawned ranks import this module and need it not
    return transformers


def hf_config(arch):
    """Tiny configs with what sets each architecture apart, dropout off; two layers (one per stage)."""
    t, small = tf(), dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "llama":  # GQA, every linear biased (the bias gradients are checked)
        return t.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
                             tie_word_embeddings=False, **small)
    if arch == "gpt_neox":  # partial rotary, exact GeLU
        return t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               rotary_pct=0.5, use_parallel_residual=False, hidden_act="gelu",
                               max_position_embeddings=64, **small)
    if arch == "gpt2":  # tied embeddings, learned positions, Conv1D (transposed) weights
        return t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **small)
    if arch == "codegen":  # parallel residual, mp_num 4 blocks, interleaved rotary, head bias
        return t.CodeGenConfig(n_embd=64, n_layer=2, n_head=8, rotary_dim=4, n_positions=64, **small)
    # Mixtral without its load-balancing loss: transformers' pools the layers' routers into one term,
    # megagopher's sums per-layer terms (two definitions): the oracle is for the cross entropy.
    return t.MixtralConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, router_aux_loss_coef=0.0, tie_word_embeddings=False,
                           **small)


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen), torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen))


def hf_loss(model, tokens, labels):
    logits = model(tokens).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def hf_training(model):
    """transformers plus torch.optim.AdamW: the step-1 gradients, and per step the loss and gradient norm;
    the parameters after STEPS steps. Gradients and parameters in their on-disk names."""
    start, model = model, copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": OPT["weight_decay"]},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"])
    out = {"losses": [], "norms": []}
    for step in range(STEPS):
        opt.zero_grad()
        loss = hf_loss(model, *batch(step))
        loss.backward()
        if step == 0:
            out["grads"] = as_saved(start, {n: p.grad for n, p in model.named_parameters()})
        out["norms"].append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
        out["losses"].append(float(loss.detach()))
        opt.step()
    out["params"] = as_saved(start, dict(model.named_parameters()))
    return out


def as_saved(model, values):
    """{name: tensor} of ``model`` holding ``values`` ({parameter name: tensor}) as save_pretrained writes
    it: the names the import reads (transformers 5 renames some on saving: NeoX's lm_head is embed_out,
    Mixtral's fused experts are per expert), by transformers' own code."""
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(values[name])
    with tempfile.TemporaryDirectory() as directory:
        holder.save_pretrained(directory)
        return read_weights(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{arch: (GPTConfig, imported checkpoint, transformers' training run)}."""
    tmp, out = tmp_path_factory.mktemp("oracle"), {}
    for seed, arch in enumerate(ARCHS):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = tf().AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32).eval()
            with torch.no_grad():  # every tensor random, norms and biases included: nothing tested by a zero
                for p in model.parameters():
                    p.normal_(0.0, 0.3)
        model.save_pretrained(str(tmp / f"hf_{arch}"))
        fmt, cfg, _ = import_hf(str(tmp / f"hf_{arch}"), str(tmp / f"mg_{arch}"), tokenizer=False)
        assert fmt == arch
        out[arch] = (cfg, str(tmp / f"mg_{arch}"), hf_training(model))
    return out


# -- the mapping --------------------------------------------------------------------------------------------
def in_our_names(arch, cfg, theirs):
    """Their saved {name: tensor} (gradients or parameters) as {our name: full tensor} through the import's
    mapping (our_tensors: hf_arch's rules, all linear: reshapes, transposes, permutations, interleaves),
    less our tensors they have no tensor for (CodeGen's zero attention biases), whose names come second."""
    absent = {name for rule in rules(arch, cfg) if not rule.theirs for name in rule.ours}
    ours = our_tensors(arch, cfg, dict(theirs))
    return {name: t for name, t in ours.items() if name not in absent}, absent


def check_same(ours, theirs_hf, arch, cfg, what):
    """``ours`` ({our name: full tensor}) equals ``theirs_hf`` mapped; every tensor of ours is compared."""
    ours = dict(ours)
    if cfg.tie_embeddings and "output_layer" in ours:  # the last stage's copy: one parameter, one tensor
        torch.testing.assert_close(ours.pop("output_layer"), ours["embedding.word.weight"], rtol=0, atol=0)
    theirs, absent = in_our_names(arch, cfg, theirs_hf)
    assert set(ours) == set(theirs) | absent, sorted(set(ours) ^ (set(theirs) | absent))
    assert absent == ({n for i in range(cfg.num_layers) for n in (f"layers.{i}.attention.qkv.bias",
                       f"layers.{i}.attention.proj.bias")} if arch == "codegen" else set())
    for name, expected in theirs.items():
        assert expected.abs().max() > 0, f"{arch} {what} {name}: zero on both sides tests nothing"
        torch.testing.assert_close(ours[name], expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{arch} {what} "
                                   f"{name} (ours / theirs about {ratio(ours[name], expected):.4g}):\n{m}")


def ratio(ours, theirs):
    """The median of ours / theirs over their larger entries: the factor of a gradient off by one."""
    big = theirs.abs() > theirs.abs().max() / 10
    return float((ours[big] / theirs[big]).median())


def unpadded(p, t):
    """``t`` (a full-layout tensor of ``p``) without the vocabulary padding rows."""
    return t[tuple(slice(0, n) for n in getattr(p, "full_shape", t.shape))].detach().clone()


# -- tp 1 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_equal_transformers_at_tp1(models, arch):
    from megagopher.generate import load_model
    cfg, mg_dir, hf = models[arch]
    model = load_model(mg_dir, tp=1, device="cpu").model.train()
    tokens, labels = batch(0)
    model(input_ids=tokens, labels=labels).mean().backward()
    grads = {n: unpadded(p, p.grad) for n, p in model.named_parameters()}
    check_same(grads, hf["grads"], arch, cfg, "gradient at tp1")


# -- tp 2 x pp 2, and Mixtral at pp 2 x ep 2: one spawn -----------------------------------------------------
def _layouts():
    """(architecture, parallel layout, ZeRO-1) of every job of the spawn."""
    tp2_pp2 = [(arch, dict(tp=2, pp=2), False) for arch in ARCHS]
    return tp2_pp2 + [("mixtral", dict(pp=2, ep=2), False)]


def _full(p, t):
    """The whole tensor of ``p`` from this rank's shard ``t``: joined over TP (megagopher.testing) and over
    the expert-parallel group (each rank holds a contiguous block of the experts), padding dropped."""
    import torch.distributed as dist
    from megagopher import parallel_state as ps
    from megagopher.testing import gather_tensor_parallel
    t = gather_tensor_parallel(p, t)
    if hasattr(p, "expert_first") and ps.get_ep_size() > 1:
        blocks = [None] * ps.get_ep_size()
        dist.all_gather_object(blocks, (p.expert_first, t), group=ps.get_ep_group())
        t = torch.cat([block for _, block in sorted(blocks, key=lambda b: b[0])])
    return unpadded(p, t)


def _gathered(chunks, value):
    """{name: full tensor} of ``value(p)`` for this rank's parameters; every rank takes part in the gathers,
    only one rank per stage (TP rank 0, DP rank 0) returns them."""
    from megagopher import parallel_state as ps
    from megagopher.common import unwrap_model
    out = {n: _full(p, value(p)) for c in chunks for n, p in unwrap_model(c).named_parameters()}
    return out if ps.get_tp_rank() == 0 and ps.get_dp_rank() == 0 else {}


def _train(mg_dir, layout, distributed, steps):
    """``steps`` of the trainer's step (loop.py train_step) at ``layout``: the step-1 gradients (the
    wrapper's fp32 main_grad), per step the loss and gradient norm, the parameters at the end."""
    import torch.distributed as dist
    from megagopher import parallel_state as ps
    from megagopher.distributed import finalize_model_grads, wrap_data_parallel
    from megagopher.export.loading import model_config_of, open_checkpoint
    from megagopher.optimizer import LRSchedule, build_optimizer
    from megagopher.pipeline_parallel.schedules import forward_backward
    from megagopher.pipeline_parallel.stages import build_model_chunks
    from megagopher.training.checkpoint import load_weights
    ps.initialize_model_parallel(**layout)
    reader = open_checkpoint(mg_dir)
    chunks = build_model_chunks(model_config_of(reader), sequence_parallel=ps.get_tp_size() > 1)
    load_weights(reader, chunks)
    chunks = wrap_data_parallel(chunks, {"bucket_size_mb": 0.01}, distributed_optimizer=distributed)
    optimizer = build_optimizer(chunks, {**OPT, "distributed": distributed}, {"precision": "fp32"})
    schedule = LRSchedule(OPT["lr"], warmup_iters=0, decay="constant", total_iters=steps)
    dp, out = ps.get_dp_size(), {"losses": [], "norms": []}
    for step in range(steps):
        tokens, labels = batch(step)
        mine = [{"tokens": tokens[i:i + 1], "labels": labels[i:i + 1]} for i in range(ROWS)][
            ps.get_dp_rank() * ROWS // dp:(ps.get_dp_rank() + 1) * ROWS // dp]
        optimizer.set_lr(schedule(step + 1))
        optimizer.zero_grad()
        loss_sum = forward_backward(chunks, mine, lambda per_token: per_token.sum() / (ROWS * SEQ), schedule="1f1b")
        finalize_model_grads(chunks)
        if step == 0:
            out["grads"] = _gathered(chunks, lambda p: p.main_grad)
        owner = ps.is_pipeline_last_stage() and ps.get_tp_rank() == 0  # one per data-parallel replica
        total = torch.tensor([float(loss_sum) if owner else 0.0], dtype=torch.float64)
        dist.all_reduce(total)
        out["losses"].append(float(total) / (ROWS * SEQ))
        out["norms"].append(optimizer.step()[1])
    optimizer.finish_param_gather()
    out["params"] = _gathered(chunks, lambda p: p.detach())
    ps.destroy_model_parallel()
    return out


def _all_layouts(rank, world, checkpoints):
    return [_train(checkpoints[arch], layout, distributed, STEPS if arch in TRAINED else 1)
            for arch, layout, distributed in _layouts()]


@pytest.fixture(scope="module")
def spawned(models):
    """{(arch, layout name): every rank's _train result merged (one rank per stage returned tensors)}."""
    results = spawn(_all_layouts, 4, {arch: mg_dir for arch, (_, mg_dir, _) in models.items()}, timeout_s=300)
    out = {}
    for i, (arch, layout, _) in enumerate(_layouts()):
        runs = [r[i] for r in results]
        merged = {"losses": runs[0]["losses"], "norms": runs[0]["norms"], "grads": {}, "params": {}}
        for run in runs:
            assert run["losses"] == merged["losses"] and run["norms"] == merged["norms"]  # every rank agrees
            merged["grads"].update(run["grads"])
            merged["params"].update(run["params"])
        out[arch, " x ".join(f"{k}{v}" for k, v in layout.items())] = merged
    return out


JOBS = [(arch, " x ".join(f"{k}{v}" for k, v in layout.items())) for arch, layout, _ in _layouts()]


@pytest.mark.parametrize("arch, layout", JOBS)
def test_gradients_equal_transformers_at_tp2_pp2_and_ep2(models, spawned, arch, layout):
    cfg, _, hf = models[arch]
    check_same(spawned[arch, layout]["grads"], hf["grads"], arch, cfg, f"gradient at {layout}")


@pytest.mark.parametrize("arch, layout", [job for job in JOBS if job[0] in TRAINED])
def test_adamw_steps_equal_transformers_plus_torch_adamw(models, spawned, arch, layout):
    cfg, _, hf = models[arch]
    ours = spawned[arch, layout]
    assert ours["losses"] == pytest.approx(hf["losses"], rel=RTOL)
    assert ours["norms"] == pytest.approx(hf["norms"], rel=RTOL)
    assert hf["losses"][-1] < hf["losses"][0] - 0.01  # the steps moved the model
    check_same(ours["params"], hf["params"], arch, cfg, f"parameter after {STEPS} steps at {layout}")


def test_adam_settings_expose_the_gradient_scale(models):
    """The premise of OPT: every gradient entry is far below eps, so an update is about lr * gradient."""
    for arch, (_, _, hf) in models.items():
        assert max(float(g.abs().max()) for g in hf["grads"].values()) < 0.1 * OPT["eps"], arch
