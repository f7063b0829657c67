"""FracTrain's quantizers (SBM-style, Banner et al. 2018) and a symmetric variant.

All functions here are pure tensor math with no autograd: the straight-through estimator and the
gradient quantization live in :mod:`fraccompile.ops.functions`. ``bits == 0`` always means "leave the
tensor as it is".

Quantization grid (both schemes): ``q = clamp(round((x - zero) / scale), qmin, qmax)`` and the
fake-quantized value is ``q * scale + zero``.

* ``sbm``: ``zero = min``, ``scale = (max - min) / (2**bits - 1)``, unsigned grid ``qmin = 0``.
* ``symmetric``: ``zero = 0``; weights (per channel) and gradients use the signed grid
  ``-(2**(bits-1)-1)..2**(bits-1)-1`` with ``scale = max|x| / (2**(bits-1) - 1)`` (restricted range,
  so ``-x`` quantizes like ``x``); activations use it too unless they are non-negative, in which
  case they use the unsigned grid ``0..2**bits-1`` with ``scale = max / (2**bits - 1)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Floor of the quantization step, only there to avoid dividing by zero: a zero-range (constant)
# tensor then quantizes exactly. SBM floors at 1e-8, which flushes tensors whose whole range is below
# ~1e-6 (deep gradients can be) to their minimum; the smallest normal float keeps them.
MIN_SCALE = float(torch.finfo(torch.float32).tiny)


class QParams(NamedTuple):
    """Affine quantization parameters; ``scale``/``zero`` broadcast against the tensor."""

    scale: torch.Tensor
    zero: torch.Tensor
    qmin: float
    qmax: float


def _grid(bits: int, signed: bool) -> tuple[float, float]:
    if signed:
        half = float(2 ** (bits - 1) - 1)
        return -half, half
    return 0.0, float(2**bits - 1)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, scheme: str,
                       signed: bool | None = None) -> QParams:
    """Quantization parameters covering ``[lo, hi]`` (tensors of any broadcastable shape).

    ``signed`` only matters for ``symmetric``: True/False force the signed/unsigned grid, None picks
    unsigned when the range is non-negative (activations after ReLU)."""
    lo = lo.float()
    hi = hi.float()
    if scheme == "sbm":
        qmin, qmax = _grid(bits, signed=False)
        # hi/q - lo/q rather than (hi - lo)/q: the difference of two huge floats can overflow
        scale = (hi / qmax - lo / qmax).clamp_min(MIN_SCALE)
        return QParams(scale, lo, qmin, qmax)
    if scheme == "symmetric":
        if signed is None:
            signed = bool((lo < 0).any())
        qmin, qmax = _grid(bits, signed)
        peak = torch.maximum(hi.abs(), lo.abs()) if signed else hi.clamp_min(0)
        scale = (peak / qmax).clamp_min(MIN_SCALE)
        return QParams(scale, torch.zeros_like(scale), qmin, qmax)
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def tensor_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(min, max)``: SBM takes per-sample extremes and then the extreme over the batch,
    which is the extreme of the whole tensor."""
    lo, hi = torch.aminmax(x.detach())
    return lo, hi


def channel_range(w: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(min, max)`` along ``dim`` (output channels of a weight), shaped to broadcast."""
    w = w.detach()
    moved = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    lo, hi = torch.aminmax(moved, dim=1)
    shape = [1] * w.dim()
    shape[dim] = w.shape[dim]
    return lo.view(shape), hi.view(shape)


def quantize_to_int(x: torch.Tensor, qp: QParams, *, stochastic: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x`` on the grid ``qp``.

    Stochastic rounding is ``floor(t + u)`` with ``u ~ U[0, 1)``, i.e. SBM's ``round(t + U[-0.5, 0.5))``, which
    makes the dequantized value unbiased inside the range.
    """
    t = torch.sub(x.float(), qp.zero).div_(qp.scale)  # exact 0 for x == zero (constants)
    if stochastic:
        t.add_(torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)).floor_()
    else:
        t.round_()
    return t.clamp_(qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.addcmul(qp.zero, q, qp.scale).to(dtype)


def fake_quantize(x: torch.Tensor, qp: QParams, *, stochastic: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Round ``x`` onto the grid ``qp`` and map it back to ``x``'s dtype."""
    q = quantize_to_int(x, qp, stochastic=stochastic, generator=generator)
    return torch.addcmul(qp.zero, q, qp.scale, out=q).to(x.dtype)


def weight_range(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's range: per output channel (dim 0, shaped to broadcast), or of the whole tensor."""
    return channel_range(w, 0) if per_channel else tensor_range(w)


def quantize_weight(w: torch.Tensor, bits: int, scheme: str, per_channel: bool = True
                    ) -> torch.Tensor:
    """Per-output-channel (dim 0) range, or per-tensor with ``per_channel=False``; round to
    nearest (symmetric: the signed grid)."""
    if not bits:
        return w
    lo, hi = weight_range(w, per_channel)
    return fake_quantize(w, qparams_from_range(lo, hi, bits, scheme, signed=True))


def quantize_activation(x: torch.Tensor, bits: int, scheme: str,
                        lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor range (the batch's, or a given running range in eval), round to nearest."""
    if not bits:
        return x
    if lo is None or hi is None:
        lo, hi = tensor_range(x)
    return fake_quantize(x, qparams_from_range(lo, hi, bits, scheme))


def quantize_gradient(g: torch.Tensor, bits: int, scheme: str,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-tensor range, stochastic rounding (symmetric: the signed grid)."""
    if not bits:
        return g
    lo, hi = tensor_range(g)
    return fake_quantize(g, qparams_from_range(lo, hi, bits, scheme, signed=True), stochastic=True,
                         generator=generator)


def quantize_rows(x: torch.Tensor, row_bits: torch.Tensor, qp_for_bits, *, stochastic: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize each sample (row along dim 0) of ``x`` at its own precision ``row_bits[i]``, with
    ``qp_for_bits(bits)`` giving the grid (one shared range, so rows differ only in step size)."""
    out = torch.empty_like(x)
    for bits in torch.unique(row_bits).tolist():
        rows = (row_bits == bits).nonzero().flatten()
        out[rows] = fake_quantize(x[rows], qp_for_bits(int(bits)), stochastic=stochastic,
                                  generator=generator)
    return out


def quantize_gradient_rows(g: torch.Tensor, row_bits: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-tensor range, stochastic rounding, each sample at its own precision."""
    lo, hi = tensor_range(g)
    return quantize_rows(g, row_bits, lambda b: qparams_from_range(lo, hi, b, scheme, signed=True),
                         stochastic=True)
