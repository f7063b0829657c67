"""Autograd Functions of quantized training.

* :class:`STEQuantize` — forward: a quantizer; backward: the gradient passes unchanged
  (straight-through estimator).
* :class:`SiteGemm` — forward: the backend's forward GEMM on already-quantized operands, saving those
  quantized operands (not the full-precision ones) for backward; backward: quantizes ``dy`` once with
  stochastic rounding (precision ``g``) and feeds it to both backward GEMMs and the bias gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import Function

from .backend import KernelBackend
from .quantizers import quantize_gradient
from .spec import SiteSpec


class STEQuantize(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, quantizer: Callable[[torch.Tensor], torch.Tensor]):
        return quantizer(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SiteGemm(Function):
    @staticmethod
    def forward(ctx, qx: torch.Tensor, qw: torch.Tensor, bias: torch.Tensor | None, spec: SiteSpec,
                g_bits: int, scheme: str, backend: KernelBackend):
        ctx.save_for_backward(qx, qw)
        ctx.spec, ctx.g_bits, ctx.scheme, ctx.backend = spec, g_bits, scheme, backend
        ctx.has_bias = bias is not None
        return backend.forward(spec, qx, qw, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qx, qw = ctx.saved_tensors
        spec, backend = ctx.spec, ctx.backend
        dyq = quantize_gradient(dy, ctx.g_bits, ctx.scheme)
        dx = backend.grad_input(spec, dyq, qx, qw) if ctx.needs_input_grad[0] else None
        dw = backend.grad_weight(spec, qx, dyq, qw) if ctx.needs_input_grad[1] else None
        db = backend.grad_bias(spec, dyq) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None
