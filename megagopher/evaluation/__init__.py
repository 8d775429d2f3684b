"""The evaluation tasks behind ``python -m megagopher.evaluate`` (the command line lives in
megagopher/evaluate.py; docs/evaluation.md has every format):

* ``math_task``: final-answer accuracy on math word problems (split by the rows' ``steps``);
* ``choice``: multiple choice scored by log-likelihood;
* ``squad``: SQuAD-style extractive QA, exact match and F1;
* ``mtpb``: MTPB-style multi-turn program synthesis, programs run in megagopher.sandbox;
* ``loss``: mean per-token loss and perplexity of held-out documents;
* ``common``: reading JSONL, prompts after the tokenizer's document prefix, batching a task's model calls
  (megagopher.generate.generate_batch / score_batch, ``--batch-size``), writing results and metrics lines;
* ``lm_eval_adapter``: the model adapter for EleutherAI's lm-evaluation-harness.
"""
