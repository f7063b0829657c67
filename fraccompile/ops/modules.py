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
from ..control.gates import GateDecision
from .functions import GateProbe, SiteGemm, STEQuantize
from .quantizers import (qparams_from_range, quantize_activation, quantize_rows, quantize_weight,
                         tensor_range)
from .spec import Precision, SiteSpec


def apply_epilogue(epilogue: tuple[str, str] | None, y: torch.Tensor) -> torch.Tensor:
    """``y`` through a site's epilogue activation (``FracOp.epilogue``), as an autograd op."""
    if epilogue is None:
        return y
    name, approximate = epilogue
    if name == "gelu":
        return F.gelu(y, approximate=approximate)
    return F.relu(y) if name == "relu" else F.silu(y)


def epilogue_backward(epilogue: tuple[str, str], dz: torch.Tensor, y: torch.Tensor):
    """The gradient w.r.t. ``y`` of :func:`apply_epilogue` at ``y``: the aten op autograd calls
    for it (so the result is the unfused graph's, bit for bit)."""
    name, approximate = epilogue
    if name == "gelu":
        return torch.ops.aten.gelu_backward(dz, y, approximate=approximate)
    if name == "relu":  # autograd passes relu's output; (output > 0) == (input > 0)
        return torch.ops.aten.threshold_backward(dz, y, 0)
    return torch.ops.aten.silu_backward(dz, y)


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
                 bias: nn.Parameter | None = None, weight_scale: str = "channel",
                 rounding_noise: str = "counter"):
        super().__init__()
        self.site = site
        self.spec = spec
        self.scheme = scheme
        self.weight_scale = weight_scale  # "channel" or "tensor" (FracConfig.weight_scale)
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
        self.last_fallback: str | None = None  # why the last gated call left the backend
        self.weight_shape = tuple(weight.shape) if weight is not None else None
        if spec.kind == "matmul":  # the second operand is an activation too
            self.rhs_range = RunningRange(momentum)

    def extra_repr(self) -> str:
        scale = "" if self.weight_scale == "channel" else f", weight_scale={self.weight_scale}"
        if self.rounding_noise != "counter":
            scale += f", rounding_noise={self.rounding_noise}"
        if self.epilogue_norm is not None or self.epilogue is not None:
            scale += f", epilogue={self.describe_epilogue()}"
        return f"site={self.site!r}, op={self.spec.describe()}, scheme={self.scheme}{scale}, " \
               f"backend={self.backend.name}"

    def forward(self, x: torch.Tensor, *operands):
        *operands, prec = operands
        if self.owns_weight:
            w, b = self.weight, self.bias
        elif self.spec.kind == "matmul":
            (w,), b = operands, None
        else:
            w, b = operands[0], (operands[1] if len(operands) > 1 else None)
        if isinstance(prec, GateDecision):
            return self.finish(self.run_gated(x, w, b, prec))
        return self.run(x, w, b, Precision(*prec))

    def _range(self, x: torch.Tensor, rng: RunningRange):
        """The activation range: the batch's (and update the running one) in training, the running
        one in eval."""
        return rng.observe(x) if self.training else rng.current()

    def _quantize_input(self, x: torch.Tensor, bits: int, rng: RunningRange,
                        lo_hi=None) -> torch.Tensor:
        if not bits:
            return x
        lo, hi = lo_hi if lo_hi is not None else self._range(x, rng)
        return STEQuantize.apply(x, functools.partial(quantize_activation, bits=bits,
                                                      scheme=self.scheme, lo=lo, hi=hi))

    def _quantize_weight(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        if self.spec.kind == "matmul":
            return self._quantize_input(w, bits, self.rhs_range)
        if not bits:
            return w
        return STEQuantize.apply(w, functools.partial(
            quantize_weight, bits=bits, scheme=self.scheme,
            per_channel=self.weight_scale == "channel"))

    def kernel_status(self, prec: Precision) -> tuple[str, str | None]:
        """``(backend that runs this site at prec, why not the configured one)``."""
        reason = self.backend.unsupported_reason(self.spec, prec, self.scheme, self.weight_shape)
        if reason is None and self.last_fallback and self.backend.name != "reference":
            reason = self.last_fallback
        return ("reference" if reason else self.backend.name), reason

    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
            prec: Precision, lo_hi=None) -> torch.Tensor:
        """The site's output (its epilogue applied) at ``prec``."""
        if prec.is_full:
            return self.finish(self.spec.fp_forward(x, w, b))
        run_site = getattr(self.backend, "run_site", None)  # integer kernels (the tvm backend)
        if run_site is not None:
            self.weight_shape = tuple(w.shape)
        if run_site is not None and self.backend.unsupported_reason(
                self.spec, prec, self.scheme, self.weight_shape) is None:
            if lo_hi is None:
                lo_hi = self._range(x, self.act_range)
            return run_site(self, x, w, b, prec, lo_hi)
        qx = self._quantize_input(x, prec.a, self.act_range, lo_hi)
        return self.finish(self._gemm(qx, self._quantize_weight(w, prec.w), w, b, prec.g))

    def describe_epilogue(self) -> str:
        """E.g. ``"BatchNorm2d+relu"``, ``"gelu(tanh)"``; ``""`` without an epilogue."""
        steps = [type(self.epilogue_norm).__name__] if self.epilogue_norm is not None else []
        if self.epilogue is not None:
            name, approximate = self.epilogue
            steps.append(name if approximate in ("", "none") else f"{name}({approximate})")
        return "+".join(steps)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` through the epilogue (norm, then activation) as autograd ops: the unfused graph."""
        if self.epilogue_norm is not None:
            y = self.epilogue_norm(y)
        return apply_epilogue(self.epilogue, y)

    def run_gated(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  d: GateDecision) -> torch.Tensor:
        """Per-sample precisions from a DFQ gate, in the gate's execution mode (float kernels: a
        batch mixing precisions has no single integer grid)."""
        if self.backend.name != "reference":
            self.last_fallback = "per-sample precisions of a DFQ gate run on the reference backend"
        lo_hi = self._range(x, self.act_range)
        qw = self._quantize_weight(w, d.w)
        if d.mode == "dense":  # every candidate on the whole batch, mixed by the one-hot
            ys = [self._gemm(self._quantize_input(x, a, self.act_range, lo_hi), qw, w, b, g)
                  for a, g in zip(d.a, d.g)]
            mix = d.onehot.reshape(d.onehot.shape + (1,) * (ys[0].dim() - 1))
            return (mix * torch.stack(ys, 1)).sum(1)
        lo, hi = lo_hi if lo_hi[0] is not None else tensor_range(x)
        bits = torch.tensor(d.a, device=x.device)[d.choice]

        def quantize_at(t: torch.Tensor, b: int) -> torch.Tensor:
            return quantize_activation(t, b, self.scheme, lo=lo, hi=hi)

        qx = STEQuantize.apply(x, lambda t: quantize_rows(
            t, bits, lambda k: qparams_from_range(lo, hi, k, self.scheme)))
        qx = GateProbe.apply(qx, d.onehot, x.detach(), quantize_at, d.a)
        g_bits = torch.tensor(d.g, device=x.device)[d.choice]
        return self._gemm(qx, qw, w, b, g_bits)

    def _gemm(self, qx, qw, w, b, g_bits) -> torch.Tensor:
        spec = self.spec
        if spec.kind == "conv":
            if spec.pre_pad:
                mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
                qx = F.pad(qx, spec.pre_pad, mode=mode)
            extra = spec.same_extra_pad(tuple(w.shape))
            if extra:
                qx = F.pad(qx, extra)
        return SiteGemm.apply(qx, qw, b, spec, g_bits, self.scheme, self.backend,
                              self.rounding_noise)


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
