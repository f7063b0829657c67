"""Site modules: what the quantize-insertion pass puts in the graph.

``FracOp`` replaces one conv/linear/matmul. For a module site (an ``nn.Conv*d``/``nn.Linear``) it
takes the module's place at the same path and owns the *same* ``Parameter`` objects, so state_dict
keys and optimizers built on the original parameters keep working. For a functional or aten site it
lives under ``frac_sites`` and receives the operands from the graph.

Every call also receives the site's :class:`Precision` from a precision-control node, so precision is
data in the graph: changing it needs no re-compile.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .backend import KernelBackend, get_backend
from .functions import SiteGemm, STEQuantize
from .quantizers import quantize_activation, quantize_weight, tensor_range
from .spec import Precision, SiteSpec


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
        batch = torch.stack([lo, hi]).float()
        if bool(self.initialized):
            self.range.lerp_(batch, self.momentum)
        else:  # the first batch sets the range (SBM starts from zeros, which quantizes badly)
            self.range.copy_(batch)
            self.initialized.fill_(True)
        return lo, hi

    def current(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if not bool(self.initialized):
            return None, None
        return self.range[0], self.range[1]


class FracOp(nn.Module):
    """One quantized-training site. ``forward(x, prec)`` for a module site (weights owned),
    ``forward(x, w, b, prec)`` for a functional conv/linear, ``forward(x, y, prec)`` for a matmul."""

    def __init__(self, site: str, spec: SiteSpec, *, scheme: str, momentum: float,
                 backend: str | KernelBackend = "reference", weight: nn.Parameter | None = None,
                 bias: nn.Parameter | None = None):
        super().__init__()
        self.site = site
        self.spec = spec
        self.scheme = scheme
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.owns_weight = weight is not None
        if self.owns_weight:
            self.weight = weight
            self.bias = bias
        self.act_range = RunningRange(momentum)
        if spec.kind == "matmul":  # the second operand is an activation too
            self.rhs_range = RunningRange(momentum)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, op={self.spec.describe()}, scheme={self.scheme}, " \
               f"backend={self.backend.name}"

    def forward(self, x: torch.Tensor, *operands):
        *operands, prec = operands
        if self.owns_weight:
            w, b = self.weight, self.bias
        elif self.spec.kind == "matmul":
            (w,), b = operands, None
        else:
            w, b = operands[0], (operands[1] if len(operands) > 1 else None)
        return self.run(x, w, b, Precision(*prec))

    def _quantize_input(self, x: torch.Tensor, bits: int, rng: RunningRange) -> torch.Tensor:
        if not bits:
            return x
        if self.training:
            lo, hi = rng.observe(x)
        else:
            lo, hi = rng.current()
        return STEQuantize.apply(x, functools.partial(quantize_activation, bits=bits,
                                                      scheme=self.scheme, lo=lo, hi=hi))

    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
            prec: Precision) -> torch.Tensor:
        spec = self.spec
        if prec.is_full:
            return spec.fp_forward(x, w, b)
        qx = self._quantize_input(x, prec.a, self.act_range)
        if spec.kind == "matmul":
            qw = self._quantize_input(w, prec.w, self.rhs_range)
        elif prec.w:
            qw = STEQuantize.apply(w, functools.partial(quantize_weight, bits=prec.w,
                                                        scheme=self.scheme))
        else:
            qw = w
        if spec.kind == "conv":
            if spec.pre_pad:
                mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
                qx = F.pad(qx, spec.pre_pad, mode=mode)
            extra = spec.same_extra_pad(tuple(w.shape))
            if extra:
                qx = F.pad(qx, extra)
        return SiteGemm.apply(qx, qw, b, spec, prec.g, self.scheme, self.backend)


class PrecisionReader(nn.Module):
    """The precision-control node: ``frac_precision(site) -> Precision`` read from the controller at
    run time. Holds the controller by reference (it is not part of the state_dict)."""

    def __init__(self, controller):
        super().__init__()
        self.controller = controller

    def forward(self, site: str) -> Precision:
        return self.controller[site]
