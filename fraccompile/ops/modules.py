"""Site modules: what the quantize-insertion pass puts in the graph.

``FracOp`` replaces one conv/linear/matmul. For a module site (an ``nn.Conv*d``/``nn.Linear``) it
takes the module's place at the same path and owns the *same* ``Parameter`` objects, so state_dict
keys and optimizers built on the original parameters keep working. For a functional or aten site it
lives under ``frac_sites`` and receives the operands from the graph.

Every call also receives the site's :class:`Precision` from a precision-control node, so precision is
data in the graph: changing it needs no re-compile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .backend import KernelBackend, finish, get_backend, quantize_operand
from .contract import GateDecision, SiteCall
from .functions import apply_epilogue, epilogue_backward  # noqa: F401  (re-exported)
from .quantizers import DEFAULT_WEIGHT_SCALE, tensor_range
from .spec import Precision, SiteSpec

RangeReducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Turns a batch's activation (min, max) into the range the step quantizes with; None: the batch's
# own. A distributed run (fraccompile.distributed) installs an all-reduce, so that every process
# quantizes with the same grid. Gradient ranges are not reduced.
_range_reducer: RangeReducer | None = None


def set_range_reducer(reducer: RangeReducer | None) -> RangeReducer | None:
    """Install ``reducer`` (None: none) for every site's activation ranges; returns the previous
    one. Called on every process in the same order, since a reducer may be a collective."""
    global _range_reducer
    previous, _range_reducer = _range_reducer, reducer
    return previous


class RunningRange(nn.Module):
    """EMA of a tensor's (min, max), used to quantize activations in eval mode (as SBM does)."""

    def __init__(self, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("range", torch.zeros(2))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = tensor_range(x)
        if _range_reducer is not None:
            lo, hi = _range_reducer(lo, hi)
        batch = torch.stack([lo, hi]).float()
        # On the device, never read on the host (so a CUDA graph can hold it): a NaN/inf batch
        # never enters the running range (the step itself is the caller's call); the first finite
        # batch sets it (SBM starts from zeros, which quantizes badly), later ones move it.
        finite = torch.isfinite(batch).all()
        moved = torch.where(self.initialized, torch.lerp(self.range, batch, self.momentum), batch)
        self.range.copy_(torch.where(finite, moved, self.range))
        self.initialized.logical_or_(finite)
        return lo, hi

    def current(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if not bool(self.initialized):
            return None, None
        return self.range[0], self.range[1]


class FracOp(nn.Module):
    """One quantized-training site. ``forward(x, prec)`` for a module site (weights owned),
    ``forward(x, w, b, prec)`` for a functional conv/linear, ``forward(x, y, prec)`` for a matmul."""

    def __init__(
        self,
        site: str,
        spec: SiteSpec,
        *,
        scheme: str,
        momentum: float,
        backend: str | KernelBackend = "reference",
        weight: nn.Parameter | None = None,
        bias: nn.Parameter | None = None,
        weight_scale: str = DEFAULT_WEIGHT_SCALE,
        rounding_noise: str = "counter",
    ):
        super().__init__()
        self.site = site
        self.spec = spec
        self.scheme = scheme
        self.weight_scale = weight_scale  # "channel", "tensor" or "gemm" (FracConfig.weight_scale)
        self.rounding_noise = rounding_noise  # "torch" or "counter" (FracConfig.rounding_noise)
        # set by the epilogue-fusion pass: a BatchNorm module of the graph (not a submodule of
        # this one) and an (activation, gelu approximation), applied to the output in that order
        self.epilogue_norm: nn.Module | None = None
        self.epilogue_norm_path = ""  # where the norm module lives in the graph module
        self.epilogue: tuple[str, str] | None = None
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.owns_weight = weight is not None
        if self.owns_weight:
            self.weight = weight
            self.bias = bias
        self.act_range = RunningRange(momentum)
        self.last_call: SiteCall | None = None  # the latest call (a gated site reports it)
        self.weight_shape = tuple(weight.shape) if weight is not None else None
        if spec.kind == "matmul":  # the second operand is an activation too
            self.rhs_range = RunningRange(momentum)

    def extra_repr(self) -> str:
        scale = "" if self.weight_scale == DEFAULT_WEIGHT_SCALE else f", weight_scale={self.weight_scale}"
        if self.rounding_noise != "counter":
            scale += f", rounding_noise={self.rounding_noise}"
        if self.epilogue_norm is not None or self.epilogue is not None:
            scale += f", epilogue={self.describe_epilogue()}"
        return (
            f"site={self.site!r}, op={self.spec.describe()}, scheme={self.scheme}{scale}, "
            f"backend={self.backend.name}"
        )

    def forward(self, x: torch.Tensor, *operands):
        *operands, prec = operands
        if self.owns_weight:
            w, b = self.weight, self.bias
        elif self.spec.kind == "matmul":
            (w,), b = operands, None
        else:
            w, b = operands[0], (operands[1] if len(operands) > 1 else None)
        if isinstance(prec, GateDecision):
            if prec.mode == "dense":
                return self.run_dense(x, w, b, prec)
            return self.run(x, w, b, Precision(max(prec.a), prec.w, max(prec.g)), rows=prec)
        return self.run(x, w, b, Precision(*prec))

    def _range(self, x: torch.Tensor, rng: RunningRange):
        """The activation range: the batch's (and update the running one) in training, the running
        one in eval."""
        return rng.observe(x) if self.training else rng.current()

    def site_call(
        self, prec: Precision, x_range=None, y_range=None, rows: GateDecision | None = None
    ) -> SiteCall:
        """This site's :class:`SiteCall` at ``prec`` (what a backend receives)."""
        return SiteCall(
            self.site,
            self.spec,
            prec,
            self.scheme,
            self.weight_scale,
            self.rounding_noise,
            self.weight_shape,
            x_range,
            y_range,
            rows,
            self.epilogue,
            self.epilogue_norm,
        )

    def backend_for(self, call: SiteCall) -> tuple[KernelBackend, str | None]:
        """``(backend that runs call, why not the configured one)``."""
        reason = self.backend.unsupported_reason(call)
        return (get_backend("reference"), reason) if reason else (self.backend, None)

    def kernel_status(self, prec: Precision) -> tuple[str, str | None]:
        """``(backend that runs this site at prec, why not the configured one)``; for a gated
        site, what its latest call ran on."""
        if self.last_call is not None and self.last_call.rows is not None:
            call = self.last_call
        else:
            call = self.site_call(prec)
        backend, reason = self.backend_for(call)
        return backend.name, reason

    def _remember(self, call: SiteCall) -> None:
        """Keep what :meth:`kernel_status` reports from: the call without its tensors (a gate's
        decision holds its autograd graph, which copies and pickles of the model must not)."""
        rows = call.rows
        if rows is not None:
            rows = dataclasses.replace(rows, onehot=None, choice=None)
        self.last_call = dataclasses.replace(call, x_range=None, y_range=None, rows=rows, epilogue_norm=None)

    def run(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        prec: Precision,
        rows: GateDecision | None = None,
    ) -> torch.Tensor:
        """The site's output (its epilogue applied) at ``prec`` (with per-sample ``rows``)."""
        if prec.is_full and rows is None:
            return self.finish(self.spec.fp_forward(x, w, b))
        self.weight_shape = tuple(w.shape)
        x_range = self._range(x, self.act_range) if prec.a else None
        y_range = None
        if self.spec.kind == "matmul" and prec.w:
            y_range = self._range(w, self.rhs_range)
        call = self.site_call(
            prec,
            x_range if x_range and x_range[0] is not None else None,
            y_range if y_range and y_range[0] is not None else None,
            rows,
        )
        self._remember(call)
        backend, _ = self.backend_for(call)
        return backend.run_site(call, x, w, b)

    def run_dense(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, d: GateDecision
    ) -> torch.Tensor:
        """FracTrain's own execution of a gate: every candidate on the whole batch, mixed by the
        one-hot (reference semantics: it exists to reproduce that code, not to be fast)."""
        ref = get_backend("reference")
        lo_hi = self._range(x, self.act_range)
        call = self.site_call(
            Precision(max(d.a), d.w, max(d.g)), lo_hi if lo_hi[0] is not None else None, rows=d
        )
        self._remember(call)
        qw = quantize_operand(call, w, d.w, "w")
        ys = [ref.gemm(call, quantize_operand(call, x, a, "x"), qw, b, g, w) for a, g in zip(d.a, d.g)]
        mix = d.onehot.reshape(d.onehot.shape + (1,) * (ys[0].dim() - 1))
        return self.finish((mix * torch.stack(ys, 1)).sum(1))

    def describe_epilogue(self) -> str:
        """E.g. ``"BatchNorm2d+relu"``, ``"gelu(tanh)"``; ``""`` without an epilogue."""
        steps = [type(self.epilogue_norm).__name__] if self.epilogue_norm is not None else []
        if self.epilogue is not None:
            name, approximate = self.epilogue
            steps.append(name if approximate in ("", "none") else f"{name}({approximate})")
        return "+".join(steps)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` through the epilogue (norm, then activation) as autograd ops: the unfused graph."""
        return finish(self.site_call(Precision()), y)


class PrecisionReader(nn.Module):
    """The precision-control node: ``frac_precision(site) -> Precision`` read from the controller at
    run time. Holds the controller by reference (it is not part of the state_dict)."""

    def __init__(self, controller):
        super().__init__()
        self.controller = controller

    def forward(self, site: str, gate=None):
        prec = self.controller[site]
        if gate is None:
            return prec
        return gate.bank.decision(gate, prec.w)
