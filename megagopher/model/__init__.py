"""The GPT decoder, built from the tensor-parallel layers and kernels. Its configuration is the [model]
config section (megagopher/config/model.py), re-exported here for model code."""
from megagopher.config.model import GPTConfig

from .gpt import GPTModel

__all__ = ["GPTConfig", "GPTModel"]
