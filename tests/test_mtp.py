"""Multi-token prediction (DeepSeek-V3 technical report, section 2.2; model/mtp.py).

- The loss and every gradient of a tiny GPT-2-flavoured model with D = 2 modules against a float64 computation
  written here from the paper's equations on the model's own parameter tensors (D = 2 catches an off-by-one
  in the shift that V3's D = 1 would not); the labels-only forward gives the same.
- The shifted targets under document masking against a position-by-position count of documents.
- One spawn of 2 ranks: tp 2 + SP, pp 2 (1F1B, interleaved, zero bubble with tied embeddings), cp 2, dp 2 +
  ZeRO-1 equal the serial run (losses, first-step gradients, parameters, and the MTP losses as logged).
- The trainer's step record carries each depth's loss (and the z-loss of the LM tokens alone), equal to the
  float64 computation on the first batch.
- Generation ignores the modules: the model with them equals the same model without them.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from megagopher.config import ConfigError, validate
from megagopher.config.loading import load_config
from megagopher.data.document_mask import document_mask
from megagopher.generation.core import generate
from megagopher.model import GPTConfig, GPTModel
from megagopher.model.mtp import IGNORE_INDEX, MTPLosses, MultiTokenPrediction, mtp_inputs, mtp_step_summary
from megagopher.testing import spawn
from megagopher.training.data import DocumentMasking, SyntheticDataset, microbatches
from layouts import GLOBAL_BATCH, check_equal, model_dict, train
from train_utils import read_metrics, run_train, write_config

D, WEIGHT = 2, 0.3


def _gpt2(**kw):
    return GPTConfig(**model_dict("gpt2", mtp_num_layers=D, mtp_loss_weight=WEIGHT, **kw))


# ---- the float64 reference, from the paper's equations ------------------------------------------------
def _ln(x, p, name, eps):
    return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps)


def _layer(x, p, pre, cfg):
    """A GPT-2 block on x [b, s, h]: causal multi-head attention, then the tanh-GeLU MLP, pre-norm."""
    b, s, _ = x.shape
    g, d = cfg.num_query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // g
    h = _ln(x, p, pre + "input_norm", cfg.norm_epsilon)
    qkv = (h @ p[pre + "attention.qkv.weight"].T + p[pre + "attention.qkv.bias"]).view(b, s, g, hpg + 2, d)
    q = qkv[:, :, :, :hpg].reshape(b, s, g * hpg, d)
    k, v = (qkv[:, :, :, i].repeat_interleave(hpg, dim=2) for i in (hpg, hpg + 1))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, -1)
    x = x + ctx @ p[pre + "attention.proj.weight"].T + p[pre + "attention.proj.bias"]
    h = _ln(x, p, pre + "post_attention_norm", cfg.norm_epsilon)
    up = F.gelu(h @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"], approximate="tanh")
    return x + up @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"]


def reference(cfg, p, rows, z_coeff=0.0):
    """(LM per-token losses [b, s], [Loss_1 .. Loss_D], the objective, the LM tokens' mean z-loss) for token rows
    [b, s + 1], in the dtype of ``p`` (GPT-2 flavour, tied head)."""
    b, s = rows.shape[0], rows.shape[1] - 1
    emb = p["embedding.word.weight"][:cfg.vocab_size]
    x = emb[rows[:, :s]] + p["embedding.position"][:s]
    for i in range(cfg.num_layers):
        x = _layer(x, p, f"layers.{i}.", cfg)
    h = _ln(x, p, "final_norm", cfg.norm_epsilon)  # h^0: the representation the output head reads
    logits = h @ emb.T
    lm = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
    z = z_coeff * torch.logsumexp(logits, -1).square().mean()
    losses = []
    for k in range(1, cfg.mtp_num_layers + 1):
        pre = f"mtp.layers.{cfg.num_layers + k - 1}."
        ahead = torch.zeros(b, s, dtype=torch.long)
        ahead[:, :s + 1 - k] = rows[:, k:]  # t_{i+k}; nothing past the sequence's end
        e = _ln(emb[ahead], p, pre + "enorm", cfg.norm_epsilon)
        x = torch.cat([e, _ln(h, p, pre + "hnorm", cfg.norm_epsilon)], -1) @ p[pre + "eh_proj"].T
        h = _ln(_layer(x, p, pre + "layer.", cfg), p, pre + "final_norm", cfg.norm_epsilon)
        n = s - k  # positions with a target t_{i+k+1}
        ce = F.cross_entropy((h @ emb.T)[:, :n].transpose(1, 2), rows[:, k + 1:], reduction="none")
        losses.append(ce.mean())
    objective = lm.mean() + cfg.mtp_loss_weight / cfg.mtp_num_layers * sum(losses)
    return lm, losses, objective, z


def _rows(cfg, n, seed=5):
    data = SyntheticDataset(cfg.vocab_size, cfg.seq_length, seed)
    return torch.stack([torch.from_numpy(data[i]) for i in range(n)])


def test_loss_and_gradients_match_float64_reference():
    cfg = _gpt2()
    model = GPTModel(cfg).initialize(11)
    rows = _rows(cfg, 4)
    mb = microbatches(SyntheticDataset(cfg.vocab_size, cfg.seq_length, 5), range(4), 4, "cpu", mtp_depth=D)[0]
    per_token = model(mb["tokens"], labels=mb["labels"], **mtp_inputs(mb))
    per_token.mean().backward()  # a plain call: each depth's mean over this micro-batch's targets
    sums = model.mtp.losses.pop()
    p = {n: t.detach().double().requires_grad_() for n, t in model.named_parameters()}
    lm, losses, objective, _ = reference(cfg, p, rows)
    objective.backward()
    torch.testing.assert_close(per_token.double(), lm, rtol=1e-5, atol=1e-6)
    counts = [4 * (cfg.seq_length - k) for k in range(1, D + 1)]
    torch.testing.assert_close(sums.double() / torch.tensor(counts), torch.stack(losses), rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        ref = p[name].grad
        torch.testing.assert_close(param.grad.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda m: f"gradient of {name}: {m}")
    assert float(p["mtp.layers.3.eh_proj"].grad.abs().max()) > 0  # the second depth is in the objective
    # The labels alone give the same: t_{i+k} = labels[i+k-1] on whole sequences.
    model.zero_grad()
    again = model(mb["tokens"], labels=mb["labels"])
    torch.testing.assert_close(again, per_token, rtol=0, atol=0)
    torch.testing.assert_close(model.mtp.losses.pop(), sums, rtol=0, atol=0)


def test_targets_stay_within_documents():
    """Under document masking the depth-k target of position i is t_{i+k+1} only when t_{i+k} is in i's
    document and its own label carries loss; counted per depth on the whole sequences."""
    eod, s, depth = 3, 16, 3
    rows = torch.randint(4, 40, (2, s + 1), generator=torch.Generator().manual_seed(0))
    rows[0, [2, 9, 10]] = eod
    rows[1, [5, 15]] = eod

    class Rows:
        def __getitem__(self, i):
            return rows[i].numpy()
    masking = DocumentMasking(eod, True, True, True)
    mb = microbatches(Rows(), range(2), 2, "cpu", masking, mtp_depth=depth)[0]
    assert document_mask(rows[:, :s], eod, reset_attention_mask=True)["cu_seqlens"].numel() > 3
    for k in range(1, depth + 1):
        count = 0
        for r in range(2):
            doc = [int((rows[r, :j] == eod).sum()) for j in range(s)]  # the document of input position j
            for i in range(s):
                ok = i + k < s and doc[i] == doc[i + k] and rows[r, i + k] != eod
                want = int(rows[r, i + k + 1]) if ok else IGNORE_INDEX
                assert int(mb["mtp_labels"][k - 1, r, i]) == want, (k, r, i)
                if i + k <= s:
                    assert int(mb["mtp_tokens"][k - 1, r, i]) == int(rows[r, i + k]), (k, r, i)
                count += ok
        assert mb["mtp_loss_tokens"][k - 1] == count


# ---- layouts -----------------------------------------------------------------------------------------------
LLAMA = dict(num_layers=4, mtp_num_layers=D, mtp_loss_weight=WEIGHT)
LAYOUTS = {  # name: (flavour, overrides, train() keywords)
    "tp2 sp": ("llama", dict(num_attention_heads=8, num_query_groups=4), dict(tp=2, sp=True)),
    "pp2 1f1b (untied: the last stage's embedding copy)": ("llama", {}, dict(tp=1, pp=2)),
    "pp2 interleaved vpp2": ("llama", {}, dict(tp=1, pp=2, vpp=2, schedule="interleaved")),
    "cp2": ("llama", {}, dict(tp=1, cp=2)),
    "dp2 zero1": ("llama", {}, dict(tp=1, distributed=True)),
    "pp2 zb-h1 (tied)": ("gpt2", {}, dict(tp=1, pp=2, schedule="zb-h1")),
    "ep2 zero1 (the modules' layers MoE)": ("llama", dict(num_experts=4, moe_top_k=2, first_k_dense=1),
                                            dict(tp=1, ep=2, distributed=True)),
}


def _summary(logged, cfg):
    def before_step(step, chunks, optimizer):
        losses = [m.losses for c in chunks for m in c.modules() if isinstance(m, MultiTokenPrediction)]
        counts = [GLOBAL_BATCH * (cfg.seq_length - k) for k in range(1, D + 1)]
        logged.append(mtp_step_summary(losses[0] if losses else MTPLosses(), counts, "cpu")["mtp_loss"])
    return before_step


def _layouts(rank, world_size):
    failures, serial = [], {}
    for name, (flavour, overrides, kwargs) in LAYOUTS.items():
        cfg = GPTConfig(**model_dict(flavour, **LLAMA, **overrides))
        key = (flavour, tuple(sorted(overrides.items())))
        if key not in serial:
            logged = []
            serial[key] = (train(cfg, before_step=_summary(logged, cfg))[0], logged)
        (ref, ref_logged), logged = serial[key], []
        got, _ = train(cfg, before_step=_summary(logged, cfg), **kwargs)
        try:
            check_equal(name, got, ref)
            torch.testing.assert_close(torch.tensor(logged), torch.tensor(ref_logged), rtol=1e-5, atol=0,
                                       msg=lambda m: f"{name}: logged MTP losses: {m}")
        except AssertionError as e:
            failures.append(str(e))
    return failures


def test_layouts_equal_serial():
    failures = [f"rank {rank}: {f}" for rank, fails in enumerate(spawn(_layouts, 2)) for f in fails]
    assert not failures, "\n".join(failures)


# ---- the trainer's record, generation ------------------------------------------------------------------
TRAINER = """
[model]
num_layers = 2
hidden_size = 32
num_attention_heads = 4
vocab_size = 61
seq_length = 16
make_vocab_size_divisible_by = 8
mtp_num_layers = 2
mtp_loss_weight = 0.3
[training]
micro_batch_size = 2
global_batch_size = 4
train_iters = 1
seed = 7
z_loss = 0.001
[optimizer]
lr = 1e-3
[data]
source = "synthetic"
[run]
tensorboard = false
"""


def test_trainer_logs_each_depth_loss(tmp_path):
    run_train(write_config(tmp_path, TRAINER), str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        row = [json.loads(line) for line in f if '"iteration"' in line][0]
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=61, seq_length=16,
                    make_vocab_size_divisible_by=8, mtp_num_layers=2, mtp_loss_weight=0.3)
    p = {n: t.detach().double() for n, t in GPTModel(cfg).initialize(7).named_parameters()}
    lm, losses, _, z = reference(cfg, p, _rows(cfg, 4, seed=7), z_coeff=0.001)
    assert math.isclose(row["loss"], float(lm.mean()), rel_tol=1e-5)
    assert len(row["mtp_loss"]) == 2
    for got, want in zip(row["mtp_loss"], losses):
        assert math.isclose(got, float(want), rel_tol=1e-5), (row["mtp_loss"], losses)
    assert math.isclose(row["z_loss"], float(z), rel_tol=1e-5)  # the LM tokens' alone


def test_checkpoints_carry_the_modules_across_layouts(tmp_path):
    """Untied, so a pp 2 last stage holds its own copy of the embedding for the modules: a serial checkpoint
    loads at pp 2 (the copy from the embedding's saved tensor), whose checkpoint loads serially again, and
    each resumed step logs the uninterrupted serial run's loss and MTP losses."""
    untied = TRAINER.replace("mtp_loss_weight = 0.3", "mtp_loss_weight = 0.3\ntie_embeddings = false")
    cfg = write_config(tmp_path, untied)
    serial, a, b = (str(tmp_path / n) for n in ("serial", "a", "b"))
    run_train(cfg, serial, "--training.train_iters=4", f"--checkpoint.dir={serial}/ckpt",
              "--checkpoint.save_interval=1")
    run_train(cfg, a, "--training.train_iters=4", "--parallel.pp=2", f"--checkpoint.load={serial}/ckpt/iter_0000002",
              f"--checkpoint.dir={a}/ckpt", "--checkpoint.save_interval=1", nproc=2)
    run_train(cfg, b, "--training.train_iters=4", f"--checkpoint.load={a}/ckpt/iter_0000003")
    expected = {r["iteration"]: r for r in read_metrics(serial)}
    # resumed, not restarted (an unusable checkpoint falls back to a fresh start, which logs the same losses)
    assert [r["iteration"] for r in read_metrics(a)] == [3, 4] and [r["iteration"] for r in read_metrics(b)] == [4]
    for run, iteration in ((a, 3), (a, 4), (b, 4)):
        (row,) = [r for r in read_metrics(run) if r["iteration"] == iteration]
        for key in ("loss", "mtp_loss"):
            torch.testing.assert_close(torch.tensor(row[key]), torch.tensor(expected[iteration][key]), rtol=1e-5,
                                       atol=0, msg=lambda m: f"{run} iteration {iteration} {key}: {m}")


def test_growth_is_refused(tmp_path):
    staged = TRAINER + ("[[stages]]\nname = 'a'\ntrain_iters = 1\n"
                        "[[stages]]\nname = 'deep'\ntrain_iters = 1\ngrow.num_layers = 4\n")
    with pytest.raises(ConfigError, match=r"stages\[1\]\.grow\.num_layers = 4: progressive stacking of a model "
                                          r"with multi-token prediction modules \(model.mtp_num_layers = 2\)"):
        validate(load_config(write_config(tmp_path, staged)), 1)


def test_generation_ignores_the_modules():
    with_mtp = _gpt2().__dict__
    model = GPTModel(_gpt2()).initialize(3).eval()
    plain = GPTModel(GPTConfig(**{**with_mtp, "mtp_num_layers": 0})).initialize(3).eval()
    shared = plain.state_dict()
    assert set(shared) < set(model.state_dict()) and any(k.startswith("mtp.") for k in model.state_dict())
    for name, value in shared.items():  # the same names draw the same initial values (invariant 1)
        assert torch.equal(value, model.state_dict()[name]), name
    prompt = [5, 17, 2, 40]
    assert generate(model, prompt, max_new_tokens=8) == generate(plain, prompt, max_new_tokens=8)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)
        torch.testing.assert_close(model(ids, labels=ids), plain(ids, labels=ids), rtol=0, atol=0)



