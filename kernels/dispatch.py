"""Backend selection for megagopher's kernels (docs/ARCHITECTURE.md 4.4).

"auto" (the default) runs Triton on CUDA tensors and PyTorch on CPU tensors; "triton" forces the Triton
code (on CPU it needs the interpreter, TRITON_INTERPRET=1 set before triton is imported); "torch" runs the
reference implementations. A per-call ``backend=`` argument overrides the context.

"apex" is optional: NVIDIA apex's fused layer norm, RMS norm and Megatron softmax run when apex is
importable and the tensor is on CUDA; every other case (another op, a CPU tensor, no apex, an input apex's
kernels do not take) behaves as "auto". apex is never a dependency.

``resolve`` is the one decision of which backend runs: the public kernels ask it per call, the
vocabulary-parallel cross entropy asks it (through ``runs_triton``) to choose between its fused and
PyTorch local parts, and ``memory_report`` asks it, with a device instead of a tensor, which kernels the
run it predicts will use.
"""
import contextlib
import importlib.util
import os
import warnings

from megagopher.common import TRAINING_DTYPES

BACKENDS = ("auto", "triton", "torch", "apex")
KERNEL_DTYPES = TRAINING_DTYPES  # the Triton kernels take the training dtypes (megagopher/common.py's table)
APEX_OPS = ("layer_norm", "rms_norm", "scaled_masked_softmax")
_current = ["auto"]


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the kernels called inside it on backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"kernels.use_backend: unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    previous = _current[0]
    _current[0] = name
    try:
        yield
    finally:
        _current[0] = previous


def current_backend():
    return _current[0]


def triton_available():
    return importlib.util.find_spec("triton") is not None


_apex = [None]  # cached answer of apex_available()


def apex_available():
    """NVIDIA's apex (not the unrelated PyPI package of the same name): its fused layer-norm extension."""
    if _apex[0] is None:
        try:
            _apex[0] = (importlib.util.find_spec("apex") is not None
                        and importlib.util.find_spec("apex.normalization") is not None
                        and importlib.util.find_spec("fused_layer_norm_cuda") is not None)
        except (ImportError, ValueError):
            _apex[0] = False
    return _apex[0]


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_warned = set()  # (op, reason) pairs already warned about: a training loop repeats the same input


def warn_fallback(op, shape, reason, fallback):
    """Say once per op and reason that "auto" left Triton for ``fallback`` on a CUDA input of ``shape``:
    a silent fallback is a silent slowdown."""
    if (op, reason) in _warned:
        return
    _warned.add((op, reason))
    warnings.warn(f"kernels.{op}: input of shape {tuple(shape)} runs {fallback}, not the Triton kernel: {reason}",
                  RuntimeWarning, stacklevel=4)


class Unsupported(ValueError):
    """Raised by a Triton wrapper for shapes or dtypes it does not handle: an error under "triton",
    a fallback to PyTorch under "auto"."""


def _on_cuda(where):
    """A tensor's is_cuda, or whether a device ("cuda", "cuda:1", torch.device, "cpu") is a CUDA device."""
    return where.is_cuda if hasattr(where, "is_cuda") else str(where).split(":")[0] == "cuda"


def resolve(where, backend=None, op=None):
    """Returns (backend, strict): which implementation to run for ``where`` (in op ``op``), and whether an
    unsupported input must raise (an explicit "triton") rather than fall back (auto). ``where`` is the
    input tensor, or the device of tensors to come."""
    on_cuda = _on_cuda(where)
    name = backend or _current[0]
    if name not in BACKENDS:
        raise ValueError(f"kernels: unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "apex":
        if op in APEX_OPS and on_cuda and apex_available():
            return "apex", False
        name = "auto"
    if name == "torch":
        return "torch", False
    if name == "triton":
        if not triton_available():
            raise RuntimeError("kernels: backend 'triton' requested but triton is not installed")
        if not on_cuda and not interpreter_on():
            raise RuntimeError(
                "kernels: backend 'triton' on a CPU tensor needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 in the environment before triton is imported (or use 'auto'/'torch')")
        return "triton", True
    return ("triton", False) if on_cuda and triton_available() else ("torch", False)


def runs_triton(tensor, op, backend=None):
    """Whether ``op`` on ``tensor`` runs Triton: ``resolve`` picks it and the dtype is one the kernels take
    (KERNEL_DTYPES). For callers that hold both paths themselves (tensor_parallel/cross_entropy.py): an
    input the kernels cannot take goes to PyTorch without an error, whatever the backend."""
    return tensor.dtype in KERNEL_DTYPES and resolve(tensor, backend, op)[0] == "triton"
