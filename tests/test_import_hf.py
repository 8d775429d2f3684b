"""tools/import_hf.py: small random transformers models of the four architectures (built in-process,
save_pretrained, no download) imported as megagopher checkpoints give transformers' logits (fp32) at tp1
and at tp2 x pp2, the same greedy generation, and survive import -> export -> import exactly; training
resumes from an imported checkpoint under tp2 x pp2; what cannot be expressed fails naming the feature."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megagopher.config import load_config
from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files
from megagopher.data.math_problems import generate_problems
from megagopher.export.hf import export_hf
from megagopher.export.hf_config import DEFAULTS, HFImportError, model_config
from megagopher.export.hf_import import import_hf, our_tensors, read_weights
from megagopher.export.loading import model_config_of, open_checkpoint
from megagopher.generate import generate, load_model
from megagopher.model import GPTConfig
from megagopher.testing import spawn
from megagopher.training.ckpt_load import ModelMismatch, check_model_matches
from megagopher.training.resume import check_load_paths
from megagopher.config import ConfigError
from train_utils import ROOT, read_metrics, run_train



def tf():
    import transformers  # here, not at import time: the spawned ranks import this module and need it not
    return transformers

RTOL = ATOL = 1e-4  # as test_export_hf.py
SEQ = 12


def hf_configs(vocab):
    """Each architecture with what sets it apart: Llama with GQA, attention biases but no MLP biases and an
    untied head; NeoX with partial rotary and the exact GeLU; GPT-2 tied; CodeGen with mp_num 4 blocks of
    2 heads and 4 of 8 channels rotated."""
    small = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {
        "llama": tf().LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          attention_bias=True, mlp_bias=False, tie_word_embeddings=False, **small),
        "gpt_neox": tf().GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False,
                                               hidden_act="gelu", max_position_embeddings=64, **small),
        "gpt2": tf().GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0, **small),
        "codegen": tf().CodeGenConfig(n_embd=64, n_layer=2, n_head=8, rotary_dim=4, n_positions=64, **small),
    }


def random_hf_model(config, seed):
    torch.manual_seed(seed)
    model = tf().AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # every tensor random, norms and biases included: nothing is tested by a zero
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{arch: (transformers model, its directory, the imported checkpoint)}; GPT-2 with a BPE tokenizer."""
    tmp = tmp_path_factory.mktemp("import")
    tok_dir = str(tmp / "tok")
    tokenizer = train_bpe(count_words([p["text"] for p in generate_problems(30, seed=3)]), 300)
    write_tokenizer_files(tok_dir, *tokenizer)
    vocab = len(json.load(open(os.path.join(tok_dir, "vocab.json"))))
    out = {}
    for seed, (arch, config) in enumerate(hf_configs(vocab).items()):
        model = random_hf_model(config, seed)
        hf_dir, mg_dir = str(tmp / f"hf_{arch}"), str(tmp / f"mg_{arch}")
        model.save_pretrained(hf_dir)
        if arch == "gpt2":  # our trainer writes GPT-2's files (merges.txt with its "#version" line)
            write_tokenizer_files(hf_dir, *tokenizer)
        fmt, _, _ = import_hf(hf_dir, mg_dir)
        assert fmt == arch
        out[arch] = (model, hf_dir, mg_dir)
    return out


def prompt(vocab, seed=0, b=2):
    return torch.randint(0, vocab, (b, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2", "codegen"])
def test_logits_and_greedy_generation_equal_transformers(imported, arch):
    model, _, mg_dir = imported[arch]
    loaded = load_model(mg_dir, tp=1, device="cpu")
    ids = prompt(model.config.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
        ours = loaded.model.gather_logits(loaded.model(ids))
    assert theirs.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    expected = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 5:].tolist()
    assert generate(loaded, ids[0, :5].tolist(), max_new_tokens=8, greedy=True) == expected


def test_tokenizer_and_config_toml(imported):
    _, hf_dir, mg_dir = imported["gpt2"]
    loaded = load_model(mg_dir, tp=1, device="cpu", need_tokenizer=True)
    theirs = tf().AutoTokenizer.from_pretrained(hf_dir)
    text = "Ava buys 12 notebooks at $3.50 each."
    assert loaded.tokenizer.encode(text) == theirs.encode(text)
    cfg = load_config(os.path.join(mg_dir, "config.toml"))
    assert cfg.model == model_config_of(open_checkpoint(mg_dir))
    assert cfg.checkpoint.load == "auto" and cfg.checkpoint.dir == os.path.abspath(mg_dir)
    assert cfg.checkpoint.initial_load == os.path.join(os.path.abspath(mg_dir), "iter_0000000")
    assert cfg.data.tokenizer_dir == os.path.join(os.path.abspath(mg_dir), "tokenizer")
    assert "tokenizer" not in os.listdir(imported["llama"][2])  # its directory had no tokenizer files


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2", "codegen"])
def test_import_export_import_is_exact(imported, arch, tmp_path):
    _, hf_dir, mg_dir = imported[arch]
    assert export_hf(mg_dir, str(tmp_path / "hf"), tokenizer=False)[0] == arch
    import_hf(str(tmp_path / "hf"), str(tmp_path / "mg"), tokenizer=False)
    first, second = open_checkpoint(mg_dir), open_checkpoint(str(tmp_path / "mg"))
    assert model_config_of(first) == model_config_of(second)
    assert sorted(first.names()) == sorted(second.names())
    for name in first.names():
        assert torch.equal(first.full_tensor(name), second.full_tensor(name)), name
    # The exported directory is the original model again: its tensors, plus zero biases where the format
    # has one switch for several (Llama's mlp_bias follows attention_bias).
    from safetensors.torch import load_file
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(original) <= set(exported)
    for name, tensor in exported.items():
        assert torch.equal(original.get(name, torch.zeros_like(tensor)), tensor), name


# -- tp2 x pp2 ------------------------------------------------------------------------------------------------
def _tp2_pp2_logits(rank, world, checkpoints, ids):
    """Each checkpoint's logits under tp2 x pp2: stage 0's hidden states go to stage 1 by send/recv."""
    import torch.distributed as dist
    from megagopher import parallel_state as ps
    from megagopher.pipeline_parallel.stages import build_model_chunks
    from megagopher.training.checkpoint import load_weights
    ps.initialize_model_parallel(tp=2, pp=2)
    out = {}
    for arch, path in checkpoints.items():
        reader = open_checkpoint(path)
        cfg = model_config_of(reader)
        (chunk,) = build_model_chunks(cfg)
        load_weights(reader, [chunk])
        chunk.eval()
        with torch.no_grad():
            if ps.is_pipeline_first_stage():
                dist.send(chunk(input_ids=ids).contiguous(), ps.get_pp_next_rank())
            else:
                hidden = torch.empty(SEQ, ids.shape[0], cfg.hidden_size)
                dist.recv(hidden, ps.get_pp_prev_rank())
                out[arch] = chunk.gather_logits(chunk(hidden_states=hidden))
    return out


def test_logits_equal_transformers_at_tp2_pp2(imported):
    ids = prompt(imported["gpt2"][0].config.vocab_size, seed=1)
    results = spawn(_tp2_pp2_logits, 4, {arch: mg for arch, (_, _, mg) in imported.items()}, ids)
    for arch, (model, _, _) in imported.items():
        with torch.no_grad():
            theirs = model(ids).logits
        for rank in (2, 3):  # the last stage's two TP ranks
            torch.testing.assert_close(results[rank][arch], theirs, rtol=RTOL, atol=ATOL)


# -- training from an import ----------------------------------------------------------------------------------
def test_training_from_an_import_resumes_under_tp2_pp2(imported, tmp_path):
    """CodeGen (parallel residual, untied head with its bias): 4 steps with a save at 2, and a second run
    resuming from that save, whose steps 3 and 4 are the first run's."""
    mg_dir = imported["codegen"][2]
    config = os.path.join(mg_dir, "config.toml")
    common = ("--parallel.tp=2", "--parallel.pp=2", "--model.seq_length=16", "--training.micro_batch_size=1",
              "--training.global_batch_size=4", "--training.log_interval=1", "--optimizer.lr=1e-3",
              "--optimizer.warmup_iters=1", "--run.tensorboard=false")
    a = str(tmp_path / "a")
    proc = run_train(config, a, *common, "--training.train_iters=4", "--checkpoint.save_interval=2",
                     f"--checkpoint.dir={tmp_path / 'a_ckpt'}", f"--checkpoint.load={mg_dir}", nproc=4)
    assert f"resumed from {mg_dir}/iter_0000000" in proc.stdout
    first = {r["iteration"]: r["loss"] for r in read_metrics(a)}
    assert sorted(first) == [1, 2, 3, 4]
    b = str(tmp_path / "b")
    run_train(config, b, *common, "--training.train_iters=4", f"--checkpoint.dir={tmp_path / 'b_ckpt'}",
              f"--checkpoint.load={tmp_path / 'a_ckpt'}/iter_0000002", nproc=4)
    resumed = {r["iteration"]: r["loss"] for r in read_metrics(b)}
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert resumed[it] == pytest.approx(first[it], rel=1e-5), it


def test_an_import_starts_from_its_weights_whatever_checkpoint_dir(imported, tmp_path):
    """The bug: run with another checkpoint.dir, load = "auto" found nothing there and the run trained from
    random initialisation without a word. The import's config.toml starts from its weights (initial_load,
    logged) whatever checkpoint.dir is set: step 1's loss is that of a run resuming from the import itself
    (checkpoint.load naming it), not an initialised model's; after its first saves, the run resumes from
    them and continues as the uninterrupted run does."""
    mg_dir = imported["gpt2"][2]
    config = os.path.join(mg_dir, "config.toml")
    common = ("--model.seq_length=16", "--training.micro_batch_size=2", "--training.global_batch_size=4",
              "--training.log_interval=1", "--optimizer.lr=1e-3", "--optimizer.warmup_iters=1",
              "--run.tensorboard=false")
    ckpt = str(tmp_path / "own_ckpt")
    first = run_train(config, str(tmp_path / "a"), *common, "--training.train_iters=4", "--training.exit_after_iters=2",
                      f"--checkpoint.dir={ckpt}")
    assert f"megagopher: weights from {mg_dir}/iter_0000000 (initial load" in first.stdout, first.stdout[-2000:]
    again = run_train(config, str(tmp_path / "a"), *common, "--training.train_iters=4", f"--checkpoint.dir={ckpt}")
    assert f"megagopher: resumed from {ckpt}/iter_0000002" in again.stdout, again.stdout[-2000:]
    whole = str(tmp_path / "whole")  # the reference: resuming from the import itself, 4 steps at once
    run_train(config, whole, *common, "--training.train_iters=4", f"--checkpoint.load={mg_dir}",
              f"--checkpoint.dir={tmp_path / 'whole_ckpt'}")
    assert [r["loss"] for r in read_metrics(str(tmp_path / "a"))] == [r["loss"] for r in read_metrics(whole)]
    fresh = run_train(config, str(tmp_path / "fresh"), *common, "--training.train_iters=1",
                      f"--checkpoint.dir={tmp_path / 'fresh_ckpt'}", "--checkpoint.initial_load=")
    assert "megagopher: weights from initialisation (training.seed = " in fresh.stdout
    assert read_metrics(str(tmp_path / "fresh"))[0]["loss"] != pytest.approx(read_metrics(whole)[0]["loss"], rel=0.01)


def test_an_unusable_initial_load_is_a_config_error(imported, tmp_path):
    """Named before any process communicates: a path holding no checkpoint, and another model's."""
    gpt2, llama = imported["gpt2"][2], imported["llama"][2]
    cfg = load_config(os.path.join(gpt2, "config.toml"), {"checkpoint.dir": str(tmp_path / "empty")})
    vocab = cfg.model.vocab_size
    check_load_paths(cfg, vocab)
    with pytest.raises(ConfigError, match="checkpoint.initial_load = .*: no checkpoint there"):
        check_load_paths(dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, initial_load=str(tmp_path / "nothing"))), vocab)
    with pytest.raises(ModelMismatch, match=f"checkpoint {llama}/iter_0000000 holds a model with"):
        check_load_paths(dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, initial_load=llama)), vocab)
    proc = run_train(os.path.join(gpt2, "config.toml"), str(tmp_path / "run"), f"--checkpoint.dir={tmp_path / 'c'}",
                     f"--checkpoint.initial_load={tmp_path / 'nothing'}", check=False)
    assert proc.returncode == 2 and "config error: checkpoint.initial_load = " in proc.stderr, proc.stderr[-2000:]


# -- errors ---------------------------------------------------------------------------------------------------
def test_a_run_whose_model_differs_is_a_config_error(imported, tmp_path):
    mg_dir = imported["gpt_neox"][2]
    reader = open_checkpoint(mg_dir)
    config = os.path.join(mg_dir, "config.toml")
    for key, value, named in (("activation", "gelu", "model.activation = 'gelu'"),
                              ("hidden_size", 64, "model.hidden_size = 64"),
                              ("num_layers", 3, "model.num_layers = 3")):
        cfg = load_config(config, {f"model.{key}": value})
        with pytest.raises(ModelMismatch, match=named):
            check_model_matches(reader, cfg, cfg.model.vocab_size)
    check_model_matches(reader, load_config(config, {"model.dropout": 0.1}), reader.meta["tensors"][
        "embedding.word.weight"]["full_shape"][0])  # a training-time key is the run's to choose
    proc = run_train(config, str(tmp_path / "run"), f"--checkpoint.load={mg_dir}", "--model.activation=gelu",
                     "--model.seq_length=8", check=False)
    assert proc.returncode == 2 and "config error: model.activation = 'gelu' but checkpoint" in proc.stderr


def _neox(**kw):
    base = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 64}
    return {**base, **kw}


UNSUPPORTED = [
    ({"architectures": ["BertForMaskedLM"]}, "architectures = \\['BertForMaskedLM'\\] is not supported"),
    ({**_neox(architectures=["LlamaForCausalLM"]), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_scaling"),  # linear / llama3 / yarn are read (tests/test_hf_oracle_arch.py); dynamic is not
    ({**_neox(architectures=["LlamaForCausalLM"]), "hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
    (_neox(hidden_act="relu"), "hidden_act = 'relu' is not supported"),
    (_neox(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'default' only"),
    ({"architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 4,
      "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"architectures": ["CodeGenForCausalLM"], "vocab_size": 64, "n_embd": 48, "n_layer": 1, "n_head": 6,
      "rotary_dim": 4}, "n_head = 6 is not divisible by CodeGen's mp_num 4"),
]


@pytest.mark.parametrize("config, message", UNSUPPORTED)
def test_unsupported_configs_name_the_feature(config, message):
    with pytest.raises(HFImportError, match=message):
        model_config(config, "config.json")


def test_odd_rotary_and_weights_we_cannot_express(tmp_path):
    with pytest.raises(HFImportError, match="rotates 3 channels of head_dim 8"):
        model_config(_neox(rotary_pct=0.375), "config.json")
    config = tf().GPTNeoXConfig(**{k: v for k, v in _neox().items() if k != "architectures"},
                                        use_parallel_residual=True, rotary_pct=0.5)
    random_hf_model(config, 5).save_pretrained(str(tmp_path))  # Pythia-style: a parallel residual, two norms
    theirs = read_weights(str(tmp_path))
    fmt, cfg = model_config({**config.to_dict(), "architectures": ["GPTNeoXForCausalLM"]}, "config.json")
    with pytest.raises(HFImportError, match="layer 0 has a parallel residual with two different norms"):
        our_tensors(fmt, cfg, theirs)
    fmt, cfg = model_config({**config.to_dict(), "architectures": ["GPTNeoXForCausalLM"],
                             "use_parallel_residual": False}, "config.json")
    with pytest.raises(HFImportError, match="1 tensors have no place.*gpt_neox.extra.weight"):
        our_tensors(fmt, cfg, {**theirs, "gpt_neox.extra.weight": torch.zeros(2)})


def test_defaults_are_transformers_and_the_new_model_keys():
    classes = {"llama": tf().LlamaConfig, "gpt_neox": tf().GPTNeoXConfig,
               "gpt2": tf().GPT2Config, "codegen": tf().CodeGenConfig}
    for arch, cls in classes.items():
        reference = cls().to_dict()
        for key, value in DEFAULTS[arch].items():
            if value is not None:
                assert reference[key] == value, (arch, key)
    cfg = GPTConfig(activation="gelu_exact", output_bias=True, tie_embeddings=False, vocab_size=50,
                    make_vocab_size_divisible_by=64)
    from megagopher.model import GPTModel
    model = GPTModel(cfg)
    assert model.output_bias.shape == (64,) and model.output_bias.full_shape == (50,)
    assert model.layers["0"].mlp.approximate == "none"
    assert dataclasses.replace(cfg, activation="gelu").activation == "gelu"


def test_command_line(imported, tmp_path):
    out = str(tmp_path / "cli")
    proc = subprocess.run([sys.executable, "tools/import_hf.py", "--model", imported["llama"][1], "--output", out],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "(llama: 2 layers" in proc.stdout, proc.stderr
    assert load_config(os.path.join(out, "config.toml")).model == model_config_of(open_checkpoint(imported["llama"][2]))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        import_hf(imported["llama"][1], out)


def test_codegen_export_refuses_attention_biases(imported, tmp_path):
    """CodeGen's attention has no biases: an imported CodeGen (zero attention biases) given one that is not
    zero can no longer be exported as CodeGen."""
    from megagopher.export.hf import ExportError
    from megagopher.export.hf_import import build_model
    from megagopher.training.checkpoint import save_weights_only
    reader = open_checkpoint(imported["codegen"][2])
    cfg = model_config_of(reader)
    tensors = {name: reader.full_tensor(name) for name in reader.names()}
    assert not torch.count_nonzero(tensors["layers.1.attention.proj.bias"])
    tensors["layers.1.attention.proj.bias"] = torch.full((cfg.hidden_size,), 0.5)
    save_weights_only(str(tmp_path / "ckpt"), 0, build_model(cfg, tensors), reader.meta["progress"],
                      load_config(os.path.join(imported["codegen"][2], "config.toml")))
    with pytest.raises(ExportError, match="codegen.*layers.1.attention.proj.bias is not zero"):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), fmt="codegen", tokenizer=False)
