"""The TVM backend's kernels on their own: exact integer GEMMs (long reductions, signs, padding), the operand
packers, the quantize and dequantize kernels against the reference quantizer, serial and parallel forms."""

from __future__ import annotations

import pytest
import torch

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops.backend import get_backend
from fraccompile.ops.modules import FracOp
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


# the GEMM operands' code dtypes: every combination of signs
SIGNS = [
    (torch.uint8, torch.int8),
    (torch.int8, torch.int8),
    (torch.uint8, torch.uint8),
    (torch.int8, torch.uint8),
]


def _codes(shape, dtype, gen):
    lo, hi = (0, 256) if dtype == torch.uint8 else (-127, 128)
    return torch.randint(lo, hi, shape, generator=gen).to(dtype)


@pytest.mark.parametrize(
    "g,m,n,k",
    [(1, 1, 1, 1), (1, 7, 5, 3), (2, 37, 50, 23), (3, 64, 48, 96), (1, 130, 17, 257), (4, 5, 33, 1000)],
)
@pytest.mark.parametrize("a_dtype,b_dtype", SIGNS)
def test_gemm_is_exact(tvm_backend, g, m, n, k, a_dtype, b_dtype):
    gen = torch.Generator().manual_seed(g * 1000 + m + n + k)
    a, b = _codes((g, m, k), a_dtype, gen), _codes((g, n, k), b_dtype, gen)
    got = tvm_backend.gemm(a, b)
    assert got.dtype in (torch.int32, torch.int64)
    assert torch.equal(got.long(), a.long() @ b.long().mT)


@pytest.mark.parametrize("g,m,n,k", [(1, 7, 5, 3), (2, 37, 50, 23), (1, 130, 17, 257)])
@pytest.mark.parametrize("a_dtype,b_dtype", SIGNS)
@pytest.mark.parametrize("per_column,bias", [(False, False), (True, True)])
def test_gemm_f32_dequantizes_the_exact_product(tvm_backend, g, m, n, k, a_dtype, b_dtype, per_column, bias):
    """The fused epilogue (sign corrections, scale per column, bias) against the exact product
    in float64: within fp32 rounding, for every sign combination (the ones rows and columns)."""
    gen = torch.Generator().manual_seed(g + m + n + k)
    a, b = _codes((g, m, k), a_dtype, gen), _codes((g, n, k), b_dtype, gen)
    scale = torch.rand(n if per_column else 1, generator=gen) + 0.5
    bias_t = torch.randn(n, generator=gen) * 100 if bias else None
    got = tvm_backend.gemm_f32(a, b, scale, bias_t)
    want = (a.long() @ b.long().mT).double() * scale.double()
    if bias:
        want += bias_t.double()
    assert got.dtype == torch.float32 and got.shape == (g, m, n)
    assert ((got.double() - want).abs() <= 2e-7 * want.abs() + 1e-4).all()
    out = torch.empty(g, m, n)
    assert tvm_backend.gemm_f32(a, b, scale, bias_t, out=out) is out and torch.equal(out, got)


@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.uint8, torch.int8), (torch.int8, torch.uint8)])
@pytest.mark.parametrize("split", [False, True])
def test_gemm_f32_adds_a_rank_one_term_in_the_epilogue(tvm_backend, monkeypatch, a_dtype, b_dtype, split):
    """``row_term`` (an ``sbm`` weight zero point's ``p[m]·t[n]``) in the dequantize pass: the
    TVM ``dequant_rank1`` kernel, or torch's epilogue where K is split; within fp32 rounding of
    the float64 result, and nothing else added when it is absent."""
    from fraccompile.targets.backend import gemm_runtime

    if split:
        monkeypatch.setattr(gemm_runtime, "MAX_K", 64)
    gen = torch.Generator().manual_seed(5)
    g, m, n, k = 2, 37, 50, 150
    a, b = _codes((g, m, k), a_dtype, gen), _codes((g, n, k), b_dtype, gen)
    scale, bias = torch.rand(n, generator=gen) + 0.5, torch.randn(n, generator=gen) * 10
    p, t = torch.randn(g, m, generator=gen) * 100, torch.randn(n, generator=gen)
    got = tvm_backend.gemm_f32(a, b, scale, bias, row_term=(p, t))
    plain = tvm_backend.gemm_f32(a, b, scale, bias)
    exact = (a.long() @ b.long().mT).double() * scale.double() + bias.double()
    want = exact + p.double().unsqueeze(-1) * t.double()
    assert ((got.double() - want).abs() <= 1e-6 * exact.abs() + 1e-4).all()
    assert ((plain.double() - exact).abs() <= 1e-6 * exact.abs() + 1e-4).all()


@pytest.mark.parametrize(
    "g,m,n,k", [(1, 8, 32, 40), (2, 12, 64, 100), (3, 3, 16, 7), (1, 64, 48, 1000), (2, 64, 32, 50)]
)
@pytest.mark.parametrize("a_dtype,b_dtype", SIGNS)
@pytest.mark.parametrize("row_term,transposed", [(False, False), (True, False), (True, True)])
def test_gemm_with_the_dequantize_in_its_write_back_is_bit_identical(
    tvm_backend, monkeypatch, g, m, n, k, a_dtype, b_dtype, row_term, transposed
):
    """Where the tile pads no column, ``gemm_f32`` on a VNNI host is one ``gemm_dq`` kernel (sign
    corrections from the operands' row sums, not ones rows; padded rows dropped): the same bits as
    the GEMM then the dequantize pass, for every sign combination, with a rank-one term, on
    transposed views. Padded columns, and several groups with padded rows or transposed operands,
    keep the two passes."""
    from fraccompile.targets.backend import gemm_runtime

    gen = torch.Generator().manual_seed(g * 7 + m + n + k)
    if transposed:
        a, b = _codes((g, k, m), a_dtype, gen).mT, _codes((g, k, n), b_dtype, gen).mT
    else:
        a, b = _codes((g, m, k), a_dtype, gen), _codes((g, n, k), b_dtype, gen)
    scale, bias = torch.rand(n, generator=gen) + 0.5, torch.randn(n, generator=gen) * 10
    term = (torch.randn(g, m, generator=gen) * 100, torch.randn(n, generator=gen)) if row_term else None
    kinds = []
    kernel = type(tvm_backend).kernel
    monkeypatch.setattr(
        type(tvm_backend), "kernel", lambda self, ref: kinds.append(ref.kind) or kernel(self, ref)
    )
    got = tvm_backend.gemm_f32(a, b, scale, bias, row_term=term)
    ones_row = a_dtype == torch.int8 and g == 1  # one group, signed A: the problem with a row more
    padded_rows = tvm_backend.kernels.gemm_shape(g, m + ones_row, n, k).m != m
    sums = a_dtype == torch.int8 or b_dtype == torch.uint8  # sign corrections: an operand's row sums
    fused = tvm_backend._vnni and not (g > 1 and (transposed and sums or padded_rows))  # a copy, strided rows
    assert ("gemm_dq" in kinds) == fused and ("dequant" in kinds) != fused
    monkeypatch.setattr(gemm_runtime.IntegerGemms, "_gemm_dq", lambda self, *args: None)
    assert torch.equal(got, tvm_backend.gemm_f32(a, b, scale, bias, row_term=term))
    exact = (a.long() @ b.long().mT).double() * scale.double() + bias.double()
    want = exact + (term[0].double().unsqueeze(-1) * term[1].double() if row_term else 0)
    assert ((got.double() - want).abs() <= 1e-6 * exact.abs() + 1e-4).all()
    monkeypatch.undo()
    kinds.clear()
    monkeypatch.setattr(
        type(tvm_backend), "kernel", lambda self, ref: kinds.append(ref.kind) or kernel(self, ref)
    )
    tvm_backend.gemm_f32(a, _codes((g, n + 1, k), b_dtype, gen), scale[:1])  # n + 1 pads the tile
    assert "gemm_dq" not in kinds and "dequant" in kinds


def test_gemm_non_contiguous_operands(tvm_backend):
    gen = torch.Generator().manual_seed(1)
    a = _codes((2, 40, 30), torch.int8, gen)
    b = _codes((2, 40, 24), torch.uint8, gen)
    got = tvm_backend.gemm(a.mT, b.mT)  # (2, 30, 40) x (2, 24, 40)
    assert torch.equal(got.long(), a.mT.long() @ b.long())


def test_gemm_splits_long_reductions(tvm_backend, monkeypatch):
    from fraccompile.targets.backend import gemm_runtime

    monkeypatch.setattr(gemm_runtime, "MAX_K", 64)  # exercise the int32-safe split with a small K
    gen = torch.Generator().manual_seed(2)
    a, b = _codes((1, 9, 200), torch.uint8, gen), _codes((1, 20, 200), torch.int8, gen)
    got = tvm_backend.gemm(a, b)
    assert got.dtype == torch.int64
    assert torch.equal(got, a.long() @ b.long().mT)


def test_unsigned_by_unsigned_sums_past_int32_are_exact(tvm_backend):
    """255·255·40000 > 2**31: two unsigned operands split K earlier than signed ones."""
    a = torch.full((1, 3, 40_000), 255, dtype=torch.uint8)
    b = torch.full((1, 2, 40_000), 255, dtype=torch.uint8)
    got = tvm_backend.gemm(a, b)
    assert torch.equal(got.long(), a.long() @ b.long().mT)


@pytest.mark.parametrize("layout", ["mk", "km"])
@pytest.mark.parametrize(
    "G,M,K,Mp,Kp",
    [
        (1, 70, 130, 72, 132),
        (2, 64, 64, 64, 64),
        (3, 5, 7, 8, 12),
        (1, 96, 200, 97, 200),
        (1, 33, 65, 34, 128),
    ],
)
@pytest.mark.parametrize("flip", [0, 128])
def test_pack_a_layouts_padding_and_ones_row(layout, G, M, K, Mp, Kp, flip):
    """The A pack against torch: inner tiles and rows (vector code), edges and the padding
    (scalar code), the ones row at M, the sign flip."""
    from fraccompile.targets.kernels import pack

    src = torch.randint(0, 256, (G, M, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(M * K))
    ref = torch.zeros((G, Mp, Kp), dtype=torch.uint8)
    ref[:, :M, :K] = src ^ flip
    if Mp > M:
        ref[:, M, :K] = 1
    out = torch.full((G, Mp, Kp), 7, dtype=torch.uint8)  # every byte must be written
    stored = src if layout == "mk" else src.mT.contiguous()
    pack.a_kernel(layout)(stored, torch.tensor([flip], dtype=torch.uint8), out)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize(
    "G,N,K,NB,KB", [(1, 64, 128, 4, 32), (2, 37, 70, 3, 18), (1, 48, 64, 4, 17), (3, 5, 7, 1, 2)]
)
@pytest.mark.parametrize("flip", [0, 128])
def test_pack_b_layouts_padding_and_ones_row(layout, G, N, K, NB, KB, flip):
    """The B pack (16x4 blocks) against torch: inner blocks, edge blocks, the ones row at N."""
    from fraccompile.targets.kernels import pack

    src = torch.randint(0, 256, (G, N, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(N * K))
    full = torch.zeros((G, NB * 16, KB * 4), dtype=torch.uint8)
    full[:, :N, :K] = src ^ flip
    if NB * 16 > N:
        full[:, N, :K] = 1
    ref = full.view(G, NB, 16, KB, 4).permute(0, 1, 3, 2, 4)
    out = torch.full((G, NB, KB, 16, 4), 7, dtype=torch.uint8)  # every byte must be written
    stored = src if layout == "nk" else src.mT.contiguous()
    pack.b_kernel(layout)(stored, torch.tensor([flip], dtype=torch.uint8), out)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "geometry",
    [
        # N, H, W, C, OC, (kh, kw), stride, padding, dilation
        (2, 9, 7, 16, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
        (3, 11, 10, 5, 8, (3, 3), (2, 2), (2, 2), (2, 2)),
        (2, 6, 8, 3, 8, (3, 1), (1, 2), (2, 0), (1, 1)),
        (1, 5, 5, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1)),
        (2, 5, 4, 4, 8, (5, 5), (1, 1), (0, 3), (1, 1)),  # a kernel wider than the image
    ],
)
@pytest.mark.parametrize("flip", [0, 128])
def test_conv_a_pack_equals_im2col_then_pack(geometry, flip):
    """The forward's conv A pack (channels-last codes -> padded, flipped im2col rows, ones row at
    M) gives the bytes of the im2col copy followed by the A pack, for every padding of M and K."""
    import torch.nn as nn

    from fraccompile.targets.backend import gemm_runtime as B
    from fraccompile.targets.backend import roles
    from fraccompile.targets.runtime.library import KernelRef

    N, H, W, C, OC, ks, stride, padding, dilation = geometry
    conv = nn.Conv2d(C, OC, ks, stride=stride, padding=padding, dilation=dilation)
    fm = fraccompile.compile(
        nn.Sequential(conv), torch.randn(N, C, H, W), FracConfig(scheme="symmetric", full_precision=())
    )
    (op,) = [m for m in fm.modules() if isinstance(m, FracOp)]
    gen = torch.Generator().manual_seed(sum(geometry[:4]))
    xl = torch.randint(0, 256, (N, H, W, C), dtype=torch.uint8, generator=gen)
    w_shape = tuple(conv.weight.shape)
    cols, out_sp = roles._im2col(xl.permute(0, 3, 1, 2), op.spec, w_shape)
    M, K = cols.shape[1:]
    geo = B._conv2d_geometry(op.spec, xl, w_shape)
    kernel = get_backend("tvm").kernel
    for mp, kp in ((M, K + (-K) % 4), (M + 1, K + (-K) % 32), (M + 7, K + 64)):
        got = torch.empty(1, mp, kp, dtype=torch.uint8)
        kernel(KernelRef("pack_conv_a", (*geo, mp, kp)))(xl.reshape(-1), B._flip(flip), got.view(-1))
        assert torch.equal(got, B._pack_a(cols, flip, mp, kp, kernel)), (mp, kp)


def test_serial_kernels_equal_the_parallel_ones(monkeypatch):
    """The memory-bound kernels' serial forms (below PARALLEL_MIN_BYTES on TVM's thread pool)
    compute the same bytes as their parallel forms; GEMMs have no serial form; on torch's OpenMP
    threads every kernel runs parallel."""
    from fraccompile.ops.quantizers import qparams_from_range
    from fraccompile.targets import backend as B
    from fraccompile.targets.backend import codes
    from fraccompile.targets.runtime import threads
    from fraccompile.targets.runtime.library import KernelRef

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 37, 5, 21, generator=gen).contiguous(memory_format=torch.channels_last)
    qp = qparams_from_range(x.min(), x.max(), 8, "symmetric")
    a = torch.randint(-127, 128, (2, 37, 70), dtype=torch.int8, generator=gen)
    b = torch.randint(0, 256, (2, 50, 70), dtype=torch.uint8, generator=gen)
    scale, bias = torch.rand(50, generator=gen), torch.randn(50, generator=gen)
    backend = get_backend("tvm")
    results, kinds = {}, []

    def record(ref):
        kinds.append((ref.kind, ref.serial))
        return backend.kernels.get(ref)

    def run():
        torch.manual_seed(0)
        return [
            B._to_codes(x, qp, stochastic=True, noise=n, kernel=record).codes for n in ("torch", "counter")
        ] + [
            backend.gemm_f32(a, b, scale, bias),
            backend.gemm_f32(a.mT.contiguous().mT, b, scale),
            backend._dequantize_codes(B.IntCodes(a, scale[:1], True), "eb").clone(),
        ]

    monkeypatch.setattr(B.TVMBackend, "kernel", lambda self, ref: record(ref))
    for openmp, threshold in ((False, 0), (False, 1 << 40), (True, 1 << 40)):
        monkeypatch.setattr(threads, "on_openmp", lambda openmp=openmp: openmp)
        monkeypatch.setattr(codes, "PARALLEL_MIN_BYTES", threshold)
        kinds.clear()
        results[openmp, threshold] = run()
        assert {s for k, s in kinds if k != "gemm"} == {threshold > 0 and not openmp}
        assert {s for k, s in kinds if k == "gemm"} == {False}
    assert all(torch.equal(p, q) for p, q in zip(results[False, 0], results[False, 1 << 40]))
    with pytest.raises(ValueError, match="serial"):
        KernelRef("gemm", (1, 6, 64, 32, 6, 4, 32), serial=True)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((3, 5, 7, 11), True), ((3, 5, 7, 11), False), ((2, 16, 33, 40), True), ((4099,), False)],
)
def test_codes_dequantize_kernel_is_the_reference(tvm_backend, dtype, shape, channels_last):
    """The one-pass TVM dequantize of codes (EB's fp32 input) equals ``IntCodes.dequantize``
    (torch's promotion and multiply) bit for bit, in either layout, with a tail past the
    kernel's 4096-element blocks, and keeps the codes' layout."""
    from fraccompile.targets.backend import IntCodes

    gen = torch.Generator().manual_seed(3)
    lo, hi = (-127, 128) if dtype == torch.int8 else (0, 256)
    q = torch.randint(lo, hi, shape, dtype=dtype, generator=gen)
    if channels_last:
        q = q.contiguous(memory_format=torch.channels_last)
    codes = IntCodes(q, torch.tensor(0.0123), dtype == torch.int8)
    got = tvm_backend._dequantize_codes(codes, "eb")
    assert torch.equal(got, codes.dequantize()) and got.stride() == q.stride()
    # sbm: a zero point and a code offset (centered codes), within one rounding of the reference
    asym = IntCodes(q, torch.tensor(0.0123), True, torch.tensor(-0.71), 255.0, 128)
    got = tvm_backend._dequantize_codes(asym, "eb")
    want = asym.dequantize()
    assert got.stride() == q.stride()
    assert ((got - want).abs() <= 2 * torch.finfo(torch.float32).eps * want.abs() + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize(
    "shape,channels_last", [((6, 5, 3, 3), False), ((4, 16, 9, 11), True), ((7, 131), False)]
)
def test_row_grid_dequantize_kernel_is_the_reference(tvm_backend, monkeypatch, dtype, shape, channels_last):
    """Codes with one grid per row of dim 0 (a weight's output channels, a routed gradient's
    samples) dequantized by ``dequant_rows`` in one pass: bit for bit without a zero point,
    within one rounding with one (a zero point per row, or one shared, and an offset)."""
    from fraccompile.targets.backend import IntCodes

    gen = torch.Generator().manual_seed(8)
    lo, hi = (-127, 128) if dtype == torch.int8 else (0, 256)
    q = torch.randint(lo, hi, shape, dtype=dtype, generator=gen)
    if channels_last:
        q = q.contiguous(memory_format=torch.channels_last)
    rows = (shape[0],) + (1,) * (len(shape) - 1)
    scale = torch.rand(rows, generator=gen) * 0.1 + 1e-3
    kinds = []
    kernel = tvm_backend.kernel
    monkeypatch.setattr(type(tvm_backend), "kernel", lambda self, ref: kinds.append(ref.kind) or kernel(ref))
    codes = IntCodes(q, scale, dtype == torch.int8)
    got = tvm_backend._dequantize_codes(codes, "w")
    assert kinds == ["dequant_rows"] and got.stride() == q.stride()
    assert torch.equal(got, codes.dequantize())
    eps = torch.finfo(torch.float32).eps
    for zero, offset in ((torch.randn(rows, generator=gen), 0), (torch.tensor(-0.71), 128)):
        asym = IntCodes(q, scale, True, zero, 255.0, offset)
        got, want = tvm_backend._dequantize_codes(asym, "w"), asym.dequantize()
        assert ((got - want).abs() <= 2 * eps * want.abs() + 1e-7).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_centered_per_sample_codes_are_exact_int8(channels_last):
    """Unsigned ``sbm`` codes with a grid per sample (a routed site's 3-, 4- and 8-bit samples)
    centered into int8 in one uint8 pass: ``codes - (qmax + 1) / 2`` exactly, the same values."""
    from fraccompile.targets.backend.codes import IntCodes, centered

    gen = torch.Generator().manual_seed(2)
    qmax = torch.tensor([7.0, 15.0, 255.0, 15.0]).reshape(4, 1, 1, 1)
    q = (torch.rand(4, 6, 5, 3, generator=gen) * (qmax + 1)).floor().clamp(max=qmax).to(torch.uint8)
    q[:, 0, 0, 0] = qmax.reshape(-1).to(torch.uint8)  # each sample's top code
    q[:, 0, 0, 1] = 0
    if channels_last:
        q = q.contiguous(memory_format=torch.channels_last)
    scale = torch.rand(4, 1, 1, 1, generator=gen) + 0.1
    codes = IntCodes(q, scale, False, torch.tensor(-0.4), qmax)
    got = centered(codes)
    m = (qmax + 1) / 2
    assert got.codes.dtype == torch.int8 and got.signed
    assert torch.equal(got.codes.long(), q.long() - m.long())
    assert torch.allclose(got.dequantize(), codes.dequantize(), rtol=1e-5, atol=1e-4)  # (the zero rounds)


def test_kernel_without_vnni_is_exact():
    """The generic (AVX2-only) schedule builds and computes the same products."""
    from fraccompile.targets.kernels import gemm

    shape = gemm.padded(2, 13, 40, 36)
    host = gemm.detect()
    lib = gemm.tvm.compile(gemm.schedule(shape, "avx2").mod, target=host.target())
    gen = torch.Generator().manual_seed(3)
    A = _codes((2, shape.m, shape.k), torch.uint8, gen)
    B = _codes((2, shape.n, shape.k), torch.int8, gen)
    Bp = B.view(2, shape.n // 16, 16, shape.k // 4, 4).permute(0, 1, 3, 2, 4).contiguous()
    C = torch.empty(2, shape.m, shape.n, dtype=torch.int32)
    lib["main"](A, Bp, C)
    assert torch.equal(C.long(), A.long() @ B.long().mT)


@pytest.mark.parametrize("stochastic,noise", [(False, "torch"), (True, "torch"), (True, "counter")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 37, 3, 21)])
def test_fused_quantize_gives_the_reference_codes(stochastic, noise, layout, shape):
    """Counter noise: the kernel computes it per element from the logical index (16-lane vectors
    and scalar tails: 9, 21 and 37 elements per row)."""
    from fraccompile.ops.quantizers import qparams_from_range, quantize_to_int
    from fraccompile.targets.backend import _to_codes

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen)
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 2.5])  # ties: round half to even
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2]
    for signed in (True, False):
        xs = x if signed else x.clamp_min(0)
        qp = qparams_from_range(xs.min(), xs.max(), 8, "symmetric")
        torch.manual_seed(9)
        ref = quantize_to_int(xs, qp, stochastic=stochastic, noise=noise)
        torch.manual_seed(9)
        got = _to_codes(xs, qp, stochastic=stochastic, noise=noise)
        assert got.codes.dtype == (torch.int8 if signed else torch.uint8)
        assert torch.equal(got.codes.float(), ref)
    # sbm: (x - zero) / scale in the kernel, codes stored centered (minus the grid's middle)
    for bits in (8, 6, 3):
        qp = qparams_from_range(x.min(), x.max(), bits, "sbm")
        torch.manual_seed(9)
        ref = quantize_to_int(x, qp, stochastic=stochastic, noise=noise)
        torch.manual_seed(9)
        got = _to_codes(x, qp, stochastic=stochastic, noise=noise, asymmetric=True)
        # (a strided view is copied once and quantized by the kernel too)
        assert got.codes.dtype == torch.int8 and got.offset == 2 ** (bits - 1)
        assert torch.equal(got.codes.float() + got.offset, ref)
        assert torch.equal(got.dequantize(), torch.addcmul(qp.zero, ref, qp.scale))


def _weight_grid_codes_match(w, range_of, kind: str, scheme: str) -> None:
    """``w``'s codes on the grids ``range_of`` gives it, at 8, 4 and 3 bits, with and without
    values on ties (half to even): one call of the ``kind`` kernel each, the reference's codes,
    not centered."""
    from fraccompile.ops.quantizers import qparams_from_range, quantize_to_int
    from fraccompile.targets.backend import codes

    refs = []

    def record(ref):
        refs.append(ref.kind)
        return codes._jit_kernel(ref)

    for bits in (8, 4, 3):
        lo, hi = range_of(w)
        qp = qparams_from_range(lo, hi, bits, scheme, signed=True)
        w_ties = torch.where(
            torch.arange(w.numel()).reshape(w.shape) % 7 == 0,
            (torch.round(w / qp.scale) + 0.5) * qp.scale + qp.zero,
            w,
        )
        for x in (w, w_ties):
            refs.clear()
            got = codes._to_codes(x, qp, kernel=record, asymmetric=scheme == "sbm")
            assert refs == [kind]
            assert got.codes.dtype == (torch.int8 if scheme == "symmetric" else torch.uint8)
            assert torch.equal(got.codes.float(), quantize_to_int(x, qp))
            assert got.offset == 0 and got.scale is qp.scale


@pytest.mark.parametrize("scheme", ["symmetric", "sbm"])
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 70), (4, 131)])
def test_per_channel_weight_codes_are_one_kernel_pass_with_the_reference_codes(scheme, shape):
    """A weight's per-output-channel grid (every weight's forward grid) runs the per-row
    quantize kernel instead of torch's five passes; the codes are the reference's, ties (half to
    even) and a constant channel (the scale's floor) included."""
    from fraccompile.ops.quantizers import qparams_from_range, quantize_to_int, weight_range
    from fraccompile.targets.backend import codes

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(*shape, generator=gen) * torch.linspace(0.1, 3.0, shape[0]).reshape(
        -1, *[1] * (len(shape) - 1)
    )
    w[1] = 0.25  # a constant channel
    _weight_grid_codes_match(w, weight_range, "quantize_rows", scheme)
    refs = []

    def record(ref):
        refs.append(ref.kind)
        return codes._jit_kernel(ref)

    # a layout the kernel cannot read (not contiguous): torch's quantizer, the same codes
    lo, hi = weight_range(w)
    qp = qparams_from_range(lo, hi, 8, scheme, signed=True)
    strided = w.transpose(0, -1).contiguous().transpose(0, -1)
    refs.clear()
    got = codes._to_codes(strided, qp, kernel=record, asymmetric=scheme == "sbm")
    assert "quantize_rows" not in refs
    assert torch.equal(got.codes.float(), quantize_to_int(w, qp))


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize("shape", [(20, 200), (7, 64), (3, 5)])
def test_per_input_channel_weight_codes_are_one_kernel_pass_with_the_reference_codes(scheme, shape):
    """A linear weight's per-input-channel grid (``weight_scale="gemm"``'s error backprop) runs
    the per-column quantize kernel instead of torch's five passes; the codes are the reference's,
    ties (half to even) and a constant column included, over column counts on and off the
    kernel's 64-wide vectors. A conv weight (4-D) keeps torch's quantizer, the same codes."""
    from fraccompile.ops.quantizers import input_channel_range, qparams_from_range, quantize_to_int
    from fraccompile.targets.backend import codes

    gen = torch.Generator().manual_seed(12)
    w = torch.randn(*shape, generator=gen) * torch.linspace(0.1, 3.0, shape[1])
    w[:, 1] = 0.25  # a constant input channel
    _weight_grid_codes_match(w, input_channel_range, "quantize_cols", scheme)
    refs = []

    def record(ref):
        refs.append(ref.kind)
        return codes._jit_kernel(ref)

    conv = torch.randn(6, 4, 3, 3, generator=gen)
    lo, hi = input_channel_range(conv)
    qp = qparams_from_range(lo, hi, 8, scheme, signed=True)
    refs.clear()
    got = codes._to_codes(conv, qp, kernel=record, asymmetric=scheme == "sbm")
    assert "quantize_cols" not in refs
    assert torch.equal(got.codes.float(), quantize_to_int(conv, qp))


def test_bad_tile_is_refused():
    from fraccompile.targets.kernels import gemm

    with pytest.raises(ValueError, match="bad tile"):
        gemm.Tile(mb=4, nb=2, kb=6)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (128, 64), (5, 129), (300, 1000)])
@pytest.mark.parametrize("serial", [False, True])
def test_code_sums_kernel_is_exact(dtype, shape, serial):
    """The column sums of byte codes (whole 64-lane blocks and the scalar tail) equal torch's
    int64 sums, at the extreme codes too."""
    from fraccompile.targets.runtime.library import JitKernels, KernelRef

    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    q = _codes(shape, dtype, gen)
    q[0] = 255 if dtype == torch.uint8 else -128
    out = torch.full((shape[1],), -1, dtype=torch.int32)
    name = "uint8" if dtype == torch.uint8 else "int8"
    JitKernels().get(KernelRef("code_sums", (name,), serial=serial))(q, out)
    assert torch.equal(out.long(), q.long().sum(0))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize(
    "shape,serial",
    [
        ((0, 16), False),
        ((1, 1), False),
        ((63, 3), True),
        ((130, 16), False),
        ((130, 16), True),
        ((65, 27), False),
        ((7, 1024), False),
        ((9, 2048), True),
        ((3, 2500), False),
    ],
)
def test_row_sums_kernel_is_exact(dtype, shape, serial):
    """The row sums of byte codes (a row length fixed per kernel: one unrolled chunk, whole
    chunks, chunks and a rest; blocks of rows with a partial last block) equal torch's int64 sums
    as fp32, at the extreme codes too."""
    from fraccompile.targets.runtime.library import JitKernels, KernelRef

    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    q = _codes(shape, dtype, gen)
    if shape[0]:
        q[0] = 255 if dtype == torch.uint8 else -128
    out = torch.full((shape[0],), -1.0)
    name = "uint8" if dtype == torch.uint8 else "int8"
    JitKernels().get(KernelRef("row_sums", (name, shape[1]), serial=serial))(q, out)
    assert torch.equal(out.long(), q.long().sum(1))


@pytest.mark.parametrize(
    "n, serial", [(1, False), (63, True), (16384, False), (2 * 16384 + 65, False), (5000, True)]
)
def test_mask_grad_kernel_is_threshold_backward(n, serial):
    """MaskedReLU's backward kernel: ``dy`` where the mask is set, +0.0 elsewhere, bit for bit
    threshold_backward's (NaN, infinities and -0.0 of ``dy`` included), over whole parallel
    blocks, vectors and a scalar rest."""
    from fraccompile.targets.runtime.library import JitKernels, KernelRef

    gen = torch.Generator().manual_seed(n)
    dy = torch.randn(n, generator=gen)
    dy[: min(n, 4)] = torch.tensor([float("nan"), -0.0, float("-inf"), float("inf")])[: min(n, 4)]
    mask = (torch.rand(n, generator=gen) > 0.5).to(torch.uint8)
    mask[: min(n, 2)] = 1
    out = torch.full((n,), 7.0)
    JitKernels().get(KernelRef("mask_grad", (), serial=serial))(dy, mask, out)
    ref = torch.ops.aten.threshold_backward(dy, mask.float(), 0)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize(
    "hw, c, pad, flip", [((9, 12), 16, (1, 1), 128), ((8, 8), 32, (1, 2), 0), ((5, 7), 4, (0, 0), 128)]
)
def test_padded_planes_kernel_equals_the_torch_copy(monkeypatch, tvm_backend, hw, c, pad, flip):
    """A weight gradient's padded input planes from channels-last codes (``pad_planes``: one
    transposing kernel pass) hold exactly what torch's strided copy and XOR write, border
    included; a source that is not channels-last takes torch's route."""
    from fraccompile.targets.backend.tvm_backend import TVMBackend

    kinds = []
    kernel = TVMBackend.kernel
    monkeypatch.setattr(TVMBackend, "kernel", lambda self, ref: kinds.append(ref.kind) or kernel(self, ref))
    gen = torch.Generator().manual_seed(c)
    (H, W), (ph, pw) = hw, pad
    nhwc = _codes((3, H, W, c), torch.uint8, gen)
    shape = (3, c, H + 2 * ph, W + 2 * pw)
    expect = torch.full(shape, flip, dtype=torch.uint8)
    expect[:, :, ph : ph + H, pw : pw + W] = nhwc.permute(0, 3, 1, 2) ^ flip
    got = tvm_backend._padded_codes("xt", shape, 2, pad, nhwc.permute(0, 3, 1, 2), flip).clone()
    assert torch.equal(got, expect) and kinds == ["pad_planes"]
    kinds.clear()
    # junk in the interior the torch route must overwrite (the border stays valid)
    tvm_backend.scratch("xt", shape, torch.uint8)[:, :, ph : ph + H, pw : pw + W].fill_(0x55)
    dense = tvm_backend._padded_codes("xt", shape, 2, pad, nhwc.permute(0, 3, 1, 2).contiguous(), flip)
    assert torch.equal(dense, expect) and kinds == []


def test_row_sums_kernel_refuses_rows_past_its_bound():
    from fraccompile.targets.kernels import sums

    with pytest.raises(ValueError, match="rows of 1 to 16384"):
        sums.row_definition("uint8", sums.MAX_ROW_LENGTH + 1)
    with pytest.raises(ValueError, match="one of"):
        sums.row_definition("int16", 16)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dims", [[0], [1], [0, 2, 3], [2, 3]])
def test_exact_sums_with_the_kernel_equal_torch(monkeypatch, dtype, layout, dims):
    """``_exact_sums`` gives torch's exact sums whichever path a layout takes (the column-sum
    kernel where the summed dims are outermost, and the
    kernel's row chunks (past int32's bound) add up exactly; the row-sum kernel otherwise)."""
    from fraccompile.targets.backend import affine

    backend = get_backend("tvm")
    gen = torch.Generator().manual_seed(len(dims))
    lo, hi = {torch.int8: (-128, 128), torch.uint8: (0, 256), torch.int32: (-4095, 4096)}[dtype]
    codes = torch.randint(lo, hi, (6, 5, 4, 3), generator=gen).to(dtype)
    if layout == "channels_last":
        codes = codes.contiguous(memory_format=torch.channels_last)
    want = codes.long().sum(dims)
    calls = []

    def kernel(ref):
        calls.append(ref.kind)
        return backend.kernel(ref)

    got = affine._exact_sums(codes, dims, torch.float64, kernel)
    assert torch.equal(got.long(), want)
    monkeypatch.setattr(affine, "MAX_SUM_ROWS", 4)  # several row chunks
    assert torch.equal(affine._exact_sums(codes, dims, torch.float64, kernel).long(), want)
    outermost = dims == [0] or (dims == [0, 2, 3] and layout == "channels_last")
    if dtype == torch.int32:
        assert calls == []
    else:  # byte codes: the column sums kernel, else the row sums kernel (after a copy where needed)
        assert set(calls) == {"code_sums" if outermost else "row_sums"}


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "k,stride,padding,dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 2, 2, 2), (2, 2, 0, 1)]
)
def test_box_sums_equal_an_all_ones_conv(n, k, stride, padding, dilation):
    """The window sums of the weight zero point's term (separable slice sums) equal a conv with
    all-ones taps per group."""
    from fraccompile.ops.spec import CONV_FNS
    from fraccompile.targets.backend.affine import _box_sums

    gen = torch.Generator().manual_seed(n * 10 + k)
    t = torch.randint(0, 4000, (2, 3, *([9] * n)), generator=gen).float()
    args = ([k] * n, [stride] * n, [padding] * n, [dilation] * n)
    want = CONV_FNS[n](t, torch.ones(3, 1, *args[0]), None, *args[1:], 3)
    assert torch.equal(_box_sums(t, *args), want)


@pytest.mark.parametrize(
    "ks, stride, padding, dilation, size",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1), (7, 6)),
        ((3, 3), (2, 2), (1, 1), (1, 1), (8, 7)),
        ((5, 1), (1, 1), (3, 0), (2, 1), (6, 5)),
        ((1, 1), (2, 1), (0, 0), (1, 1), (5, 4)),
        ((3,), (1,), (2,), (1,), (9,)),
        ((2, 3, 2), (1, 1, 1), (1, 0, 1), (1, 2, 1), (4, 6, 3)),
        ((3, 3), (1, 1), (4, 4), (1, 1), (2, 3)),  # taps that never read inside the image
    ],
)
def test_tap_sums_are_the_per_tap_sums_over_positions(ks, stride, padding, dilation, size):
    """The zero-point terms' per-tap sums (prefix-sum differences, or strided slices with a
    stride) equal the sums taken position by position from their definition, in both forms:
    of the image at the coordinates a tap reads, and of the output map where it reads inside."""
    import itertools

    from fraccompile.ops.spec import SiteSpec
    from fraccompile.targets.backend.affine import _out_sizes, _tap_sums

    n = len(ks)
    spec = SiteSpec.conv(n, stride, padding, dilation)
    w_shape = (2, 3, *ks)
    out_sp = _out_sizes(spec, size, w_shape)
    gen = torch.Generator().manual_seed(sum(size))
    for image in (True, False):
        t = torch.randint(0, 30000, (3, *(size if image else out_sp)), generator=gen).float()
        want = torch.zeros(3, *ks, dtype=torch.float64)
        for tap in itertools.product(*(range(k) for k in ks)):
            for o in itertools.product(*(range(s) for s in out_sp)):
                at = [o[d] * stride[d] + tap[d] * dilation[d] - padding[d] for d in range(n)]
                if all(0 <= at[d] < size[d] for d in range(n)):
                    want[(slice(None), *tap)] += t[(slice(None), *(at if image else o))].double()
        assert torch.equal(_tap_sums(spec, t, size, out_sp, w_shape, image).double(), want), image


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "k,stride,padding,dilation",
    [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 1, 1), (3, 3, 4, 2), (2, 2, 0, 1)],
)
def test_border_slices_cover_exactly_the_positions_with_outside_taps(n, k, stride, padding, dilation):
    """The positions where a conv's border-aware value sums differ from the interior's (some tap
    reads the zero padding): covered once each by the border slices, and nothing else."""
    from fraccompile.ops.spec import CONV_FNS, SiteSpec
    from fraccompile.targets.backend.affine import _border_slices

    size, w_shape = (7,) * n, (2, 3, *([k] * n))
    w = torch.rand(w_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) + 0.1
    args = ([stride] * n, [padding] * n, [dilation] * n)
    values = CONV_FNS[n](torch.ones(1, 3, *size, dtype=torch.float64), w, None, *args, 1)
    interior = w.sum(list(range(1, n + 2))).reshape(1, -1, *[1] * n)
    covered = torch.zeros_like(values)
    for index in _border_slices(SiteSpec.conv(n, *args), size, w_shape):
        covered[index] += 1
    assert covered.max() <= 1
    assert torch.equal((values - interior).abs() > 1e-9, covered > 0)
