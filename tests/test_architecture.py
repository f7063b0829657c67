"""The dependency rules of the package, and the backend plug-in path (docs/backends.md)."""

from __future__ import annotations

import ast
import pathlib

import torch

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops import backend as ob

PKG = pathlib.Path(fraccompile.__file__).parent


def _import_nodes(tree: ast.AST, type_checking: bool):
    """The import statements of ``tree``; ``type_checking=False`` leaves out those under ``if
    TYPE_CHECKING:`` (annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not type_checking and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for s in node.orelse for n in _import_nodes(ast.Module([s], []), False))
        else:
            yield from _import_nodes(node, type_checking)


def _imports(path: pathlib.Path, type_checking: bool = True) -> set[str]:
    """Absolute names of the fraccompile modules ``path`` imports (relative ones resolved), at
    module level or inside functions."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in _import_nodes(ast.parse(path.read_text()), type_checking):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {n for n in out if n.startswith("fraccompile")}


def test_ops_never_imports_a_backend_or_the_controller():
    """``ops`` is the interface package: backends register with it and ``control`` builds on it,
    never the other way round (no import cycle)."""
    for path in sorted((PKG / "ops").glob("*.py")):
        bad = {n for n in _imports(path) if n.startswith(("fraccompile.targets", "fraccompile.control"))}
        assert not bad, (path.name, bad)


def test_only_targets_imports_tvm():
    for path in sorted(PKG.rglob("*.py")):
        if "targets" in path.relative_to(PKG).parts:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module or "")
        assert not {n for n in names if n == "tvm" or n.startswith("tvm.")}, path


TARGETS = PKG / "targets"
LAYERS = ("kernels", "runtime", "backend", "tools")  # each imports only itself and those before it


def _layer(name: str) -> str | None:
    """The layer of ``fraccompile.targets`` a module name is in, ``"root"`` for the package itself
    (and names its ``__init__`` defines), None outside ``fraccompile.targets``."""
    parts = name.split(".")
    if parts[:2] != ["fraccompile", "targets"]:
        return None
    return parts[2] if len(parts) > 2 and parts[2] in LAYERS else "root"


def test_targets_layers_import_only_the_layers_before_them():
    """kernels ← runtime ← backend ← tools (docs/architecture.md): a module imports from its own
    layer and the layers before it; the kernel definitions import of the runtime only
    ``runtime.host`` (the target they are built for), which imports nothing of the package; no
    layer imports the package root, the entry point that registers the backend."""
    assert [p.name for p in TARGETS.glob("*.py")] == ["__init__.py"]  # every module is in a layer
    assert {p.name for p in TARGETS.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)
    for index, layer in enumerate(LAYERS):
        for path in sorted((TARGETS / layer).glob("*.py")):
            for name in _imports(path):
                used = _layer(name)
                if used is None:
                    continue
                if layer == "kernels" and used == "runtime":
                    ok = name.startswith("fraccompile.targets.runtime.host")
                else:
                    ok = used in LAYERS[: index + 1]
                assert ok, f"{layer}/{path.name} imports {name}"
    assert not {_layer(n) for n in _imports(TARGETS / "runtime" / "host.py")} - {None}


def test_kernel_source_hash_covers_every_cpu_kernel_definition():
    """The hash in every cache key and manifest reads each kernel definition (the GPU kernels,
    ``kernels/cuda*.py``, have their own)."""
    tree = ast.parse((TARGETS / "runtime" / "library.py").read_text())
    (files,) = [
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and [ast.unparse(x) for x in n.targets] == ["KERNEL_FILES"]
    ]
    defined = {f"kernels/{p.name}" for p in (TARGETS / "kernels").glob("*.py")}
    gpu = {f"kernels/{p.name}" for p in (TARGETS / "kernels").glob("cuda*.py")}
    assert {"kernels/cuda.py", "kernels/cuda_mma.py", "kernels/cuda_quantize.py"} <= gpu
    assert set(files) == defined - {"kernels/__init__.py"} - gpu | {"runtime/host.py"}
    assert all((TARGETS / f).is_file() for f in files)


def test_import_graph_has_no_cycles():
    """Between the modules of fraccompile, counting imports inside functions (not those made for
    type annotations only, nor a module's own parent packages, which Python imports first)."""
    modules = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = path

    def parents(mod):
        return {mod.rsplit(".", k)[0] for k in range(1, mod.count(".") + 1)}

    graph = {
        mod: (
            {n if n in modules else n.rsplit(".", 1)[0] for n in _imports(path, type_checking=False)}
            & set(modules)
        )
        - parents(mod)
        - {mod}
        for mod, path in modules.items()
    }
    done, stack = set(), []

    def visit(mod):
        assert mod not in stack, " -> ".join(stack[stack.index(mod) :] + [mod])
        if mod in done:
            return
        stack.append(mod)
        for dep in sorted(graph[mod]):
            visit(dep)
        stack.pop()
        done.add(mod)

    assert "fraccompile.targets.backend.roles" in graph and "fraccompile.cli" in graph
    for mod in sorted(graph):
        visit(mod)


class _Counting(ob.ReferenceBackend):
    name = "counting"

    def __init__(self):
        self.calls = []

    def run_site(self, call, x, w, b):
        self.calls.append((call.site, tuple(call.prec)))
        return super().run_site(call, x, w, b)


def test_a_registered_backend_is_a_config_choice_and_receives_site_calls(monkeypatch):
    backend = _Counting()
    monkeypatch.setattr(ob, "_FACTORIES", dict(ob._FACTORIES))
    ob.register_backend("counting", lambda options: backend)
    monkeypatch.delitem(ob._BACKENDS, "counting", raising=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )
    x = torch.randn(4, 8)
    fm = fraccompile.compile(model, x, FracConfig(backend="counting", a=6, w=6, g=8))
    fm(x).sum().backward()
    assert backend.calls == [("0", (6, 6, 8)), ("2", (6, 6, 8))]  # the last linear stays fp32
    assert {s.backend for s in fm.sites if not s.full_precision} == {"counting"}
    try:
        FracConfig(backend="nonexistent")
    except fraccompile.ConfigError as err:
        assert "counting" in str(err)  # the error lists the registered backends
    else:
        raise AssertionError("an unknown backend was accepted")


def test_every_subpackage_is_installed():
    """pyproject's explicit package list names every package under fraccompile/ (a new
    subpackage left out would be missing from a wheel and an editable install alike)."""
    import tomllib

    import pytest

    pyproject = PKG.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("fraccompile is installed from a wheel, not a source tree")
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
