"""GateProbe (fraccompile.ops.functions): its docstring's exactness claim, tested directly in float64.

Dense mode runs every candidate k and mixes ``y_i = sum_k onehot_ik * op(q_k(x)_i, w)``, so the gate
gets ``dL/d onehot_ik = <dy_i, y_ik>``. A routed site runs only the chosen candidate; GateProbe
gives the gate ``<dqx_i, q_k(x_i) - qx_i>`` instead, with ``dqx = op^T(dy, w)``. The claim: the two
differ, per sample, by a constant over k (``<dy_i, y_i>``), which a softmax's backward cancels; the
probe is exact when ``dy`` is not quantized. In float64 the tests hold it to 1e-12.
"""

import pytest
import torch
import torch.nn.functional as F

from fraccompile.ops.functions import GateProbe
from fraccompile.ops.quantizers import quantize_activation

CANDIDATES = (2, 3, 4, 6, 8)


def quantize_at(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-sample quantization on the tensor's shared range (what routed sites do)."""
    return quantize_activation(x, bits, "sbm", x.min(), x.max())


OPS = {
    "linear": (lambda x, w: F.linear(x, w), (5, 7), (4, 7)),
    "conv": (lambda x, w: F.conv2d(x, w, padding=1), (5, 3, 6, 6), (4, 3, 3, 3)),
    "matmul": (lambda x, w: x @ w, (5, 4, 7), (7, 3)),
}


def _setup(op_name):
    op, xs, ws = OPS[op_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=gen, dtype=torch.float64)
    w = torch.randn(ws, generator=gen, dtype=torch.float64)
    choice = torch.tensor([0, 4, 2, 1, 3])  # each sample's candidate
    onehot = F.one_hot(choice, len(CANDIDATES)).to(torch.float64)
    dy = torch.randn(op(x, w).shape, generator=gen, dtype=torch.float64)
    return op, x, w, choice, onehot, dy


def _per_sample(t: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    return onehot.reshape(onehot.shape[0], *([1] * (t.dim() - 1)))


def _dense_gate_grad(op, x, w, onehot, dy):
    """dL/d onehot of the dense mixture, L = <dy, y>, by autograd."""
    onehot = onehot.clone().requires_grad_(True)
    y = sum(_per_sample(x, onehot[:, k]) * op(quantize_at(x, bits), w) for k, bits in enumerate(CANDIDATES))
    (y * dy).sum().backward()
    return onehot.grad


def _routed(op, x, w, choice, onehot, dy, quantized=None):
    """The routed site: each sample quantized at its own candidate, through GateProbe."""
    qx = torch.stack([quantize_at(x, CANDIDATES[c])[i] for i, c in enumerate(choice)])
    onehot = onehot.clone().requires_grad_(True)
    x_in = qx.clone().requires_grad_(True)
    if quantized is None:
        probed = GateProbe.apply(x_in, onehot, x, quantize_at, CANDIDATES)
    else:  # an integer backend passes x through and makes the quantized values in backward
        probed = GateProbe.apply(x_in, onehot, x, quantize_at, CANDIDATES, lambda: qx)
    y = op(probed, w)
    (y * dy).sum().backward()
    return probed, x_in.grad, onehot.grad, qx


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_gate_gradient_equals_dense_up_to_a_per_sample_constant(op_name):
    op, x, w, choice, onehot, dy = _setup(op_name)
    dense = _dense_gate_grad(op, x, w, onehot, dy)
    probed, dqx, routed, qx = _routed(op, x, w, choice, onehot, dy)
    # the chosen candidate's own entry is 0 (q_k(x_i) - qx_i = 0); the dense gradient there is
    # <dy_i, y_i>: the constant the two differ by
    chosen = dense.gather(1, choice[:, None])
    assert torch.equal(routed.gather(1, choice[:, None]), torch.zeros_like(chosen))
    torch.testing.assert_close(routed, dense - chosen, rtol=1e-12, atol=1e-12)
    # a non-trivial check: candidates differ, so the gradient does too
    assert (routed.abs() > 1e-6).sum() >= len(choice) * (len(CANDIDATES) - 1) - 1
    # forward is the identity on qx, and dqx passes through to the site input unchanged
    assert torch.equal(probed, qx)
    qx_leaf = qx.clone().requires_grad_(True)
    (op(qx_leaf, w) * dy).sum().backward()
    assert torch.equal(dqx, qx_leaf.grad)


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_softmax_backward_cancels_the_constant(op_name):
    """Through a softmax over the candidates (the gate's head), dense and routed give the gate's
    logits the same gradient."""
    op, x, w, choice, onehot, dy = _setup(op_name)
    dense = _dense_gate_grad(op, x, w, onehot, dy)
    _, _, routed, _ = _routed(op, x, w, choice, onehot, dy)
    logits = torch.randn(onehot.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for g in (dense, routed):
        z = logits.clone().requires_grad_(True)
        (F.softmax(z, 1) * g).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_quantized_callback_gives_the_same_gradient():
    op, x, w, choice, onehot, dy = _setup("linear")
    _, dqx, routed, _ = _routed(op, x, w, choice, onehot, dy)
    _, dqx2, routed2, _ = _routed(op, x, w, choice, onehot, dy, quantized=True)
    assert torch.equal(routed, routed2) and torch.equal(dqx, dqx2)


def test_quantizing_dy_is_the_only_approximation():
    """With a quantized dy (the real error backprop) the probe is exact for the quantized dy:
    dense computed on the same quantized dy agrees to rounding."""
    op, x, w, choice, onehot, dy = _setup("conv")
    dy_q = quantize_activation(dy, 6, "sbm", dy.min(), dy.max())
    dense = _dense_gate_grad(op, x, w, onehot, dy_q)
    _, _, routed, _ = _routed(op, x, w, choice, onehot, dy_q)
    chosen = dense.gather(1, choice[:, None])
    torch.testing.assert_close(routed, dense - chosen, rtol=1e-12, atol=1e-12)
    # ... and against the unquantized dy's dense gradient it is off by the quantization of dy
    exact = _dense_gate_grad(op, x, w, onehot, dy)
    err = (routed - (exact - exact.gather(1, choice[:, None]))).abs().max()
    assert 0 < err < 0.1 * routed.abs().max()
