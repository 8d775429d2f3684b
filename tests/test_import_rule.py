"""docs/ARCHITECTURE.md's import rule, checked on the code: a module imports only from its own layer or a
lower one (lazy imports inside functions included), and inside layer 4 only optimizer/ imports distributed/.
An AST walk over every module of megagopher, kernels and tools; nothing is imported."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {  # module prefix: layer, from the bottom
    "megagopher.common": 0, "megagopher.errors": 0, "megagopher.config": 0, "megagopher.data": 0,
    "megagopher.kernels": 0,
    "megagopher.parallel_state": 1, "megagopher.testing": 1, "megagopher.worker_pool": 1,
    "megagopher.tensor_parallel": 2, "megagopher.context_parallel": 2,
    "megagopher.model": 3,
    "megagopher.pipeline_parallel": 4, "megagopher.distributed": 4, "megagopher.optimizer": 4,
    "megagopher.memory": 5, "megagopher.training": 5,
    "megagopher.train": 6, "megagopher.generate": 6, "megagopher.evaluate": 6, "megagopher.export": 6,
    "megagopher.evaluation": 6, "megagopher.sandbox": 6, "megagopher.generation": 6, "megagopher.lm_eval": 6,
    "tools": 6,
}


def _layer(module):
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return (best, LAYERS[best]) if best else (None, None)


def _modules():
    for top, package in (("megagopher", "megagopher"), ("kernels", "megagopher.kernels"), ("tools", "tools")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, top))[:-3].replace(os.sep, ".")
                    name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    yield name, os.path.join(dirpath, f), f == "__init__.py"


def _imports(name, path, is_package):
    tree = ast.parse(open(path).read())
    base = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                parts = base.split(".")
                target = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)  # `from megagopher import kernels`


def test_no_module_imports_upward():
    bad = []
    for name, path, is_package in _modules():
        own_prefix, own = _layer(name)
        if own is None:
            continue  # the package's own __init__
        for target in _imports(name, path, is_package):
            prefix, layer = _layer(target)
            if layer is None or prefix == own_prefix:
                continue
            if layer > own:
                bad.append(f"{name} (layer {own}) imports {target} (layer {layer})")
            if own == layer == 4 and prefix == "megagopher.distributed" and own_prefix != "megagopher.optimizer":
                bad.append(f"{name} imports {target}: in layer 4 only optimizer/ imports distributed/")
    assert not bad, "\n".join(sorted(set(bad)))
