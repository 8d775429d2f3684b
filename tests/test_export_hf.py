"""tools/export_hf.py: each Hugging Face format (codegen too) from a tiny trained checkpoint gives, through
transformers' AutoModelForCausalLM, the logits megagopher's own model gives (fp32); the tokenizer files load with
AutoTokenizer and encode as ours; combinations no format expresses fail clearly."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from megagopher.data.bpe_trainer import count_words, train_bpe, write_tokenizer_files
from megagopher.data.math_problems import generate_problems
from megagopher.data.tokenizer import load_tokenizer
from megagopher.export.hf import ExportError, choose_format, export_hf
from megagopher.export.loading import model_config_of, open_checkpoint
from megagopher.model import GPTConfig, GPTModel
from megagopher.training.checkpoint import load_weights
from train_utils import ROOT, run_train, write_config

FORMATS = {
    # Llama as released: no biases, untied output head; GQA (2 groups of 4 heads); with a tokenizer.
    "llama": ["--model.bias=false", "--model.tie_embeddings=false"],
    # GPT-J-like: parallel residual with one norm, partial rotary, tied embeddings, no biases, exact GeLU.
    "gpt_neox": ["--model.normalization=layernorm", "--model.activation=gelu_exact", "--model.parallel_residual=true",
                 "--model.rotary_percent=0.5", "--model.num_query_groups=4", "--model.bias=false"],
    # CodeGen: parallel residual, partial rotary, untied head with its bias, no attention biases (none at all).
    "codegen": ["--model.normalization=layernorm", "--model.activation=gelu", "--model.parallel_residual=true",
                "--model.rotary_percent=0.5", "--model.num_query_groups=4", "--model.bias=false",
                "--model.tie_embeddings=false", "--model.output_bias=true"],
    # GPT-2: learned positions, biases, untied output head.
    "gpt2": ["--model.normalization=layernorm", "--model.activation=gelu", "--model.position_embedding=learned",
             "--model.num_query_groups=4", "--model.tie_embeddings=false"],
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tok"))
    texts = [p["text"] for p in generate_problems(40, seed=3)]
    write_tokenizer_files(directory, *train_bpe(count_words(texts), 320))
    return directory


@pytest.fixture(scope="module", params=list(FORMATS))
def trained(request, tmp_path_factory, tokenizer_dir):
    fmt = request.param
    tmp = tmp_path_factory.mktemp(fmt)
    extra = list(FORMATS[fmt])
    if fmt == "llama":
        extra += [f"--data.tokenizer_dir={tokenizer_dir}",
                  f"--model.vocab_size={load_tokenizer(tokenizer_dir).vocab_size}"]
    run_train(write_config(tmp), str(tmp / "run"), f"--checkpoint.dir={tmp / 'ckpt'}", "--training.train_iters=2",
              "--model.num_layers=2", "--model.init_std=0.2", *extra)
    return fmt, str(tmp / "ckpt"), tmp


def our_logits(ckpt, ids):
    reader = open_checkpoint(ckpt)
    model = GPTModel(model_config_of(reader))
    load_weights(reader, [model])
    with torch.no_grad():
        return model.eval()(torch.tensor(ids))[..., :model.cfg.vocab_size]


def test_export_matches_transformers_logits(trained):
    fmt, ckpt, tmp = trained
    out = str(tmp / "hf")
    if fmt == "gpt2":  # the command line once; the other formats through the Python API
        proc = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", ckpt, "--output", out],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0 and "(gpt2)" in proc.stdout, proc.stderr
    else:
        assert export_hf(ckpt, out)[0] == fmt
    config = json.load(open(os.path.join(out, "config.json")))
    cfg = model_config_of(open_checkpoint(ckpt))
    assert config["vocab_size"] == cfg.vocab_size  # the real vocabulary, without TP padding
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert config["model_type"] == hf.config.model_type == fmt
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits
    ours = our_logits(ckpt, ids)
    assert ours.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    if fmt == "llama":
        check_tokenizer_files(out, config, run_tokenizer=load_tokenizer(tmp_tokenizer_dir(ckpt)))
    else:
        assert "vocab.json" not in os.listdir(out)  # the run had no tokenizer


def tmp_tokenizer_dir(ckpt):
    from megagopher.export.loading import tokenizer_dir_of
    return tokenizer_dir_of(open_checkpoint(ckpt))


def check_tokenizer_files(out, config, run_tokenizer):
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "Ava buys 12 notebooks at $3.50 each.\nThe answer is 42. Ünïcode too"
    assert theirs.encode(text) == run_tokenizer.encode(text)
    assert theirs.decode(run_tokenizer.encode(text)) == text
    assert theirs.eos_token_id == run_tokenizer.eod == config["eos_token_id"]


def test_formats_that_cannot_express_a_model():
    def cfg(**kw):
        base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=50, seq_length=8)
        return GPTConfig(**{**base, **kw})
    assert choose_format(cfg(normalization="rmsnorm", activation="swiglu", position_embedding="rope")) == "llama"
    assert choose_format(cfg(position_embedding="rope", parallel_residual=True)) == "gpt_neox"
    assert choose_format(cfg()) == "gpt2"
    with pytest.raises(ExportError, match=r"no Hugging Face format.*llama needs normalization 'rmsnorm'"):
        choose_format(cfg(activation="swiglu", position_embedding="rope"))
    with pytest.raises(ExportError, match=r"gpt_neox.*no grouped-query attention"):
        choose_format(cfg(position_embedding="rope", num_query_groups=2), "gpt_neox")
    with pytest.raises(ExportError, match=r"llama.*rotates the whole head"):
        choose_format(cfg(normalization="rmsnorm", activation="swiglu", position_embedding="rope",
                          rotary_percent=0.5), "llama")
    with pytest.raises(ExportError, match=r"gpt2.*parallel residual"):
        choose_format(cfg(parallel_residual=True), "gpt2")
    codegen = dict(position_embedding="rope", parallel_residual=True, output_bias=True, tie_embeddings=False)
    assert choose_format(cfg(**codegen)) == "codegen"  # the only format with an output bias
    with pytest.raises(ExportError, match=r"llama.*has no output-layer bias"):
        choose_format(cfg(**codegen, normalization="rmsnorm", activation="swiglu"), "llama")
    with pytest.raises(ExportError, match=r"codegen.*rotary base 10000 only, not rope_theta = 500000.0"):
        choose_format(cfg(**codegen, rope_theta=5e5), "codegen")
    with pytest.raises(ExportError, match=r"codegen.*divisible by 4, not 2"):
        choose_format(cfg(**codegen, num_attention_heads=2), "codegen")




def test_transformers_builds_a_model_from_the_repository_root():
    """Regression (issue 24): run from the repository root, as README's ``python -m pytest tests`` is, the root
    is on sys.path; our top-level ``kernels/`` folder must not shadow Hugging Face's ``kernels``
    distribution, which transformers' model code imports (ImportError: cannot import name 'CUDAProperties')."""
    script = ("import torch, transformers\n"
              "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
              " num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)\n"
              "model = transformers.LlamaForCausalLM(cfg).eval()\n"
              "with torch.no_grad():\n"
              "    logits = model(torch.arange(8).view(1, 8)).logits\n"
              "assert logits.shape == (1, 8, 64) and torch.isfinite(logits).all()\n"
              "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
