"""Reading a checkpoint without a process group, and writing it in other forms: a Hugging Face
``transformers`` model directory (hf.py), another parallel layout or one file of full tensors
(convert.py); and the way in, a ``transformers`` directory imported as a checkpoint (hf_import.py, its
config.json read by hf_config.py). hf_arch.py maps the weights both ways. loading.py finds a checkpoint,
rebuilds its model config and tokenizer; generation and evaluation use it too.

Import the submodules directly; they import torch only, never the training loop.
"""
