"""Test session setup.

TRITON_INTERPRET must be set before triton is first imported, so the kernel tests can run the Triton code
itself on CPU tensors. It changes nothing else: under "auto" CPU tensors still take the PyTorch path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
