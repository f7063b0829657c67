"""Autograd Functions of quantized training.

* :class:`STEQuantize` — forward: a quantizer; backward: the gradient passes unchanged
  (straight-through estimator).
* :class:`SiteGemm` — forward: the backend's forward GEMM on already-quantized operands, saving those
  quantized operands (not the full-precision ones) for backward; backward: quantizes ``dy`` once with
  stochastic rounding (precision ``g``, noise drawn the ``noise`` way) and feeds it to both backward
  GEMMs and the bias gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .quantizers import quantize_gradient, quantize_gradient_rows
from .spec import SiteSpec

if TYPE_CHECKING:
    from .backend import KernelBackend


def apply_epilogue(epilogue: tuple[str, str] | None, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``y`` through a site's epilogue activation (``FracOp.epilogue``), as an autograd op;
    ``inplace``: into ``y`` itself (a fresh buffer no one else reads: the same values, bit for bit,
    without a new output's first-touch cost)."""
    if epilogue is None:
        return y
    name, approximate = epilogue
    if name == "gelu":
        if inplace:
            return torch.ops.aten.gelu_(y, approximate=approximate)
        return F.gelu(y, approximate=approximate)
    return F.relu(y, inplace=inplace) if name == "relu" else F.silu(y, inplace=inplace)


def epilogue_backward(
    epilogue: tuple[str, str], dz: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None
):
    """The gradient w.r.t. ``y`` of :func:`apply_epilogue` at ``y``: the aten op autograd calls
    for it (so the result is the unfused graph's, bit for bit); ``out``: written there (its
    ``out=`` form; ``y`` itself may be ``out``: an elementwise op)."""
    name, approximate = epilogue
    aten = torch.ops.aten
    if name == "gelu":
        if out is not None:
            return aten.gelu_backward.grad_input(dz, y, approximate=approximate, grad_input=out)
        return aten.gelu_backward(dz, y, approximate=approximate)
    if name == "relu":  # autograd passes relu's output; (output > 0) == (input > 0)
        if out is not None:
            return aten.threshold_backward.grad_input(dz, y, 0, grad_input=out)
        return aten.threshold_backward(dz, y, 0)
    if out is not None:
        return aten.silu_backward.grad_input(dz, y, grad_input=out)
    return aten.silu_backward(dz, y)


class STEQuantize(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, quantizer: Callable[[torch.Tensor], torch.Tensor]):
        return quantizer(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# A backend's one-pass form of MaskedReLU's backward, ``fn(dy, mask) -> dx`` or None where it does
# not apply to those tensors: registered by the backend whose graphs hold MaskedReLU (each tvm
# backend when it is created; the last one serves). Without one, torch's threshold_backward over
# an fp32 copy of the mask. Both give the same values, bit for bit.
_mask_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None


def register_mask_grad(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None) -> None:
    """Make ``fn`` the backward of :class:`MaskedReLU` (None: torch's)."""
    global _mask_grad
    _mask_grad = fn


class MaskedReLU(Function):
    """``relu(x)`` that keeps a 1-byte mask for backward instead of its fp32 output (autograd's
    ReLU keeps the output). The gradient is ``threshold_backward``'s: 0 where the output is
    ``<= 0``, else ``dy`` (NaN outputs pass their gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = torch.relu(x)
        # out >= 0 or NaN, so out != 0 is "not out <= 0"; as uint8 0/1 it can stand in for the
        # output in threshold_backward (a bool where() was much slower). out.bool() is out != 0
        # (NaN included) in a fraction of torch.ne's time
        ctx.save_for_backward(out.bool().view(torch.uint8))
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (mask,) = ctx.saved_tensors
        # one layout for both operands, the forward's (the mask's): on two layouts (channels-last
        # and not) threshold_backward takes a strided loop, many times slower than on one
        # layout, and the ops downstream (BatchNorm's backward) would
        # meet the gradient's layout too. The mask goes in as fp32, which costs about what the
        # uint8 operand costs the op itself.
        if dy.stride() != mask.stride():
            dy = torch.empty_like(mask, dtype=dy.dtype).copy_(dy)
        dx = _mask_grad(dy, mask) if _mask_grad is not None else None
        if dx is not None:
            return dx
        return torch.ops.aten.threshold_backward(dy, torch.empty_like(dy).copy_(mask), 0)


def masked_relu(x: torch.Tensor) -> torch.Tensor:
    """:class:`MaskedReLU` as a graph function (what the epilogue-fusion pass puts in place of the
    ReLUs it does not fuse)."""
    return MaskedReLU.apply(x)


class SiteGemm(Function):
    @staticmethod
    def forward(
        ctx,
        qx: torch.Tensor,
        qw: torch.Tensor,
        bias: torch.Tensor | None,
        spec: SiteSpec,
        g_bits: int,
        scheme: str,
        backend: "KernelBackend",
        noise: str = "torch",
        qw_eb: torch.Tensor | None = None,
    ):
        # qw_eb: the weight the error backprop reads when it is quantized differently
        # (weight_scale="gemm"); else qw
        ctx.save_for_backward(qx, qw, qw_eb)
        ctx.spec, ctx.g_bits, ctx.scheme, ctx.backend = spec, g_bits, scheme, backend
        ctx.noise = noise
        ctx.has_bias = bias is not None
        return backend.forward(spec, qx, qw, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qx, qw, qw_eb = ctx.saved_tensors
        spec, backend = ctx.spec, ctx.backend
        if isinstance(ctx.g_bits, torch.Tensor):  # per-sample precisions (routed DFQ)
            dyq = quantize_gradient_rows(dy, ctx.g_bits, ctx.scheme, noise=ctx.noise)
        else:
            dyq = quantize_gradient(dy, ctx.g_bits, ctx.scheme, noise=ctx.noise)
        dx = (
            backend.grad_input(spec, dyq, qx, qw if qw_eb is None else qw_eb)
            if ctx.needs_input_grad[0]
            else None
        )
        dw = backend.grad_weight(spec, qx, dyq, qw) if ctx.needs_input_grad[1] else None
        db = backend.grad_bias(spec, dyq) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


class GateProbe(Function):
    """Identity on the (per-sample quantized) site input ``qx``; its backward gives the gate of a
    routed site the gradient it would get in dense mode without running the other candidates.

    In dense mode ``y_i = sum_k onehot_ik * op(q_k(x)_i, w)``, so ``dL/d onehot_ik = <dy_i, y_ik>``.
    The op is linear in its input, hence ``y_ik = y_i + op(q_k(x_i) - qx_i, w)`` and
    ``<dy_i, y_ik> = <dy_i, y_i> + <dqx_i, q_k(x_i) - qx_i>`` where ``dqx = op^T(dy, w)`` is the
    error-backprop GEMM the backward pass computes anyway. The first term is the same for every k
    and cancels in the softmax's backward, so the gate receives ``<dqx_i, q_k(x_i) - qx_i>``: exact
    up to the quantization of dy, for the cost of K elementwise quantizations.
    """

    @staticmethod
    def forward(
        ctx,
        qx,
        onehot,
        x,
        quantize_at: Callable[[torch.Tensor, int], torch.Tensor],
        candidates: tuple[int, ...],
        quantized: Callable[[], torch.Tensor] | None = None,
        probe: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        # ``quantized``: makes the per-sample quantized values when ``qx`` is not them (an integer
        # backend passes ``x`` through and keeps codes: they are dequantized in backward).
        # ``probe(x, dqx)``: a backend's fused form of the sums below, ``(N, len(candidates))``
        ctx.save_for_backward(x, qx if quantized is None and probe is None else None)
        ctx.quantized, ctx.probe = quantized, probe
        ctx.quantize_at, ctx.candidates = quantize_at, candidates
        return qx.view_as(qx)

    @staticmethod
    def backward(ctx, dqx):
        x, qx = ctx.saved_tensors
        if ctx.probe is not None:
            return dqx, ctx.probe(x, dqx), None, None, None, None, None
        if ctx.quantized is not None:
            qx = ctx.quantized()
        dims = list(range(1, x.dim()))
        per_bits = {
            bits: (dqx * (ctx.quantize_at(x, bits) - qx)).sum(dims) for bits in set(ctx.candidates)
        }  # candidates often share an ``a``
        return dqx, torch.stack([per_bits[b] for b in ctx.candidates], 1), None, None, None, None, None
