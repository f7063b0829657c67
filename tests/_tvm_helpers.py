"""Shared helpers of the test_tvm_*.py files: tolerances, site builders and
comparisons against the reference backend."""

from __future__ import annotations

import copy

import torch

from fraccompile.ops.backend import get_backend
from fraccompile.ops.modules import FracOp

TOL = 1e-5


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref - got).norm() / ref.norm().clamp_min(1e-30)).item()


def _site_roles(op: FracOp, args, backend_name: str, seed: int = 3):
    """Output, and gradients of every float input and parameter, of ``op`` (a copy) on ``args``."""
    o = copy.deepcopy(op)
    o.backend = get_backend(backend_name)
    leaves = [
        a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args[:-1]
    ]
    y = o(*leaves, args[-1])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(seed)  # the gradient's stochastic rounding: the same draws on both backends
    y.backward(dy)
    grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads += [p.grad for p in o.parameters() if p.grad is not None]
    return [y.detach()] + grads, o.backend_for(o.last_call)[0].name


def site_calls(fm, x, keep=lambda op: True) -> list:
    """``(site module, its call's arguments)`` for each site call of one forward of ``fm`` on
    ``x`` (the sites ``keep`` accepts); the hooks are removed before returning, so running the
    sites again adds nothing."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: calls.append((mod, args)))
        for m in fm.modules()
        if isinstance(m, FracOp) and keep(m)
    ]
    try:
        fm(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _compare(op, args, on_tvm: bool = False):
    """Every role of ``op`` on both backends, within the tolerance; ``on_tvm``: and the tvm run
    did run on integer kernels (no fallback)."""
    (ref, _), (got, ran) = _site_roles(op, args, "reference"), _site_roles(op, args, "tvm")
    assert ran == "tvm" or not on_tvm
    assert len(ref) == len(got)
    errs = [rel(r, g) for r, g in zip(ref, got)]
    assert max(errs) < TOL, (op.site, op.spec.describe(), errs)
    return errs


def routed_matmul_errors(op: FracOp, x: torch.Tensor, y: torch.Tensor, choice) -> list[float]:
    """Relative errors, ``tvm`` against the reference backend, of a routed matmul site ``op`` under
    the gate decisions ``choice`` (see :func:`_gated`): its output, both operands' gradients and
    the gate's gradient (each backend on a copy, with the same gradient and rounding draws)."""
    from fraccompile.ops.spec import Precision

    results = {}
    for name in ("reference", "tvm"):
        o = copy.deepcopy(op)
        o.backend = get_backend(name)
        d, probs = _gated(o, choice)
        xl, yl = x.clone().requires_grad_(), y.detach().clone().requires_grad_()
        out = o(xl, yl, d)
        assert o.kernel_status(Precision(8, 8, 8))[0] == name
        torch.manual_seed(7)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
        results[name] = [out.detach(), xl.grad, yl.grad, probs.grad]
    return [rel(r, g) for r, g in zip(results["reference"], results["tvm"])]


def dequant_passes(monkeypatch) -> list:
    """``(variant, role)`` of every dequantize kernel the tvm backends fetch from now on."""
    from fraccompile.targets.backend import tvm_backend as tb

    passes = []
    kernel = tb.TVMBackend.kernel

    def noting(self, ref):
        if ref.kind == "dequant":
            passes.append((ref.args, self.where[1]))
        return kernel(self, ref)

    monkeypatch.setattr(tb.TVMBackend, "kernel", noting)
    return passes


C2 = torch.nn.Conv2d


class _MatMul(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, y):
        return self.fn(x, y)


def _gated(op: FracOp, choice, a=(3, 4, 4, 6, 6), g=(6, 6, 8, 8, 12), w=8):
    from fraccompile.ops.contract import GateDecision

    probs = torch.full((len(choice), len(a)), 0.2, requires_grad=True)
    onehot = torch.zeros_like(probs).scatter(1, torch.tensor(choice)[:, None], 1.0)
    onehot = onehot + probs - probs.detach()  # the straight-through one-hot of the gates
    return GateDecision(onehot, torch.tensor(choice), a, g, w, "routed"), probs


def _tiny():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )
