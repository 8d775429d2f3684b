"""One home per concern (issue 24, build item 6): the dtype table, the device resolution and the kernel-backend
decision each live in one place that every user asks, and the modules import without a cycle.

The dtype table is checked against outside oracles: the safetensors library's own header names and torch's
dtype names and element sizes. The device and backend decisions are checked for their answers on every input
kind their users pass (a tensor, a device name, a torch.device), and the code is scanned so that a second copy
of a table or of the "auto" device rule cannot come back unnoticed.
"""
import ast
import json
import os
import struct
import sys

import pytest
import safetensors.torch
import torch

from megagopher import common, kernels
from megagopher import parallel_state as ps
from megagopher.kernels import dispatch, triton_ops
from megagopher.memory import memory_report

sys.path.insert(0, os.path.dirname(__file__))
import test_import_rule as import_rule  # noqa: E402 (the module walk of the import rule)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOATS = {"float32", "float16", "bfloat16", "float64"}


def _safetensors_name(dtype):
    """The dtype name the safetensors library itself writes in a file's header."""
    blob = safetensors.torch.save({"t": torch.zeros(2, dtype=dtype)})
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n])["t"]["dtype"]


def test_dtype_table_agrees_with_safetensors_and_torch():
    for row in common.DTYPES:
        assert _safetensors_name(row.dtype) == row.safetensors, row
        assert str(row.dtype) == f"torch.{row.name}" and torch.empty(3, dtype=row.dtype).element_size() == row.bytes
        assert common.dtype_name(row.dtype) == row.name and common.DTYPES_BY_NAME[row.name] is row.dtype
        assert common.DTYPES_BY_SAFETENSORS[row.safetensors] is row.dtype
    # the precisions, their order (the choices of training.precision) and sizes, as before the table
    assert common.PRECISION_DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert common.PRECISIONS == ("fp32", "bf16", "fp16") and dispatch.KERNEL_DTYPES == common.TRAINING_DTYPES
    assert [common.element_bytes(p) for p in common.PRECISIONS] == [4, 2, 2]
    with pytest.raises(ValueError, match="complex64 is not in megagopher's dtype table; valid: float32"):
        common.dtype_name(torch.complex64)


def _python_files():
    for top in ("megagopher", "kernels", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.join(dirpath, f) for f in files if f.endswith(".py"))


def _torch_float(node):
    return isinstance(node, ast.Attribute) and node.attr in FLOATS and getattr(node.value, "id", None) == "torch"


def _is_available_call(node):
    return any(isinstance(n, ast.Attribute) and n.attr == "is_available" for n in ast.walk(node))


def _device_name(if_exp):
    return any(isinstance(n, ast.Constant) and n.value in ("cuda", "cpu") for n in (if_exp.body, if_exp.orelse))


def test_no_second_dtype_table_or_device_rule():
    """Outside common.py: no dict that maps names to two or more float dtypes (or back), no
    str(dtype).replace("torch.", ...), and no `"cuda" if torch.cuda.is_available() else ...`."""
    found = []
    for path in _python_files():
        if path == os.path.join(ROOT, "megagopher", "common.py"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            where = f"{os.path.relpath(path, ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Dict) and sum(map(_torch_float, node.keys + node.values)) >= 2:
                found.append(f"{where}: a dtype table")
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "replace" and node.args
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == "torch."):
                found.append(f"{where}: a dtype name made from str(dtype)")
            if isinstance(node, ast.IfExp) and _is_available_call(node.test) and _device_name(node):
                found.append(f"{where}: a device chosen by torch.cuda.is_available()")
    assert not found, "\n".join(found)


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("a CUDA call for device 'cpu'"))
    assert common.pick_device("cpu") == torch.device("cpu") and ps.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.pick_device("auto") == torch.device("cpu") and common.device_type("auto") == "cpu"
    with pytest.raises(ValueError, match="training.device = 'cuda' but no CUDA device is available; valid here"):
        common.pick_device("cuda", "training.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert common.pick_device("auto") == common.pick_device("cuda") == torch.device("cuda", 3)
    # the collectives' device is asked of the same function: NCCL's rank device, gloo's CPU
    monkeypatch.setattr(ps.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ps.dist, "get_backend", lambda *a: "nccl")
    assert ps.get_device() == torch.device("cuda", 3)
    monkeypatch.setattr(ps.dist, "get_backend", lambda *a: "gloo")
    assert ps.get_device() == torch.device("cpu")


class _CudaLike:
    is_cuda = True


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "apex"])
def test_backend_decision_is_the_same_for_a_tensor_and_a_device(backend, monkeypatch):
    monkeypatch.setattr(dispatch, "apex_available", lambda: True)
    for op in ("layer_norm", "cross_entropy"):
        cpu = dispatch.resolve(torch.zeros(1), backend, op)
        assert dispatch.resolve("cpu", backend, op) == dispatch.resolve(torch.device("cpu"), backend, op) == cpu
        cuda = dispatch.resolve(_CudaLike(), backend, op)
        assert dispatch.resolve("cuda", backend, op) == dispatch.resolve(torch.device("cuda", 1), backend, op) == cuda
        expected = {"auto": "triton", "torch": "torch", "triton": "triton",
                    "apex": "apex" if op == "layer_norm" else "triton"}[backend]
        assert cuda[0] == expected and cpu[0] == ("triton" if backend == "triton" else "torch")


def test_cross_entropy_and_grouped_mm_ask_the_one_decision(monkeypatch):
    from megagopher.tensor_parallel import vocab_parallel_cross_entropy
    asked = []
    real = dispatch.runs_triton
    monkeypatch.setattr(dispatch, "runs_triton", lambda t, op, backend=None: asked.append(op) or real(t, op, backend))
    logits, labels = torch.randn(4, 2, 16, requires_grad=True), torch.randint(0, 16, (4, 2))
    vocab_parallel_cross_entropy(logits * 1, labels).sum().backward()
    assert asked == ["cross_entropy"]
    with kernels.use_backend("triton"):  # float64: the kernels do not take it, so PyTorch, not an error
        assert not dispatch.runs_triton(logits.double(), "cross_entropy")
        assert dispatch.runs_triton(logits, "cross_entropy")
    assert not dispatch.runs_triton(logits, "cross_entropy")  # "auto" on a CPU tensor

    calls = []
    monkeypatch.setattr(triton_ops, "grouped_mm", lambda *args: calls.append(args) or torch.zeros(5, 3))
    x, w, counts = torch.randn(5, 4), torch.randn(2, 3, 4), torch.tensor([2, 3])
    kernels.grouped_mm(x, w, counts, backend="triton")
    assert len(calls) == 1  # through kernels' dispatch: the Triton path under "triton"
    torch.testing.assert_close(kernels.grouped_mm(x, w, counts), torch.cat([x[:2] @ w[0].t(), x[2:] @ w[1].t()]))
    assert len(calls) == 1  # and PyTorch under "auto" on CPU


def test_memory_report_asks_which_kernels_run():
    model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)
    reports = {(device, backend): memory_report(model, {}, {"kernel_backend": backend}, {}, device=device)
               for device in ("cpu", "cuda") for backend in ("auto", "torch", "triton")}
    assert {key: r["kernels"] for key, r in reports.items()} == {
        ("cpu", "auto"): "torch", ("cpu", "torch"): "torch", ("cpu", "triton"): "triton",
        ("cuda", "auto"): "triton", ("cuda", "torch"): "torch", ("cuda", "triton"): "triton"}
    assert "these run torch" in reports["cpu", "auto"]["line"] and "these run" not in reports["cuda", "auto"]["line"]
    for device in ("cpu", "cuda"):  # the count itself is the Triton path's, whatever runs
        assert len({reports[device, b]["total"] for b in ("auto", "torch", "triton")}) == 1


def _module_graph():
    """module -> modules it imports (lazy imports included): `from pkg import sub` is an edge to pkg.sub
    alone when sub is a module, so a submodule importing a sibling through its package is no cycle."""
    modules = {name: (path, is_package) for name, path, is_package in import_rule._modules()}
    graph = {}
    for name, (path, is_package) in modules.items():
        base = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = base.split(".")
                target = (".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                          if node.level else node.module)
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                edges.update(subs if len(subs) == len(node.names) else subs + [target])
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        stack.pop()
        return None

    return next((c for v in sorted(graph) if v not in state and (c := visit(v))), None)


def test_no_import_cycle():
    """model/gpt.py builds MoE layers and model/moe.py builds the dense MLP: both import model/mlp.py."""
    graph = _module_graph()
    assert "megagopher.model.gpt" not in graph["megagopher.model.moe"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
