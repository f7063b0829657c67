"""Sub-byte storage of what a site keeps for backward on the tvm backend: the pack/unpack kernels
round-trip every code of every grid that fits, in any layout, and a training step with packed codes
keeps fewer bytes and computes what the unpacked one does."""

from __future__ import annotations

import copy

import pytest
import torch

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops.quantizers import qparams_from_range
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(
    tvm_unavailable_reason() is not None, reason=f"TVM unavailable: {tvm_unavailable_reason()}"
)


@pytest.fixture(scope="module")
def kernel():
    from fraccompile.ops.backend import get_backend

    return get_backend("tvm").kernel


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 3, 8, 4096 * 8 + 5, 100_003])
def test_pack_kernel_round_trip_and_layout(kernel, width, n):
    from fraccompile.targets.backend.codes import pack_bytes, unpack_saved

    gen = torch.Generator().manual_seed(n + width)
    lo = -(1 << (width - 1))
    codes = torch.randint(lo, -lo, (n,), generator=gen, dtype=torch.int8)
    packed = pack_bytes(codes, width, -lo, kernel)
    per = 8 // width
    assert packed.data.dtype == torch.uint8 and packed.data.numel() == -(-n // per)
    # the byte layout: code t of byte i in bits t·width .. (t+1)·width - 1, missing codes 0
    u = (codes.to(torch.int32) - lo) & ((1 << width) - 1)
    padded = torch.zeros(packed.data.numel() * per, dtype=torch.int32)
    padded[:n] = u
    expected = (padded.view(-1, per) << (torch.arange(per) * width)).sum(1).to(torch.uint8)
    assert torch.equal(packed.data, expected)
    assert torch.equal(unpack_saved(packed.data, packed.meta(), kernel), codes)


def _grid_codes(scheme: str, bits: int, signed: bool, channels_last: bool, kernel):
    from fraccompile.targets.backend.codes import _to_codes

    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 8, 5, 6, generator=gen)
    if not signed and scheme == "symmetric":
        x = x.relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    lo, hi = torch.aminmax(x)
    qp = qparams_from_range(lo, hi, bits, scheme, signed=signed if scheme == "symmetric" else None)
    return _to_codes(x, qp, asymmetric=scheme == "sbm", kernel=kernel)


@pytest.mark.parametrize("scheme,signed", [("sbm", None), ("symmetric", True), ("symmetric", False)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_saved_codes_round_trip_every_grid(kernel, scheme, signed, bits, channels_last):
    from fraccompile.targets.backend.codes import code_bounds, pack_saved, sub_byte_width, unpack_saved

    if scheme == "symmetric" and signed and bits == 1:
        pytest.skip("a signed symmetric grid needs 2 bits")
    q = _grid_codes(scheme, bits, signed, channels_last, kernel)
    lo, hi = code_bounds(q)
    assert lo <= int(q.codes.min()) and int(q.codes.max()) <= hi
    width = sub_byte_width(q)
    packed = pack_saved(q, kernel)
    if hi - lo + 1 > 16:  # 6- and 8-bit grids stay bytes
        assert width is None and packed is None
        return
    assert width == next(w for w in (1, 2, 4) if hi - lo + 1 <= 1 << w)
    assert packed.data.numel() == -(-q.codes.numel() // (8 // width))
    back = unpack_saved(packed.data, packed.meta(), kernel)
    assert back.dtype == q.codes.dtype and back.stride() == q.codes.stride()
    assert torch.equal(back, q.codes)


def test_no_kernel_provider_keeps_bytes():
    from fraccompile.targets.backend.codes import pack_saved

    q = _grid_codes("sbm", 4, None, False, None)
    assert pack_saved(q, None) is None


def _saved_bytes(model, x, y) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_step_keeps_fewer_bytes_and_same_gradients(bits, monkeypatch):
    """A ResNet step at ``bits``-bit activations keeps its codes and ReLU masks packed: fewer
    saved bytes than the same step with packing switched off, and identical outputs and
    gradients (packing is lossless)."""
    from fraccompile.examples.resnet_cifar import CifarResNet
    from fraccompile.targets.backend import site_gemm

    torch.manual_seed(0)
    base = CifarResNet(8)
    # a batch whose activations outweigh the weights' codes (kept as bytes, two copies with the
    # default weight_scale="gemm"), as in training
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    cfg = FracConfig(a=bits, w=bits, g=8, scheme="sbm", backend="tvm", recompute="norms")

    def step(no_packing: bool):
        if no_packing:
            monkeypatch.setattr(site_gemm, "pack_saved", lambda q, kernel: None)
            monkeypatch.setattr(site_gemm, "pack_bytes", lambda *a: None)
        else:
            monkeypatch.undo()
        model = fraccompile.compile(copy.deepcopy(base), x, cfg)
        torch.manual_seed(1)
        nbytes = _saved_bytes(model, x, y)
        return nbytes, [p.grad.clone() for p in model.parameters()]

    packed_bytes, packed_grads = step(False)
    plain_bytes, plain_grads = step(True)
    assert packed_bytes < plain_bytes * 0.9
    for a, b in zip(packed_grads, plain_grads):
        assert torch.equal(a, b)
