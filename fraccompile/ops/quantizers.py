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

Stochastic rounding adds uniform noise ``u`` in [0, 1) drawn one of two ways
(``FracConfig.rounding_noise``):

* ``torch``: ``torch.rand`` from the generator (the default);
* ``counter``: a counter-based hash of each element's logical index and a 32-bit seed drawn from
  the generator (:func:`counter_noise`). The same seed gives the same noise in any memory layout and
  on any device, and an integer kernel can compute it in registers instead of reading a drawn
  tensor (the ``tvm`` backend does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ROUNDING_NOISES = ("torch", "counter")  # FracConfig.rounding_noise: the source of the rounding noise
# FracConfig.weight_scale: where a weight's grids sit (docs/contract.md); "gemm" the default
WEIGHT_SCALES = ("channel", "tensor", "gemm")
DEFAULT_WEIGHT_SCALE = "gemm"

# Floor of the quantization step, only there to avoid dividing by zero: a zero-range (constant)
# tensor then quantizes exactly. SBM floors at 1e-8, which flushes tensors whose whole range is below
# ~1e-6 (deep gradients can be) to their minimum; the smallest normal float keeps them.
MIN_SCALE = float(torch.finfo(torch.float32).tiny)

# counter_noise's uint32 constants (torch multiplies by their int32 views): the golden-ratio step
# spreads consecutive indices, then Wellons' "lowbias32" finalizer (xor-shift-multiply rounds).
NOISE_STEP, NOISE_MUL1, NOISE_MUL2 = 0x9E3779B1, 0x7FEB352D, 0x846CA68B
NOISE_BITS = 24  # u = (hash >> 8) * 2**-24: every value exact in fp32, 0 <= u < 1


def _i32(value: int) -> int:
    """A uint32 constant as the int32 with the same bits (torch has no uint32 arithmetic)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def noise_seed(generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32-bit seed of one :func:`counter_noise` draw, from ``generator`` (torch's default one
    when None), as a one-element int32 tensor on ``device`` (no host sync on a GPU)."""
    return torch.randint(
        -(2**31),
        2**31 - 1,
        (1,),
        generator=generator,
        dtype=torch.int32,
        device=device if generator is None else generator.device,
    ).to(device)


def counter_noise(shape, seed: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform noise in [0, 1) of ``shape`` (fp32, fewer than 2**31 elements): element ``i`` (its
    row-major logical index) gets ``lowbias32((i * NOISE_STEP) ^ seed) >> 8`` scaled by 2**-24.

    Integer arithmetic wraps modulo 2**32 in int32 (torch's and the kernels'); right shifts are
    logical (masked after torch's arithmetic shift)."""
    n = 1
    for d in shape:
        n *= int(d)
    if n >= 2**31:
        raise ValueError(f"counter noise indexes at most 2**31 - 1 elements, not {n}")
    x = torch.arange(n, dtype=torch.int32, device=device)
    x.mul_(_i32(NOISE_STEP)).bitwise_xor_(seed.to(device=device, dtype=torch.int32))
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF)).mul_(_i32(NOISE_MUL1))
    x.bitwise_xor_(x.bitwise_right_shift(15).bitwise_and_(0x1FFFF)).mul_(_i32(NOISE_MUL2))
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    u = x.bitwise_right_shift_(32 - NOISE_BITS).bitwise_and_((1 << NOISE_BITS) - 1).float()
    return u.mul_(2.0**-NOISE_BITS).view(tuple(shape))


def uniform_noise(
    shape, noise: str = "torch", generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Stochastic rounding's ``u ~ U[0, 1)`` (fp32) drawn the ``noise`` way."""
    if noise == "torch":
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    if noise == "counter":
        return counter_noise(shape, noise_seed(generator, device), device)
    raise ValueError(f"unknown rounding noise {noise!r}: choose {', '.join(ROUNDING_NOISES)}")


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


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, scheme: str, signed: bool | None = None
) -> QParams:
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
    which is the extreme of the whole tensor. A tensor dense in another dim order (channels-last)
    is read in its memory order: ``aminmax`` would first copy it to a contiguous one."""
    x = x.detach()
    if not x.is_contiguous() and x.dim() > 1:
        order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
        if x.permute(order).is_contiguous():
            x = x.permute(order)
    lo, hi = torch.aminmax(x)
    return lo, hi


def _min_max(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` along ``dim``: the values of ``torch.aminmax(t, dim=dim)`` (NaN included),
    through ``amin`` and ``amax``, whose reductions are vectorized where ``aminmax``'s with a
    ``dim`` is not (many times slower on a large weight)."""
    return t.amin(dim), t.amax(dim)


def channel_range(w: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(min, max)`` along ``dim`` (output channels of a weight), shaped to broadcast."""
    w = w.detach()
    moved = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    lo, hi = _min_max(moved, 1)
    shape = [1] * w.dim()
    shape[dim] = w.shape[dim]
    return lo.view(shape), hi.view(shape)


def quantize_to_int(
    x: torch.Tensor,
    qp: QParams,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    noise: str = "torch",
) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x`` on the grid ``qp``.

    Stochastic rounding is ``floor(t + u)`` with ``u ~ U[0, 1)`` drawn the ``noise`` way, i.e. SBM's
    ``round(t + U[-0.5, 0.5))``, which makes the dequantized value unbiased inside the range.
    """
    t = torch.sub(x.float(), qp.zero).div_(qp.scale)  # exact 0 for x == zero (constants)
    if stochastic:
        t.add_(uniform_noise(t.shape, noise, generator, t.device)).floor_()
    else:
        t.round_()
    return t.clamp_(qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.addcmul(qp.zero, q, qp.scale).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    qp: QParams,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    noise: str = "torch",
) -> torch.Tensor:
    """Round ``x`` onto the grid ``qp`` and map it back to ``x``'s dtype."""
    q = quantize_to_int(x, qp, stochastic=stochastic, generator=generator, noise=noise)
    return torch.addcmul(qp.zero, q, qp.scale, out=q).to(x.dtype)


def weight_range(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's range: per output channel (dim 0, shaped to broadcast), or of the whole tensor."""
    return channel_range(w, 0) if per_channel else tensor_range(w)


def quantize_weight(w: torch.Tensor, bits: int, scheme: str, per_channel: bool = True) -> torch.Tensor:
    """Per-output-channel (dim 0) range, or per-tensor with ``per_channel=False``; round to
    nearest (symmetric: the signed grid)."""
    if not bits:
        return w
    lo, hi = weight_range(w, per_channel)
    return fake_quantize(w, qparams_from_range(lo, hi, bits, scheme, signed=True))


def input_channel_range(w: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's range per input channel (dim 1), per group of a grouped conv: the ranges of the
    error backprop's non-reduction axis, shaped to broadcast against ``w``."""
    w = w.detach()
    oc, cg = w.shape[0], w.shape[1]
    # over the output channels first (the outer dim: a reduction vectorized along the rest, no
    # transposed copy), then over the taps
    lo, hi = _min_max(w.reshape(groups, oc // groups, cg, -1), 1)
    lo, hi = lo.amin(-1), hi.amax(-1)  # (groups, cg)
    shape = (1, cg) if groups == 1 else (oc, cg)
    if groups > 1:
        lo, hi = lo.repeat_interleave(oc // groups, 0), hi.repeat_interleave(oc // groups, 0)
    return (lo.reshape(*shape, *([1] * (w.dim() - 2))), hi.reshape(*shape, *([1] * (w.dim() - 2))))


def quantize_weight_for_backprop(w: torch.Tensor, bits: int, scheme: str, groups: int = 1) -> torch.Tensor:
    """``weight_scale="gemm"``: the weight as the error backprop reads it, quantized per input
    channel (round to nearest; symmetric: the signed grid)."""
    if not bits:
        return w
    lo, hi = input_channel_range(w, groups)
    return fake_quantize(w, qparams_from_range(lo, hi, bits, scheme, signed=True))


def quantize_activation(
    x: torch.Tensor, bits: int, scheme: str, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-tensor range (the batch's, or a given running range in eval), round to nearest."""
    if not bits:
        return x
    if lo is None or hi is None:
        lo, hi = tensor_range(x)
    return fake_quantize(x, qparams_from_range(lo, hi, bits, scheme))


def quantize_gradient(
    g: torch.Tensor, bits: int, scheme: str, generator: torch.Generator | None = None, noise: str = "torch"
) -> torch.Tensor:
    """Per-tensor range, stochastic rounding (symmetric: the signed grid)."""
    if not bits:
        return g
    lo, hi = tensor_range(g)
    return fake_quantize(
        g,
        qparams_from_range(lo, hi, bits, scheme, signed=True),
        stochastic=True,
        generator=generator,
        noise=noise,
    )


def quantize_rows(
    x: torch.Tensor,
    row_bits: torch.Tensor,
    qp_for_bits,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    noise: str = "torch",
) -> torch.Tensor:
    """Quantize each sample (row along dim 0) of ``x`` at its own precision ``row_bits[i]``, with
    ``qp_for_bits(bits)`` giving the grid (one shared range, so rows differ only in step size)."""
    out = torch.empty_like(x)
    for bits in torch.unique(row_bits).tolist():
        rows = (row_bits == bits).nonzero().flatten()
        out[rows] = fake_quantize(
            x[rows], qp_for_bits(int(bits)), stochastic=stochastic, generator=generator, noise=noise
        )
    return out


def quantize_gradient_rows(
    g: torch.Tensor, row_bits: torch.Tensor, scheme: str, noise: str = "torch"
) -> torch.Tensor:
    """Per-tensor range, stochastic rounding, each sample at its own precision."""
    lo, hi = tensor_range(g)
    return quantize_rows(
        g,
        row_bits,
        lambda b: qparams_from_range(lo, hi, b, scheme, signed=True),
        stochastic=True,
        noise=noise,
    )
