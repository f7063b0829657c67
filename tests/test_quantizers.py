"""Property tests of fraccompile.ops.quantizers (docs/contract.md, the quantization contract).

Both schemes ("sbm", "symmetric"), bits 2..8 (plus 12 and 16): values land on the grid, round to
nearest is within half a step, weights are quantized per output channel, stochastic rounding of
gradients is unbiased (and deterministic rounding is not), degenerate tensors stay finite, bits=0 is
the identity.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fraccompile.ops.quantizers import (
    MIN_SCALE,
    channel_range,
    dequantize,
    fake_quantize,
    input_channel_range,
    qparams_from_range,
    quantize_activation,
    quantize_gradient,
    quantize_to_int,
    quantize_weight,
    tensor_range,
)

SCHEMES = ("sbm", "symmetric")
EPS32 = float(torch.finfo(torch.float32).eps)

schemes = st.sampled_from(SCHEMES)
low_bits = st.integers(2, 8)
any_bits = st.one_of(st.integers(2, 8), st.sampled_from([12, 16]))
finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
tensors = arrays(
    np.float32, array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=8), elements=finite32
).map(torch.from_numpy)
nonneg_tensors = arrays(
    np.float32,
    array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=8),
    elements=st.floats(0, 1e3, width=32),
).map(torch.from_numpy)
weights = arrays(
    np.float32, st.sampled_from([(1, 5), (4, 7), (3, 2, 3, 3), (8, 1, 1, 1), (6, 20)]), elements=finite32
).map(torch.from_numpy)

SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)


def fp_slack(*tensors_: torch.Tensor) -> float:
    """Absolute float32 rounding slack of ``q * scale + zero`` for values of these magnitudes."""
    peak = max(float(t.abs().max()) for t in tensors_)
    return 4 * EPS32 * peak


def assert_on_grid(fq: torch.Tensor, qp, bits: int, tol_steps: float = 1e-3) -> None:
    """(fq - zero) / scale is (within tol) an integer in [qmin, qmax]."""
    steps = (fq.double() - qp.zero.double()) / qp.scale.double()
    # float32 cannot hold q*scale + zero better than half an ulp of the larger of the two; at 12/16
    # bits that alone can be more than 1e-3 of a step, so the tolerance includes it.
    slack = 4 * EPS32 * (fq.double().abs() + qp.zero.double().abs()) / qp.scale.double()
    nearest = steps.round()
    assert bool(((steps - nearest).abs() <= tol_steps + slack).all()), (
        f"off-grid by {float((steps - nearest).abs().max()):.3g} steps"
    )
    inside = (steps >= qp.qmin - tol_steps - slack) & (steps <= qp.qmax + tol_steps + slack)
    assert bool(inside.all()), f"codes outside [{qp.qmin}, {qp.qmax}]: {steps[~inside][:5].tolist()}"


# -- grid ------------------------------------------------------------------------------------------
@SETTINGS
@given(x=tensors, bits=any_bits, scheme=schemes)
def test_values_land_on_the_grid(x, bits, scheme):
    lo, hi = tensor_range(x)
    qp = qparams_from_range(lo, hi, bits, scheme)
    q = quantize_to_int(x, qp)
    assert torch.equal(q, q.round()), "integer codes are not integers"
    assert float(q.min()) >= qp.qmin and float(q.max()) <= qp.qmax
    fq = dequantize(q, qp)
    assert fq.dtype == torch.float32
    assert_on_grid(fq, qp, bits)
    assert torch.equal(fake_quantize(x, qp), fq)


@SETTINGS
@given(x=tensors, bits=low_bits, scheme=schemes)
def test_grid_shape_matches_the_documented_scheme(x, bits, scheme):
    lo, hi = tensor_range(x)
    qp = qparams_from_range(lo, hi, bits, scheme)
    if scheme == "sbm":
        assert (qp.qmin, qp.qmax) == (0, 2**bits - 1)
        assert torch.equal(qp.zero, lo)
    elif float(lo) < 0:  # symmetric, signed restricted grid
        assert (qp.qmin, qp.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert float(qp.zero) == 0.0
    else:  # symmetric, non-negative activations: unsigned grid
        assert (qp.qmin, qp.qmax) == (0, 2**bits - 1)
        assert float(qp.zero) == 0.0
    assert float(qp.scale) >= float(torch.tensor(MIN_SCALE))  # the floor, as float32


@SETTINGS
@given(x=tensors, bits=any_bits, scheme=schemes)
def test_round_to_nearest_error_at_most_half_a_step(x, bits, scheme):
    lo, hi = tensor_range(x)
    qp = qparams_from_range(lo, hi, bits, scheme)
    fq = quantize_activation(x, bits, scheme)
    assert fq.shape == x.shape and fq.dtype == x.dtype
    err = (fq.double() - x.double()).abs()
    bound = float(qp.scale) / 2 + fp_slack(x, lo, hi)
    assert float(err.max()) <= bound, f"error {float(err.max())} > half step {float(qp.scale) / 2}"
    # ...and it is the nearest grid point: moving one step either way is never closer.
    q = quantize_to_int(x, qp)
    for d in (-1, 1):
        other = dequantize((q + d).clamp(qp.qmin, qp.qmax), qp).double()
        assert bool(((other - x.double()).abs() >= err - fp_slack(x, lo, hi)).all())


@SETTINGS
@given(
    x=tensors,
    bits=low_bits,
    scheme=schemes,
    lo_hi=st.tuples(st.floats(-10, 0, width=32), st.floats(0.5, 10, width=32)),
)
def test_activation_with_running_range_clamps_outside_values(x, bits, scheme, lo_hi):
    lo, hi = (torch.tensor(v) for v in lo_hi)
    qp = qparams_from_range(lo, hi, bits, scheme)
    fq = quantize_activation(x, bits, scheme, lo=lo, hi=hi)
    assert_on_grid(fq, qp, bits)
    grid_lo = float(dequantize(torch.tensor(qp.qmin), qp))
    grid_hi = float(dequantize(torch.tensor(qp.qmax), qp))
    assert float(fq.min()) >= grid_lo - fp_slack(x) and float(fq.max()) <= grid_hi + fp_slack(x)
    inside = (x >= grid_lo) & (x <= grid_hi)
    err = (fq.double() - x.double()).abs()[inside]
    if err.numel():
        assert float(err.max()) <= float(qp.scale) / 2 + fp_slack(x, lo, hi)
    assert bool((fq[x > grid_hi] == grid_hi).all()) and bool((fq[x < grid_lo] == grid_lo).all())


@SETTINGS
@given(x=nonneg_tensors, bits=low_bits)
def test_symmetric_activation_uses_unsigned_grid_when_non_negative(x, bits):
    fq = quantize_activation(x, bits, "symmetric")
    assert float(fq.min()) >= 0.0
    hi = float(x.max())
    if hi > 0:
        step = max(hi / (2**bits - 1), MIN_SCALE)
        assert_on_grid(fq, qparams_from_range(torch.tensor(0.0), torch.tensor(hi), bits, "symmetric"), bits)
        assert float((fq.double() - x.double()).abs().max()) <= step / 2 + fp_slack(x)


@SETTINGS
@given(x=tensors, bits=low_bits)
def test_symmetric_signed_grid_is_restricted_so_negation_commutes(x, bits):
    assume(float(x.min()) < 0 and float(x.max()) > 0)
    assert torch.equal(quantize_activation(-x, bits, "symmetric"), -quantize_activation(x, bits, "symmetric"))


# -- per-output-channel weights --------------------------------------------------------------------
@SETTINGS
@given(w=weights, bits=any_bits, scheme=schemes)
def test_quantize_weight_is_per_output_channel(w, bits, scheme):
    fq = quantize_weight(w, bits, scheme)
    assert fq.shape == w.shape and fq.dtype == w.dtype
    lo, hi = channel_range(w, 0)
    qp = qparams_from_range(lo, hi, bits, scheme, signed=True)
    assert qp.scale.shape == (w.shape[0],) + (1,) * (w.dim() - 1)
    assert_on_grid(fq, qp, bits)
    err = (fq.double() - w.double()).abs()
    assert bool((err <= qp.scale.double() / 2 + fp_slack(w)).all())
    for c in range(w.shape[0]):
        wc, fc = w[c], fq[c]
        if scheme == "sbm":
            # each channel's own min and max are reproduced within fp tolerance
            assert math.isclose(float(fc.min()), float(wc.min()), rel_tol=2 * EPS32, abs_tol=fp_slack(wc))
            # (below the MIN_SCALE floor the step is 1e-8, so the max is only within half of it)
            floored = float(wc.max() - wc.min()) < (2**bits - 1) * MIN_SCALE
            assert math.isclose(
                float(fc.max()),
                float(wc.max()),
                rel_tol=4 * EPS32,
                abs_tol=fp_slack(wc) + (MIN_SCALE / 2 if floored else 0.0),
            )
            # ...and depends on no other channel
            assert torch.equal(quantize_weight(w[c : c + 1], bits, scheme)[0], fc)
        else:
            # the channel's own peak magnitude is reproduced
            assert math.isclose(
                float(fc.abs().max()),
                float(wc.abs().max()),
                rel_tol=4 * EPS32,
                abs_tol=max(fp_slack(wc), MIN_SCALE),
            )


@pytest.mark.parametrize(
    "shape, groups",
    [
        ((7, 5), 1),
        ((2048, 512), 1),
        ((16, 8, 3, 3), 1),
        ((12, 3, 3, 3), 4),
        ((8, 1, 3, 3), 8),
        ((6, 4, 5), 2),
    ],
)
def test_weight_ranges_are_the_per_channel_extremes(shape, groups):
    """Per output channel and per input channel (per group), the ranges are exactly the
    extremes ``torch.aminmax`` finds over that channel's entries, a NaN included."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    w.view(-1)[3] = float("nan")  # channel 0's row, input channel 0 (or 1 for 1-D rows)
    lo, hi = channel_range(w, 0)
    ref = torch.aminmax(w.reshape(shape[0], -1), dim=1)
    assert lo.shape == hi.shape == (shape[0],) + (1,) * (w.dim() - 1)
    assert torch.equal(lo.flatten().nan_to_num(7.0), ref.min.nan_to_num(7.0))
    assert torch.equal(hi.flatten().nan_to_num(7.0), ref.max.nan_to_num(7.0))
    lo, hi = input_channel_range(w, groups)
    oc, cg = shape[0], shape[1]
    assert lo.shape == hi.shape == ((1 if groups == 1 else oc), cg) + (1,) * (w.dim() - 2)
    for o in range(lo.shape[0]):
        g = o // (oc // groups) if groups > 1 else 0
        block = w[g * (oc // groups) : (g + 1) * (oc // groups)]  # the group's output channels
        for c in range(cg):
            entries = block[:, c].reshape(-1)
            expect = torch.aminmax(entries)
            assert torch.equal(lo[o, c].reshape(()).nan_to_num(7.0), expect.min.nan_to_num(7.0)), (o, c)
            assert torch.equal(hi[o, c].reshape(()).nan_to_num(7.0), expect.max.nan_to_num(7.0)), (o, c)


def test_quantize_weight_channel_scales_differ():
    """A channel of small weights is not quantized with the step of a channel of large ones."""
    w = torch.stack([torch.linspace(-100, 100, 9), torch.linspace(-0.01, 0.01, 9)])
    for scheme in SCHEMES:
        fq = quantize_weight(w, 4, scheme)
        assert torch.allclose(fq[1], w[1], atol=0.01 / 7 / 2 + 1e-7), scheme
        assert len(torch.unique(fq[1])) > 1, scheme


def test_symmetric_weights_use_the_signed_grid():
    bits = 8
    w = torch.linspace(0, 1, 256).view(1, -1)  # one non-negative output channel
    levels = torch.unique(quantize_weight(w, bits, "symmetric"))
    # signed restricted grid: codes 0..127 on the non-negative side -> at most 128 levels
    assert len(levels) <= 2 ** (bits - 1), f"weights use {len(levels)} levels (codes up to 255)"


def test_symmetric_weight_channel_grid_does_not_depend_on_other_channels():
    w = torch.stack([torch.linspace(0, 1, 256), torch.linspace(-1, 1, 256)])
    assert torch.equal(quantize_weight(w, 8, "symmetric")[0], quantize_weight(w[:1], 8, "symmetric")[0])


def test_symmetric_gradients_use_the_signed_grid():
    bits = 8
    g = torch.linspace(0, 1, 1000)  # e.g. dy of loss = y.sum() after a ReLU: all non-negative
    gq = quantize_gradient(g, bits, "symmetric", generator=torch.Generator().manual_seed(0))
    levels = torch.unique(gq)
    assert len(levels) <= 2 ** (bits - 1), f"gradients use {len(levels)} levels (codes up to 255)"


# -- stochastic rounding of gradients --------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 8),
    scheme=schemes,
    data=st.data(),
    frac=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(bits, scheme, data, frac, seed):
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    qp = qparams_from_range(lo, hi, bits, scheme)
    k = data.draw(st.integers(int(qp.qmin), int(qp.qmax) - 1), label="k")
    scale, zero = float(qp.scale), float(qp.zero)
    v = zero + (k + frac) * scale  # strictly between grid points k and k+1
    n = 100_000
    g = torch.cat([lo.view(1), hi.view(1), torch.full((n,), v)])  # the range endpoints fix the grid
    gq = quantize_gradient(g, bits, scheme, generator=torch.Generator().manual_seed(seed))
    vals = gq[2:].double()
    f = (v - zero) / scale - k  # the fraction as float32 actually stores it
    codes = ((vals - zero) / scale).round()
    assert set(torch.unique(codes).tolist()) <= {float(k), float(k + 1)}, "not an adjacent grid point"
    se = scale * math.sqrt(f * (1 - f) / n)
    mean = float(vals.mean())
    assert abs(mean - v) < 5 * se + 1e-6, f"stochastic mean {mean} vs {v} (se {se})"
    # the endpoints are on the grid and come back exactly
    assert float(gq[0]) == pytest.approx(-1.0, abs=1e-6) and float(gq[1]) == pytest.approx(1.0, abs=1e-6)
    # round to nearest on the same values is biased by min(f, 1 - f) steps, far beyond 5 se
    det = quantize_activation(g, bits, scheme)[2:].double()
    assert abs(float(det.mean()) - v) > 5 * se, "round-to-nearest should be biased here"
    assert abs(float(det.mean()) - v) == pytest.approx(min(f, 1 - f) * scale, rel=1e-3, abs=1e-6)


def test_stochastic_rounding_unbiased_per_element_over_repeats():
    torch.manual_seed(1234)
    x = torch.linspace(-0.93, 0.87, 16)
    reps = 4000
    for scheme in SCHEMES:
        for bits in (2, 3, 4):
            lo, hi = tensor_range(x)
            qp = qparams_from_range(lo, hi, bits, scheme)
            gen = torch.Generator().manual_seed(bits)
            acc = torch.zeros(16, dtype=torch.float64)
            for _ in range(reps):
                acc += quantize_gradient(x, bits, scheme, generator=gen).double()
            mean = acc / reps
            t = (x.double() - qp.zero.double()) / qp.scale.double()
            f = t - t.floor()
            se = qp.scale.double() * (f * (1 - f) / reps).sqrt()
            assert bool(((mean - x.double()).abs() <= 5 * se + 1e-6).all()), (scheme, bits)


def test_stochastic_rounding_is_reproducible_with_a_seed():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for scheme in SCHEMES:
        a = quantize_gradient(g, 4, scheme, generator=torch.Generator().manual_seed(7))
        b = quantize_gradient(g, 4, scheme, generator=torch.Generator().manual_seed(7))
        c = quantize_gradient(g, 4, scheme, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.manual_seed(3)
        d = quantize_gradient(g, 4, scheme)
        torch.manual_seed(3)
        assert torch.equal(d, quantize_gradient(g, 4, scheme))


@SETTINGS
@given(x=tensors, bits=any_bits, scheme=schemes, seed=st.integers(0, 2**31 - 1))
def test_stochastic_rounding_lands_on_an_adjacent_grid_point(x, bits, scheme, seed):
    lo, hi = tensor_range(x)
    qp = qparams_from_range(lo, hi, bits, scheme, signed=True)
    gq = quantize_gradient(x, bits, scheme, generator=torch.Generator().manual_seed(seed))
    assert_on_grid(gq, qp, bits)
    assert float((gq.double() - x.double()).abs().max()) <= float(qp.scale) + fp_slack(x, lo, hi)


# -- degenerate tensors ----------------------------------------------------------------------------
QUANTIZERS = {
    "weight": lambda t, b, s: quantize_weight(t, b, s),
    "activation": lambda t, b, s: quantize_activation(t, b, s),
    "gradient": lambda t, b, s: quantize_gradient(t, b, s, generator=torch.Generator().manual_seed(0)),
}

DEGENERATE = {
    "zeros": lambda: torch.zeros(4, 6),
    "const": lambda: torch.full((4, 6), 3.7),
    "neg_const": lambda: torch.full((4, 6), -2.5),
    "huge_const": lambda: torch.full((4, 6), 1e30),
    "tiny_const": lambda: torch.full((4, 6), 1e-30),
    "huge": lambda: torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 1e30,
    "tiny": lambda: torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 1e-30,
    "one_row_const": lambda: torch.cat([torch.full((1, 6), 0.5), torch.randn(3, 6)]),
}


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 8, 16])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_tensors_stay_finite(case, bits, scheme, kind):
    x = DEGENERATE[case]()
    out = QUANTIZERS[kind](x, bits, scheme)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all()), f"{case}: {out}"
    # magnitudes stay on the tensor's scale (no blow-up): within one step of the input
    peak = float(x.abs().max())
    assert float((out.double() - x.double()).abs().max()) <= max(peak, MIN_SCALE) * 1.0001


CONSTANTS = [0.0, 3.7, -2.5, 0.1, 1e30, -1e30, 1e-30, -1e-30, 123.456, 458.359375]


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("value", CONSTANTS)
def test_sbm_constant_tensors_come_back_within_an_ulp(value, bits, kind):
    x = torch.full((3, 5), value)
    out = QUANTIZERS[kind](x, bits, "sbm")
    assert torch.allclose(out, x, rtol=2 * EPS32, atol=0), out[0, 0].item()
    if value == 0.0:
        assert torch.equal(out, x)


def test_sbm_constant_tensors_come_back_exactly():
    bad = []
    for value in CONSTANTS:
        x = torch.full((3, 5), value)
        lo, hi = tensor_range(x)
        for bits in (2, 4, 8, 12, 16):
            qp = qparams_from_range(lo, hi, bits, "sbm")
            if not torch.equal(quantize_to_int(x, qp), torch.zeros_like(x)):
                bad.append(("codes", value, bits))
            for kind, fn in QUANTIZERS.items():
                if not torch.equal(fn(x, bits, "sbm"), x):
                    bad.append((kind, value, bits))
    assert not bad, bad


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("value", [0.0, 3.7, -2.5, 0.1, 1e30, -1e30, 123.456])
def test_symmetric_constant_tensors_come_back_within_an_ulp(value, bits, kind):
    """Symmetric pins the zero point at 0, so a constant c lands on ``qmax * (c / qmax)``: exact
    up to float32 rounding of the scale (0.1 at 2 bits comes back 1 ulp off)."""
    x = torch.full((3, 5), value)
    out = QUANTIZERS[kind](x, bits, "symmetric")
    assert torch.allclose(out, x, rtol=2 * EPS32, atol=0), out[0, 0].item()


@pytest.mark.parametrize("value", [1e-30, -1e-30, 1e-12])
def test_symmetric_tiny_constant_tensors_come_back(value):
    x = torch.full((3, 5), value)
    for kind, fn in QUANTIZERS.items():
        out = fn(x, 8, "symmetric")
        assert torch.allclose(out, x, rtol=1e-6, atol=0), (kind, out[0, 0].item())


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_sbm_extreme_range_stays_finite(kind):
    x = torch.tensor([[-3e38, 3e38, 1.0, 0.0]])
    out = QUANTIZERS[kind](x, 8, "sbm")
    assert bool(torch.isfinite(out).all()), out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_low_precision_dtypes_are_preserved(scheme):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        for kind, fn in QUANTIZERS.items():
            out = fn(xd, 4, scheme)
            assert out.dtype == dtype and bool(torch.isfinite(out).all()), (kind, dtype)


# -- bits = 0 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [0, None])
def test_bits_zero_returns_the_input_object(scheme, bits):
    x = torch.randn(3, 4, requires_grad=True)
    assert quantize_weight(x, bits, scheme) is x
    assert quantize_activation(x, bits, scheme) is x
    assert quantize_activation(x, bits, scheme, lo=torch.tensor(-1.0), hi=torch.tensor(1.0)) is x
    assert quantize_gradient(x, bits, scheme) is x


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="scheme"):
        qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), 8, "nope")


def test_per_tensor_weight_scale_puts_every_channel_on_one_grid():
    """quantize_weight(per_channel=False): one scale for the whole tensor (the largest |w|), so a
    channel of small weights lands on the coarse grid of the large ones; the default keeps a grid
    per channel."""
    from fraccompile.ops.quantizers import quantize_weight

    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-0.01, 0.01, 9)])
    tensor = quantize_weight(w, 4, "symmetric", per_channel=False)
    step = 1 / 7  # the signed 4-bit grid is -7..7
    assert torch.allclose(tensor / step, (tensor / step).round(), atol=1e-5)
    assert torch.count_nonzero(tensor[1]) == 0  # 0.01 < step / 2: the small channel vanishes
    channel = quantize_weight(w, 4, "symmetric")
    assert torch.count_nonzero(channel[1]) == 8 and torch.allclose(channel[1], w[1], atol=0.01 / 14)


# -- stochastic rounding's counter noise -----------------------------------------------------------
def _lowbias32_numpy(index: np.ndarray, seed: int) -> np.ndarray:
    """counter_noise written independently, in numpy uint32 (wrapping, logical shifts)."""
    with np.errstate(over="ignore"):
        h = index.astype(np.uint32) * np.uint32(0x9E3779B1) ^ np.uint32(seed & 0xFFFFFFFF)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float64) * 2.0**-24


@pytest.mark.parametrize("seed", [0, 1, -1, 2**31 - 2, -(2**31), 123456789])
def test_counter_noise_matches_an_independent_uint32_implementation(seed):
    from fraccompile.ops.quantizers import counter_noise

    shape = (3, 5, 7, 11)
    got = counter_noise(shape, torch.tensor([seed], dtype=torch.int32))
    want = _lowbias32_numpy(np.arange(math.prod(shape)), seed).reshape(shape)
    assert got.dtype == torch.float32 and got.shape == shape
    assert np.array_equal(got.double().numpy(), want)
    assert 0 <= got.min() and got.max() < 1


def test_counter_noise_is_uniform_and_uncorrelated():
    """1M draws: mean, variance, a chi-square over 64 bins and the lag-1 / lag-(row) correlations
    of a U[0, 1) sample; two seeds give unrelated noise."""
    from fraccompile.ops.quantizers import counter_noise

    n = 1 << 20
    u = counter_noise((n,), torch.tensor([7], dtype=torch.int32)).double()
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 1e-3
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: P(chi2 > 120) < 1e-5
    for lag in (1, 16, 1024):
        c = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()
        assert abs(c) < 5 / math.sqrt(n), (lag, c)
    v = counter_noise((n,), torch.tensor([8], dtype=torch.int32)).double()
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 5 / math.sqrt(n)


def test_counter_noise_seeds_follow_torch_manual_seed():
    from fraccompile.ops.quantizers import uniform_noise

    torch.manual_seed(3)
    a = uniform_noise((4, 9), "counter")
    b = uniform_noise((4, 9), "counter")
    torch.manual_seed(3)
    assert torch.equal(a, uniform_noise((4, 9), "counter")) and not torch.equal(a, b)
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(
        uniform_noise((2, 2), "counter", gen),
        uniform_noise((2, 2), "counter", torch.Generator().manual_seed(3)),
    )
    with pytest.raises(ValueError, match="counter"):
        uniform_noise((2,), "philox")


@pytest.mark.parametrize("noise", ["torch", "counter"])
def test_stochastic_rounding_is_unbiased_with_either_noise(noise):
    """E[fake_quantize(x)] = x inside the range: the mean of 4096 roundings of each value is within
    a few standard errors of it (a biased noise, e.g. u in [0, 0.9), fails)."""
    x = torch.linspace(-0.9, 0.9, 37)
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), 3, "symmetric", signed=True)
    torch.manual_seed(0)
    mean = torch.stack([fake_quantize(x, qp, stochastic=True, noise=noise) for _ in range(4096)]).mean(0)
    step = qp.scale.item()
    assert (mean - x).abs().max().item() < 4 * step / 2 / math.sqrt(4096)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.contiguous(memory_format=torch.channels_last),
        lambda t: t.permute(3, 1, 0, 2),
        lambda t: t[:, :, ::2],  # not dense in any order: read as it is
        lambda t: t[:, :1].contiguous(memory_format=torch.channels_last),  # a size-1 dim
    ],
)
def test_tensor_range_of_non_contiguous_layouts(make):
    """tensor_range reads a tensor dense in another dim order in that order (no contiguous copy);
    the extremes are aminmax's of the logical tensor."""
    t = make(torch.randn(4, 6, 5, 7, generator=torch.Generator().manual_seed(0)))
    lo, hi = tensor_range(t)
    want = torch.aminmax(t.contiguous())
    assert torch.equal(lo, want.min) and torch.equal(hi, want.max)
