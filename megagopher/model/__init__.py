"""The GPT decoder: configuration and model, built from the tensor-parallel layers and kernels."""
from .config import GPTConfig
from .gpt import GPTModel

__all__ = ["GPTConfig", "GPTModel"]
