"""The dependency rules of the package, and the backend plug-in path (docs/backends.md)."""

from __future__ import annotations

import ast
import pathlib

import torch

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops import backend as ob

PKG = pathlib.Path(fraccompile.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the fraccompile modules ``path`` imports (relative ones resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
