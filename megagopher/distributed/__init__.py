"""Data parallelism and the gradient reductions that close a training step."""
from .finalize import finalize_model_grads

__all__ = ["finalize_model_grads"]
