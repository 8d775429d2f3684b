"""megagopher: Megatron-style 3D-parallel LLM pretraining on torch.distributed, with Triton kernels."""
__version__ = "0.1.0"
