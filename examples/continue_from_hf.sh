#!/usr/bin/env bash
# Continue pretraining a Hugging Face model, end to end on CPU with nothing downloaded (docs/interop.md):
#
#   bash examples/continue_from_hf.sh [--section.key=value ...]      (overrides go to megagopher.train)
#
#  1. builds a byte-level BPE tokenizer.json with Hugging Face `tokenizers` (Llama 3's layout: BOS prepended)
#     from the Python standard library's docstrings and code, and a small random LlamaForCausalLM that uses it
#     (transformers save_pretrained): the "Hugging Face model" (WORK/hf_model);
#  2. imports it (tools/import_hf.py): checkpoint, tokenizer and config.toml in WORK/model;
#  3. writes a text corpus as Parquet and preprocesses it with the imported tokenizer (tools/preprocess_data.py);
#  4. continues pretraining at tp 2 x pp 2 on 4 CPU ranks (megagopher.train, torchrun);
#  5. generates a greedy continuation of a prompt (python -m megagopher.generate --prompt);
#  6. exports the trained checkpoint (tools/export_hf.py) and checks that transformers' AutoTokenizer and
#     AutoModelForCausalLM on the export generate the same text; exits 1 if they do not.
#
# WORK (default runs/continue_from_hf) is rebuilt on every run. STEPS sets the training iterations (default:
# the config's 150, a few minutes on a 2-core machine); SHORT=1 shrinks everything for CI (a smaller corpus and
# 3 steps unless STEPS says otherwise). PROMPT and NEW_TOKENS set the generation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# The environment (examples/setup_env.sh) unless it already has what this example uses.
$PY -c "import megagopher, transformers, tokenizers, pyarrow" 2>/dev/null || bash examples/setup_env.sh
WORK=${WORK:-runs/continue_from_hf}
PROMPT=${PROMPT:-"Return the number of"}
NEW_TOKENS=${NEW_TOKENS:-24}
if [ "${SHORT:-0}" = 1 ]; then STEPS=${STEPS:-3}; CORPUS_KB=${CORPUS_KB:-300}; else CORPUS_KB=${CORPUS_KB:-2000}; fi
STEPS_ARG=()
if [ -n "${STEPS:-}" ]; then STEPS_ARG=("--training.train_iters=$STEPS"); fi
export OMP_NUM_THREADS=1
START=$SECONDS
phase() { echo "== [$((SECONDS - START))s] $*"; }
rm -rf "$WORK/hf_model" "$WORK/model" "$WORK/data" "$WORK/run" "$WORK/export"
mkdir -p "$WORK/data"

phase "1/6 building a tokenizer.json and a random Llama that uses it in $WORK/hf_model"
$PY - "$WORK" "$CORPUS_KB" <<'PYEND'
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
import torch, transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from megagopher.data.stdlib_corpus import build_stdlib_corpora
work, kb = sys.argv[1], int(sys.argv[2])
general, code = build_stdlib_corpora(kb * 700, kb * 300, seed=0)
texts = [r["text"] for r in general + code]
# The corpus, as Parquet (one "text" column, row groups of 256 documents), for step 3.
pq.write_table(pa.table({"text": texts}), os.path.join(work, "data", "corpus.parquet"), row_group_size=256)
print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB of text -> {work}/data/corpus.parquet")
bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
tok = Tokenizer(models.BPE())
pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")   # Llama 3's pre-tokenisation
tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=[bos, eos], show_progress=False,
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])])
out = os.path.join(work, "hf_model")
os.makedirs(out)
tok.save(os.path.join(out, "tokenizer.json"))
with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
               "model_max_length": 256, "clean_up_tokenization_spaces": False}, f, indent=2)
config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=352,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=tok.token_to_id(bos),
                                  eos_token_id=tok.token_to_id(eos), tie_word_embeddings=False)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(out)
print(f"tokenizer: {tok.get_vocab_size()} tokens; model: LlamaForCausalLM, {config.num_hidden_layers} layers, "
      f"hidden {config.hidden_size}, GQA {config.num_attention_heads}/{config.num_key_value_heads} -> {out}")
PYEND

phase "2/6 importing it (tools/import_hf.py)"
$PY tools/import_hf.py --model "$WORK/hf_model" --output "$WORK/model" \
    --base-config examples/configs/continue_from_hf_cpu.toml

phase "3/6 preprocessing the Parquet corpus with the imported tokenizer"
$PY tools/preprocess_data.py --input "$WORK/data/corpus.parquet" --tokenizer-dir "$WORK/model/tokenizer" \
    --output-prefix "$WORK/data/corpus" --workers 2 --append-eod --log-interval 2

phase "4/6 continuing pretraining at tp 2 x pp 2 (4 ranks)"
$PY -m torch.distributed.run --standalone --nproc-per-node 4 -m megagopher.train \
    --config "$WORK/model/config.toml" "--data.blend=[[1.0, \"$WORK/data/corpus_text_document\"]]" \
    "--run.dir=$WORK/run" "${STEPS_ARG[@]}" "$@"

# One process from here on: both cores for it.
export OMP_NUM_THREADS=2
phase "5/6 generating with megagopher.generate (greedy): prompt \"$PROMPT\""
$PY -m megagopher.generate --checkpoint "$WORK/model" --prompt "$PROMPT" --greedy \
    --max-new-tokens "$NEW_TOKENS" > "$WORK/megagopher_continuation.txt"
cat "$WORK/megagopher_continuation.txt"

phase "6/6 exporting (tools/export_hf.py) and generating with transformers"
$PY tools/export_hf.py --checkpoint "$WORK/model" --output "$WORK/export"
$PY - "$WORK" "$PROMPT" "$NEW_TOKENS" <<'PYEND'
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
work, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(os.path.join(work, "export"))
model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "export"), dtype=torch.float32).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
if out and out[-1] == tokenizer.eos_token_id:   # megagopher stops at the end of a document without printing it
    out = out[:-1]
theirs = tokenizer.decode(out, skip_special_tokens=False)
with open(os.path.join(work, "megagopher_continuation.txt"), encoding="utf-8") as f:
    ours = f.read()[:-1]   # print's newline
print(f"transformers: {theirs!r}\nmegagopher:   {ours!r}")
if theirs != ours:
    print("error: transformers' continuation of the export differs from megagopher.generate's", file=sys.stderr)
    sys.exit(1)
print(f"same continuation: AutoTokenizer + AutoModelForCausalLM on {work}/export generate what megagopher did "
      f"({len(out)} tokens)")
PYEND
phase "done"
