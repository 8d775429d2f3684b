#!/usr/bin/env python3
"""Import a Hugging Face transformers model directory as a megagopher checkpoint (docs/interop.md).

    python tools/import_hf.py --model HF_DIR --output DIR [--base-config FILE.toml] [--no-tokenizer]

HF_DIR holds config.json and model.safetensors or pytorch_model.bin (or their sharded *.index.json) of a
LlamaForCausalLM (GQA included), GPTNeoXForCausalLM, GPT2LMHeadModel, CodeGenForCausalLM or
MixtralForCausalLM. DIR receives an iteration-0 checkpoint without optimizer state (it loads under any layout, for training and for
megagopher.generate), DIR/config.toml with the matching [model] (over FILE.toml's other sections when
--base-config is given; checkpoint.dir = DIR and checkpoint.load = "auto" unless FILE sets them) and,
when the model's tokenizer is GPT-2 BPE (vocab.json + merges.txt), DIR/tokenizer/. A model megagopher
cannot compute exactly (RoPE scaling, an unknown activation, ...) is an error naming the feature.
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
    args = p.parse_args(argv)
    return run_command("import_hf", lambda: _import(args))


def _import(args):
    from megagopher.export.hf_import import import_hf
    fmt, cfg, path = import_hf(args.model, args.output, args.base_config, tokenizer=not args.no_tokenizer)
    print(f"import_hf: wrote {path} ({fmt}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocabulary "
          f"{cfg.vocab_size}) and {os.path.join(args.output, 'config.toml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
