"""The tvm backend's fused gate probe (fraccompile/targets/probe.py) against GateProbe's torch sums:
per sample and candidate, ``Σ dqx·(q_k(x) - qx)``, in any layout of ``x`` and ``dqx``."""

from __future__ import annotations

import pytest
import torch

from fraccompile.ops.contract import GateDecision
from fraccompile.ops.quantizers import qparams_from_range, quantize_activation, quantize_rows
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None,
                                reason=f"TVM unavailable: {tvm_unavailable_reason()}")


def _torch_sums(x, dqx, qx, lo, hi, scheme, candidates):
    dims = list(range(1, x.dim()))
    return torch.stack([(dqx * (quantize_activation(x, b, scheme, lo=lo, hi=hi) - qx)).sum(dims)
                        for b in candidates], 1)


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize("shape,x_layout,g_layout", [
    ((6, 16, 7, 5), "cl", "cl"),     # a channels-last conv input, its gradient alike
    ((6, 16, 7, 5), "cl", "nchw"),   # the gradient in the other layout
    ((6, 3, 9, 9), "nchw", "nchw"),
    ((5, 4, 37), "nchw", "nchw"),    # a linear site's (N, T, C) input: a scalar tail per sample
])
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
    candidates = (3, 4, 4, 6, 8)                      # a repeated candidate, as DFQ's are
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
