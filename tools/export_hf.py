#!/usr/bin/env python3
"""Export a megagopher checkpoint as a Hugging Face transformers model directory (docs/ARCHITECTURE.md 4.6).

    python tools/export_hf.py --checkpoint DIR --output OUT [--format FORMAT] [--dtype fp32|bf16|fp16]

DIR is a checkpoint root (``latest`` names the newest) or an iter_NNNNNNN directory, saved under any
layout. OUT receives config.json, model.safetensors and, when the run had a tokenizer (data.tokenizer_dir,
or --tokenizer-dir), the files ``AutoTokenizer.from_pretrained(OUT)`` loads it from: GPT-2's vocab.json,
merges.txt, tokenizer_config.json and special_tokens_map.json; or the tokenizer's tokenizer.json or
SentencePiece / tiktoken tokenizer.model with its tokenizer_config.json (written when it has none; a
tokenizer.model needs transformers 5, and tiktoken installed for a tiktoken one), and generation_config.json
when the import carried one. config.json's bos_token_id / eos_token_id are the tokenizer's.
``AutoModelForCausalLM.from_pretrained(OUT)`` loads the model. Every file is written under a temporary name
and renamed. The format is chosen from the model (see megagopher/export/hf.py): llama, mistral, qwen2, qwen3,
gpt_neox, gpt2, codegen, mixtral, qwen3_moe or deepseek_v3 (whose multi-token prediction modules go to
OUT/mtp.safetensors under DeepSeek's names); --format forces one and fails with the reasons when it cannot
express the model.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagopher.common import PRECISION_DTYPES, PRECISIONS, run_command  # noqa: E402
from megagopher.export.hf_arch import FORMATS  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="force a format (default: the one that expresses the model)")
    p.add_argument("--dtype", choices=PRECISIONS, default=None, help="weights' dtype (default: the checkpoint's)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer to write (default: the run's data.tokenizer_dir)")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    args = p.parse_args(argv)
    return run_command("export_hf", lambda: _export(args))


def _export(args):
    from megagopher.export.hf import export_hf
    fmt, path = export_hf(args.checkpoint, args.output, args.format, PRECISION_DTYPES.get(args.dtype),
                          args.tokenizer_dir, tokenizer=not args.no_tokenizer)
    print(f"export_hf: wrote {args.output} ({fmt}) from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
