"""Mixtral export and import: a tiny MoE checkpoint exported as MixtralForCausalLM gives megagopher's logits
(fp32) and greedy tokens in transformers; importing the export gives back the checkpoint's tensors and
[model]; a MoE model Mixtral cannot express fails naming the key."""
import pytest
import torch
import transformers

from megagopher.export.hf import ExportError, choose_format, export_hf
from megagopher.export.hf_import import import_hf
from megagopher.export.loading import model_config_of, open_checkpoint
from megagopher.generate import generate, load_model
from megagopher.model import GPTConfig
from megagopher.training.ckpt_load import ARCHITECTURE_KEYS, MOE_KEYS
from train_utils import run_train, write_config

MOE = ["--model.num_experts=4", "--model.moe_top_k=2", "--model.moe_ffn_hidden_size=24", "--model.bias=false",
       "--model.tie_embeddings=false", "--model.moe_aux_loss_coeff=0.01", "--model.moe_z_loss_coeff=0.001"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixtral")
    run_train(write_config(tmp), str(tmp / "run"), f"--checkpoint.dir={tmp / 'ckpt'}", "--training.train_iters=2",
              "--model.num_layers=2", "--model.init_std=0.2", *MOE)
    assert export_hf(str(tmp / "ckpt"), str(tmp / "hf"))[0] == "mixtral"
    return str(tmp / "ckpt"), str(tmp / "hf"), tmp


def test_logits_and_greedy_generation(exported):
    ckpt, out, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded = load_model(ckpt, tp=1, device="cpu")
    cfg = loaded.model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = loaded.model.gather_logits(loaded.model.eval()(ids))
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    expected = hf.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 5:].tolist()
    assert generate(loaded, ids[0, :5].tolist(), max_new_tokens=8, greedy=True) == expected


def test_import_of_the_export_is_exact(exported):
    ckpt, out, tmp = exported
    import_hf(out, str(tmp / "mg"), tokenizer=False)
    first, second = open_checkpoint(ckpt), open_checkpoint(str(tmp / "mg"))
    ours, theirs = model_config_of(first), model_config_of(second)
    for key in ARCHITECTURE_KEYS + MOE_KEYS + ("num_layers", "num_experts"):  # vocabulary padding is the run's
        assert getattr(ours, key) == getattr(theirs, key), key
    assert sorted(first.names()) == sorted(second.names())
    for name in first.names():
        assert torch.equal(first.full_tensor(name), second.full_tensor(name)), name


def test_the_mapping_round_trips_in_memory(exported):
    """The config and tensor mapping alone (no checkpoint write), from both of transformers' names."""
    from megagopher.export.hf_config import model_config
    from megagopher.export.hf_import import our_tensors, read_config, read_weights
    ckpt, out, _ = exported
    reader = open_checkpoint(ckpt)
    fmt, cfg = model_config(*read_config(out))
    # The vocabulary padding is the run's TP layout, not the model's (import_hf's checkpoint keeps ours).
    original = {**model_config_of(reader).to_dict(), "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by}
    assert fmt == "mixtral" and cfg.to_dict() == original
    fused = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for theirs in (read_weights(out), fused):
        ours = our_tensors(fmt, cfg, dict(theirs))
        assert sorted(ours) == sorted(reader.names())
        for name in reader.names():
            assert torch.equal(ours[name], reader.full_tensor(name)), name


@pytest.mark.parametrize("key, value, message", [
    ("moe_shared_experts", 1, "moe_shared_experts = 1"), ("moe_layer_freq", 2, "moe_layer_freq = 2"),
    ("moe_router", "sigmoid", "moe_router = 'sigmoid'"), ("moe_capacity_factor", 1.0, "moe_capacity_factor = 1.0"),
    ("bias", True, "model.bias = true")])
def test_what_mixtral_cannot_express(key, value, message):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50, seq_length=8, bias=False,
                normalization="rmsnorm", activation="swiglu", position_embedding="rope", num_experts=4)
    assert choose_format(GPTConfig(**base)) == "mixtral"
    with pytest.raises(ExportError, match=f"mixtral.*{message}"):
        choose_format(GPTConfig(**{**base, key: value}))
    with pytest.raises(ExportError, match="llama.*has no experts"):
        choose_format(GPTConfig(**base), "llama")
