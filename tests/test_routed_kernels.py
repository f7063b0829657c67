"""The tvm backend's one-pass kernels of DFQ-routed sites: the input's codes with a grid per sample
(bit for bit the reference's group-by-group codes), and the fused gate probe
(fraccompile/targets/kernels/probe.py) against GateProbe's torch sums ``Σ dqx·(q_k(x) - qx)`` per sample
and candidate, in any layout of ``x`` and ``dqx``."""

from __future__ import annotations

import pytest
import torch

from fraccompile.ops.contract import GateDecision
from fraccompile.ops.quantizers import qparams_from_range, quantize_activation, quantize_rows
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(
    tvm_unavailable_reason() is not None, reason=f"TVM unavailable: {tvm_unavailable_reason()}"
)


def _torch_sums(x, dqx, qx, lo, hi, scheme, candidates):
    dims = list(range(1, x.dim()))
    return torch.stack(
        [(dqx * (quantize_activation(x, b, scheme, lo=lo, hi=hi) - qx)).sum(dims) for b in candidates], 1
    )


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize(
    "shape,x_layout,g_layout",
    [
        ((6, 16, 7, 5), "cl", "cl"),  # a channels-last conv input, its gradient alike
        ((6, 16, 7, 5), "cl", "nchw"),  # the gradient in the other layout
        ((6, 3, 9, 9), "nchw", "nchw"),
        ((5, 4, 37), "nchw", "nchw"),  # a linear site's (N, T, C) input: a scalar tail per sample
    ],
)
def test_fused_gate_probe_matches_torch(scheme, shape, x_layout, g_layout):
    from fraccompile.ops.backend import get_backend

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen)
    if scheme == "symmetric":
        x = x.relu()
    dqx = torch.randn(*shape, generator=gen)
    if x_layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    if g_layout == "cl":
        dqx = dqx.contiguous(memory_format=torch.channels_last)
    candidates = (3, 4, 4, 6, 8)  # a repeated candidate, as DFQ's are
    choice = torch.tensor([i % 5 for i in range(shape[0])])
    onehot = torch.nn.functional.one_hot(choice, 5).float()
    d = GateDecision(onehot, choice, candidates, (8,) * 5, 8, "routed")
    lo, hi = torch.aminmax(x)
    qx = quantize_rows(x, d.row_bits("a"), lambda b: qparams_from_range(lo, hi, b, scheme))
    got = get_backend("tvm")._gate_probe(d, scheme, lo, hi)(x, dqx)
    ref = _torch_sums(x, dqx, qx, lo, hi, scheme, candidates)
    assert got.shape == (shape[0], 5)
    scale = ref.abs().max().clamp_min(1e-6)
    assert ((got - ref).abs().max() / scale) < 1e-5


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize(
    "shape,layout", [((7, 16, 5, 6), "cl"), ((7, 3, 9, 9), "nchw"), ((6, 5, 70), "nchw")]
)
def test_per_sample_codes_in_one_pass_equal_group_by_group(scheme, shape, layout):
    from fraccompile.ops.backend import get_backend
    from fraccompile.targets.backend.codes import _row_codes

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen) * 3
    if scheme == "symmetric":
        x = x.relu()
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    row_bits = torch.tensor([(3, 4, 6, 8, 2)[i % 5] for i in range(shape[0])])
    lo, hi = torch.aminmax(x)

    def grid(b):
        return qparams_from_range(lo, hi, b, scheme)

    kernel = get_backend("tvm").kernel
    fused = _row_codes(x, row_bits, grid, asymmetric=scheme == "sbm", kernel=kernel)
    looped = _row_codes(x, row_bits, grid, asymmetric=scheme == "sbm", kernel=None)
    assert fused.codes.dtype == looped.codes.dtype
    assert torch.equal(fused.codes, looped.codes)
    assert torch.equal(fused.scale, looped.scale) and torch.equal(fused.qmax, looped.qmax)
    if layout == "cl":  # the codes keep the input's layout (the conv kernels read it as is)
        assert fused.codes.is_contiguous(memory_format=torch.channels_last)
    ref = quantize_rows(x, row_bits, grid)
    assert torch.equal(fused.dequantize(), ref)


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize(
    "shape,layout", [((7, 16, 5, 6), "cl"), ((7, 3, 9, 9), "nchw"), ((6, 5, 70), "nchw")]
)
@pytest.mark.parametrize("g_bits", [(6, 8), (6, 12)])
def test_per_sample_gradient_codes_in_one_pass_take_the_reference_draws(scheme, shape, layout, g_bits):
    """Stochastic rounding with counter noise per sample: one pass, the same codes as the
    reference's group-by-group quantizer with its seeds (12-bit codes too)."""
    from fraccompile.ops.backend import get_backend
    from fraccompile.targets.backend.codes import _row_codes

    gen = torch.Generator().manual_seed(2)
    dy = torch.randn(*shape, generator=gen)
    if layout == "cl":
        dy = dy.contiguous(memory_format=torch.channels_last)
    row_bits = torch.tensor([g_bits[i % 2] for i in range(shape[0])])
    lo, hi = torch.aminmax(dy)

    def grid(b):
        return qparams_from_range(lo, hi, b, scheme, signed=True)

    torch.manual_seed(9)
    fused = _row_codes(
        dy,
        row_bits,
        grid,
        stochastic=True,
        noise="counter",
        asymmetric=scheme == "sbm",
        kernel=get_backend("tvm").kernel,
    )
    after_fused = torch.rand(1)
    torch.manual_seed(9)
    ref = quantize_rows(dy, row_bits, grid, stochastic=True, noise="counter")
    after_ref = torch.rand(1)
    assert torch.equal(fused.dequantize(), ref)
    assert torch.equal(after_fused, after_ref)  # as many draws as the reference takes
