#!/usr/bin/env python3
"""Import a Hugging Face transformers model directory as a megagopher checkpoint (docs/interop.md).

    python tools/import_hf.py --model HF_DIR --output DIR [--base-config FILE.toml] [--no-tokenizer]
                              [--tokenizer-kind gpt2|huggingface|sentencepiece|tiktoken]

HF_DIR holds config.json and model.safetensors or pytorch_model.bin (or their sharded *.index.json) of a
LlamaForCausalLM (GQA included; rope_scaling llama3, linear or yarn), GPTNeoXForCausalLM, GPT2LMHeadModel,
CodeGenForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM,
Qwen3MoeForCausalLM or DeepseekV3ForCausalLM (with its multi-token prediction modules when
HF_DIR/mtp.safetensors or the weights' layers num_hidden_layers.. hold them). DIR receives an iteration-0
checkpoint without optimizer state (it loads under any layout, for training and for megagopher.generate),
DIR/config.toml with the matching [model] (over FILE.toml's other sections when --base-config is given;
checkpoint.dir = DIR and checkpoint.load = "auto" unless FILE sets them) and DIR/tokenizer/: the model's
tokenizer whatever its kind (tokenizer.json, a SentencePiece or tiktoken tokenizer.model, or GPT-2's
vocab.json + merges.txt; --tokenizer-kind picks one when HF_DIR holds several) with tokenizer_config.json,
special_tokens_map.json and generation_config.json, named by config.toml's data.tokenizer_dir and
data.tokenizer_kind. A model megagopher cannot compute exactly (dynamic RoPE, an unknown activation, attention
biases on o_proj, ...) is an error naming the feature; so is a tokenizer that does not read, is larger than
the model's embedding, or whose end-of-document token is not config.json's eos_token_id
(--no-tokenizer imports the weights alone).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher.common import run_command  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the transformers model directory")
    p.add_argument("--output", required=True, help="the new checkpoint directory")
    p.add_argument("--base-config", default=None, help="a run config whose other sections config.toml keeps")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer files")
    p.add_argument("--tokenizer-kind", choices=("gpt2", "huggingface", "sentencepiece", "tiktoken"), default=None,
                   help="the tokenizer to carry when HF_DIR holds several (default: detected)")
    args = p.parse_args(argv)
    return run_command("import_hf", lambda: _import(args))


def _import(args):
    from megagopher.export.hf_import import import_hf
    fmt, cfg, path = import_hf(args.model, args.output, args.base_config, tokenizer=not args.no_tokenizer,
                               tokenizer_kind=args.tokenizer_kind)
    tokenizer = os.path.join(args.output, "tokenizer")
    carried = f", {tokenizer}" if os.path.isdir(tokenizer) and not args.no_tokenizer else ""
    print(f"import_hf: wrote {path} ({fmt}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocabulary "
          f"{cfg.vocab_size}){carried} and {os.path.join(args.output, 'config.toml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
