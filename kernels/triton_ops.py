"""The "triton" backend: the same functions, names and signatures as ``reference.py``, each backed by the
Triton kernels and autograd Function of its own module. Each raises ``dispatch.Unsupported`` (naming the
shape or dtype) for an input it does not handle; ``kernels._run`` then raises under "triton" and falls
back to PyTorch under "auto".

The SwiGLU and cross-entropy modules are named fused_*.py: a submodule called ``swiglu`` or
``cross_entropy`` would, once imported, replace the package attribute of the same name, i.e. the public
``kernels.swiglu`` / ``kernels.cross_entropy`` functions.
"""
from .add_norm import add_layer_norm, add_rms_norm
from .attention import flash_attention, flash_attention_backward, flash_attention_forward
from .fused_cross_entropy import cross_entropy
from .grouped_gemm import grouped_mm
from .norms import layer_norm, rms_norm
from .rope import apply_rope
from .softmax import scaled_masked_softmax
from .fused_swiglu import swiglu

__all__ = ["flash_attention", "flash_attention_forward", "flash_attention_backward",
           "scaled_masked_softmax", "rms_norm", "layer_norm", "apply_rope", "swiglu",
           "cross_entropy", "add_rms_norm", "add_layer_norm", "grouped_mm"]
