"""The CUDA quantization kernels (fraccompile.targets.kernels.cuda_quantize), without a GPU.

The generated CUDA C (its IEEE intrinsics, launch geometry, arguments), nvcc's cubins for
sm_80/sm_90 and the PTX's arithmetic; and the kernels run on the CPU in the emulator of
``tests/_cuda_emulator.py`` (one std::thread per CUDA thread): ranges, grids and codes equal to
the reference quantizer's (``fraccompile.ops.quantizers``), bit for bit (the emulated launcher:
``tests/_cuda_quant_helpers.py``).
"""

import ctypes

import pytest
import torch
from _cuda_helpers import elf_arch, needs_nvcc
from _cuda_quant_helpers import EmulatedQuantKernels

from fraccompile.ops.quantizers import (
    channel_range,
    noise_seed,
    qparams_from_range,
    quantize_to_int,
    tensor_range,
)
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))

BITS = [4, 6, 8]


@pytest.fixture(scope="module")
def cq():
    from fraccompile.targets.kernels import cuda_quantize

    return cuda_quantize


@pytest.fixture(scope="module")
def emu(cq, tmp_path_factory):
    return EmulatedQuantKernels(cq, tmp_path_factory.mktemp("emu"))


def not_launched(*args):
    raise AssertionError("launched a kernel for bad input")


def values(shape, seed, nonneg=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0 + 0.25
    x.view(-1)[:: max(1, x.numel() // 7)] = 0.0  # exact zeros (code 0 of a symmetric grid)
    x.view(-1)[1] = 0.5
    return x.abs() if nonneg else x


# -- names, plans, generated source ----------------------------------------------------------------
def test_kernel_variants(cq):
    assert len({k.name for k in cq.KERNELS}) == len(cq.KERNELS) == 13
    assert (
        cq.qparams_kernel("sbm", True)
        == cq.qparams_kernel("sbm", None)
        == cq.QuantKernel("qparams", ("sbm",))
    )
    assert cq.qparams_kernel("symmetric", None).variant == ("symmetric", "auto")
    assert cq.qparams_kernel("symmetric", False).variant == ("symmetric", "unsigned")
    for bad in [
        ("quantize", ("round", "int8")),
        ("quantize", ("nearest", "uint8")),
        ("qparams", ("sbm", "auto")),
    ]:
        with pytest.raises(ValueError):
            cq.QuantKernel(*bad)
    with pytest.raises(ValueError, match="scheme"):
        cq.qparams_kernel("minmax", None)


def test_launch_plans(cq):
    assert (
        cq.range_parts(1, 1000) == 1 and cq.range_parts(1, 10**8) == 1024 and cq.range_parts(4096, 10**6) == 1
    )
    assert cq.range_parts(1, 256 * 8 * 5 + 1) == 6
    (one,) = cq.range_launches(7, 300)
    assert one.grid == (7, 1, 1) and dict(one.scalars) == {"R": 7, "L": 300, "P": 1}
    first, final = cq.range_launches(2, 1000, parts=3)
    assert (
        first.grid == (6, 1, 1)
        and final.grid == (2, 1, 1)
        and dict(final.scalars) == {"R": 2, "L": 6, "P": 1}
    )
    with pytest.raises(ValueError):  # a block with no element
        cq.range_launches(1, 512, parts=3)
    with pytest.raises(ValueError):
        cq.range_launches(1, 1000, parts=cq.MAX_PARTS + 1)
    with pytest.raises(ValueError, match="int32"):
        cq.range_launches(2, 2**30)
    k = cq.QuantKernel("quantize", ("counter_rows", "int8"))
    plan = cq.quantize_launch(k, 6, 1, 37, 3, padded=(8, 64))
    assert plan.grid == (2, 1, 1) and dict(plan.scalars)["Rg"] == 3
    with pytest.raises(ValueError, match="smaller"):
        cq.quantize_launch(k, 6, 1, 37, 1, padded=(8, 32))
    with pytest.raises(ValueError, match="grids"):
        cq.quantize_launch(k, 6, 1, 37, 4)
    with pytest.raises(ValueError, match="broadcast"):
        cq.qparams_launch(cq.qparams_kernel("sbm", None), 3, 2)


def test_generated_source(cq):
    src = cq.generate_source()
    for k in cq.KERNELS:
        low = cq.lower(k)
        assert f"__launch_bounds__(256) {k.name}(" in src and low.source.count("__global__") == 2
    nearest = cq.lower(cq.QuantKernel("quantize", ("nearest", "int8")))
    assert [n for n, _ in nearest.params] == ["grid", "q", "x", "K", "Kp", "R", "Rg", "Rp"]
    assert "nearbyintf(__fdiv_rn(__fsub_rn(x_ptr[" in nearest.source and "floorf" not in nearest.source
    counter = cq.lower(cq.QuantKernel("quantize", ("counter", "int8"))).source
    assert "floorf(__fadd_rn(__fdiv_rn(__fsub_rn(" in counter and "2654435761" in counter  # NOISE_STEP
    assert "rank_ptr" not in counter and "rank_ptr" in cq.generate_source(
        cq.QuantKernel("quantize", ("counter_rows", "int8"))
    )
    sbm = cq.generate_source(cq.qparams_kernel("sbm", None))
    assert "__fsub_rn(__fdiv_rn(minmax_ptr" in sbm and "0x1p-126f" in sbm  # hi/q - lo/q, MIN_SCALE
    partial = cq.generate_source(cq.QuantKernel("range"))
    assert partial.count("__syncthreads()") == 9 and "CUDART_INF_F" in partial


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_cubin(cq, arch):
    needs_nvcc()
    cubin = cq.compile_cubin(arch)
    assert elf_arch(cubin) == int(arch[3:])
    for k in cq.KERNELS:
        assert k.name.encode() in cubin


def test_ptx_arithmetic_is_ieee(cq):
    """nvcc contracts a*b+c into FMAs by default (-fmad=true), and -prec-div=false or fast math
    divide approximately: with the intrinsics the PTX has IEEE divisions, no FMA, and the rint
    and floor conversions."""
    needs_nvcc()
    ptx = cq.compile_ptx("sm_90").decode()
    assert ".target sm_90" in ptx
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx
    assert "cvt.rni.f32.f32" in ptx and "cvt.rmi.f32.f32" in ptx
    assert "fma.rn.f32" not in ptx


# -- ranges and grids, emulated --------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows,length,parts", [(1, 1000, None), (1, 1000, 3), (5, 37, 1), (3, 700, 2), (2, 1, 1)]
)
def test_range_is_aminmax(cq, emu, rows, length, parts):
    x = values((rows, length), rows + length)
    before = len(emu.launched)
    minmax = cq.tensor_minmax(x, rows, emu, parts)
    lo, hi = torch.aminmax(x, dim=1)
    assert torch.equal(minmax, torch.stack([lo, hi], 1))
    grids = [g for _, g in emu.launched[before:]]  # the blocks of each pass
    assert grids == ([rows * parts, rows] if (parts or 1) > 1 else [rows])


def _reference_grid(lo, hi, bits, scheme, signed):
    qp = qparams_from_range(lo, hi, bits, scheme, signed)
    unsigned = qp.qmin == 0
    offset = float(2 ** (bits - 1)) if unsigned else 0.0
    return qp, [qp.scale, qp.zero, torch.tensor(qp.qmin), torch.tensor(qp.qmax), torch.tensor(offset)]


@pytest.mark.parametrize("bits", [2, *BITS])
@pytest.mark.parametrize(
    "scheme,signed", [("sbm", None), ("symmetric", True), ("symmetric", False), ("symmetric", None)]
)
def test_grids_are_qparams_from_range(cq, emu, scheme, signed, bits):
    # rows: mixed signs, non-negative, constant (MIN_SCALE), tiny (below 1e-6), huge (hi - lo overflows)
    lo = torch.tensor([-1.5, 0.0, 2.0, 1e-8, -3e38, 0.25])
    hi = torch.tensor([0.75, 3.3, 2.0, 3e-8, 3e38, 7.0])
    minmax = torch.stack([lo, hi], 1)
    b = torch.tensor([bits], dtype=torch.int32)
    for rows in (slice(None), slice(1, 2), slice(5, 6)):  # per row, and single ranges (signed by data)
        grid = cq.grids(minmax[rows].contiguous(), b, scheme, signed, emu)
        _, want = _reference_grid(lo[rows], hi[rows], bits, scheme, signed)
        for f, w in enumerate(want):
            assert torch.equal(grid[:, f], w.expand(grid.shape[0])), (cq.GRID_FIELDS[f], grid[:, f], w)
    # one shared range, a bit width per row (per-sample grids)
    row_bits = torch.tensor([4, 8, bits, 4], dtype=torch.int32)
    grid = cq.grids(minmax[:1].contiguous(), row_bits, scheme, signed, emu)
    for r, rb in enumerate(row_bits.tolist()):
        _, want = _reference_grid(lo[:1], hi[:1], rb, scheme, signed)
        assert torch.equal(grid[r], torch.stack([w.reshape(()) for w in want]))


# -- codes, emulated -------------------------------------------------------------------------------
def _check_codes(codes, grid, want, pad=None):
    """``codes + offset`` equal the reference's integer codes (fp32), zeros in the padding."""
    rows, k = want.shape
    offset = grid[:, 4].repeat_interleave(rows // grid.shape[0]).unsqueeze(1)
    assert torch.equal(codes[:rows, :k].float() + offset, want)
    if pad is not None:
        assert codes.shape == pad
        assert not codes[rows:].any() and not codes[:, k:].any()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize("rounding", ["nearest", "counter"])
@pytest.mark.parametrize("per_row", [False, True])
def test_codes_are_the_reference_quantizers(cq, emu, scheme, bits, rounding, per_row):
    """Per tensor (activations: signedness from the data, or gradients: signed, stochastic) or per
    output channel (weights: signed); odd sizes that leave partial blocks; a padded destination."""
    x = values((5, 111), bits, nonneg=scheme == "symmetric" and not per_row and bits == 6)
    stochastic = rounding == "counter"
    signed = True if (per_row or stochastic) else None
    lo, hi = channel_range(x) if per_row else tensor_range(x)
    qp = qparams_from_range(lo, hi, bits, scheme, signed)
    gen = torch.Generator().manual_seed(bits)
    want = quantize_to_int(x, qp, stochastic=stochastic, generator=gen, noise="counter")
    minmax = cq.tensor_minmax(x, 5 if per_row else 1, emu, None if per_row else 2)
    grid = cq.grids(minmax, torch.tensor([bits], dtype=torch.int32), scheme, signed, emu)
    seed = noise_seed(torch.Generator().manual_seed(bits)) if stochastic else None
    pad = (8, 128) if bits != 6 else None
    out = torch.full(pad, 77, dtype=torch.int8) if pad else None
    codes = cq.quantize_codes(x, grid, emu, rounding=rounding, seed=seed, out=out)
    assert codes.dtype == torch.int8
    _check_codes(codes, grid, want, pad)
    assert torch.equal(grid[:, 0], qp.scale.reshape(-1).expand(grid.shape[0]))
    if scheme == "symmetric" and signed is None:  # the data decided: non-negative is unsigned
        assert grid[0, 2].item() == (0.0 if bits == 6 else -(2 ** (bits - 1) - 1))


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
def test_ties_round_to_even(cq, emu, scheme):
    """A step of exactly 1 (symmetric: max |x| = 7 on the signed 4-bit grid; sbm: range [0, 15]),
    so ``k + 0.5`` is a tie: rint keeps the even neighbour, as torch.round."""
    ties = [0.5, 1.5, 2.5, 3.5, 6.5]
    x = torch.tensor([[7.0, 0.0, *ties, *(-t for t in ties)]]) if scheme == "symmetric" else None
    if scheme == "sbm":
        x = torch.tensor([[15.0, 0.0, *ties, 13.5, 14.5]])
    lo, hi = tensor_range(x)
    qp = qparams_from_range(lo, hi, 4, scheme, signed=True)
    assert qp.scale.item() == 1.0
    grid = cq.grids(cq.tensor_minmax(x, 1, emu), torch.tensor([4], dtype=torch.int32), scheme, True, emu)
    codes = cq.quantize_codes(x, grid, emu)
    _check_codes(codes, grid, quantize_to_int(x, qp))
    got = codes[0, 2:].float() + grid[0, 4]
    assert torch.equal(got, torch.round(x[0, 2:])) and not (got.long() % 2).any()


def test_torch_noise_and_channels_last_counter_noise(cq, emu):
    x = values((2, 3, 5, 7), 11)
    lo, hi = tensor_range(x)
    for scheme in ("sbm", "symmetric"):
        qp = qparams_from_range(lo, hi, 5, scheme, signed=True)
        grid = cq.grids(cq.tensor_minmax(x, 1, emu), torch.tensor([5], dtype=torch.int32), scheme, True, emu)
        want = quantize_to_int(
            x, qp, stochastic=True, generator=torch.Generator().manual_seed(3), noise="torch"
        )
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
        codes = cq.quantize_codes(x.reshape(2, -1), grid, emu, rounding="torch", u=u.reshape(2, -1))
        _check_codes(codes, grid, want.reshape(2, -1))
        # channels-last: memory order (N, H·W, C), the noise of the logical NCHW index
        xc = x.contiguous(memory_format=torch.channels_last)
        want = quantize_to_int(
            xc, qp, stochastic=True, generator=torch.Generator().manual_seed(4), noise="counter"
        )
        view = xc.permute(0, 2, 3, 1).reshape(2, -1, 3)
        seed = noise_seed(torch.Generator().manual_seed(4))
        codes = cq.quantize_codes(view, grid, emu, rounding="counter", seed=seed)
        _check_codes(codes, grid, want.permute(0, 2, 3, 1).reshape(2, -1))


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_per_sample_grids_are_quantize_rows(cq, emu, scheme, stochastic):
    """A routed site's samples at their own precision (one shared range), as the reference's
    quantize_rows: each precision's samples as one tensor, in ascending order of bits, each with
    its own counter seed; here one pass with a grid, rank and seed per sample, 3 rows each."""
    x = values((6, 3, 13), 21)
    row_bits = torch.tensor([4, 8, 4, 6, 8, 4], dtype=torch.int32)
    lo, hi = tensor_range(x)
    signed = True if stochastic else None
    gen, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = torch.empty(x.shape)
    rank = torch.zeros(6, dtype=torch.int32)
    seeds = torch.zeros(6, dtype=torch.int32)
    for b in torch.unique(row_bits).tolist():  # quantize_rows' loop, returning the codes
        rows = (row_bits == b).nonzero().flatten()
        qp = qparams_from_range(lo, hi, b, scheme, signed)
        want[rows] = quantize_to_int(x[rows], qp, stochastic=stochastic, generator=gen, noise="counter")
        rank[rows] = torch.arange(len(rows), dtype=torch.int32)
        if stochastic:  # the seed the reference drew for this group
            seeds[rows] = noise_seed(replay)
    grid = cq.grids(cq.tensor_minmax(x, 1, emu), row_bits, scheme, signed, emu)
    rounding = "counter_rows" if stochastic else "nearest"
    codes = cq.quantize_codes(
        x.reshape(18, 13), grid, emu, rounding=rounding, seed=seeds, rank=rank, out=None
    )
    _check_codes(codes, grid, want.reshape(18, 13))


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
def test_wide_gradient_codes_int32(cq, emu, scheme):
    x = values((3, 41), 9)
    lo, hi = tensor_range(x)
    qp = qparams_from_range(lo, hi, 12, scheme, signed=True)
    want = quantize_to_int(
        x, qp, stochastic=True, generator=torch.Generator().manual_seed(8), noise="counter"
    )
    grid = cq.grids(cq.tensor_minmax(x, 1, emu), torch.tensor([12], dtype=torch.int32), scheme, True, emu)
    seed = noise_seed(torch.Generator().manual_seed(8))
    codes = cq.quantize_codes(x, grid, emu, rounding="counter", out_dtype="int32", seed=seed)
    assert codes.dtype == torch.int32 and codes.abs().max() > 127
    _check_codes(codes, grid, want)


def test_bad_input_is_rejected(cq):
    x = torch.zeros(4, 8)
    grid = torch.zeros(1, 5)
    for kwargs, match in [
        (dict(rounding="torch"), "noise u"),
        (dict(rounding="counter"), "seed"),
        (dict(rounding="counter_rows", seed=torch.zeros(1, dtype=torch.int32)), "rank"),
        (dict(out=torch.zeros(4, 8, dtype=torch.uint8)), "int8"),
        (dict(out=torch.zeros(4, 4, dtype=torch.int8)), "smaller"),
    ]:
        with pytest.raises(ValueError, match=match):
            cq.quantize_codes(x, grid, not_launched, **kwargs)
    for bad in (x.double(), x.t(), torch.zeros(8)):
        with pytest.raises(ValueError, match="fp32"):
            cq.quantize_codes(bad, grid, not_launched)
    with pytest.raises(ValueError, match="grids"):
        cq.quantize_codes(x, torch.zeros(3, 5), not_launched)
    with pytest.raises(ValueError, match="grid must be"):
        cq.quantize_codes(x, torch.zeros(1, 4), not_launched)
    meta = torch.zeros(1, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="one device"):
        cq.quantize_codes(x, grid, not_launched, rounding="counter", seed=meta)
    with pytest.raises(ValueError, match="rows"):
        cq.tensor_minmax(torch.zeros(10), 3, not_launched)
    with pytest.raises(ValueError, match="int32"):
        cq.grids(torch.zeros(1, 2), torch.tensor([8]), "sbm", None, not_launched)


# -- on a GPU --------------------------------------------------------------------------------------
class GpuLauncher:
    """The kernels' module (cubin, or PTX on a newer GPU) loaded through the CUDA driver API;
    called as a ``Launcher``: ``cuLaunchKernel`` on torch's current stream, tensors as their
    device pointers, ints as 32-bit ints."""

    def __init__(self, cq, index):
        from fraccompile.targets.runtime import cuda_driver as cd

        arch, fmt = cd.arch_for(torch.cuda.get_device_capability(index))
        image = cq.compile_cubin(arch) if fmt == "cubin" else cq.compile_ptx(arch)
        self.cd, self.context, self.functions = cd, cd._primary_context(index), {}
        self.image = ctypes.create_string_buffer(image, len(image) + 1)
        self.module = ctypes.c_void_p()
        with cd._current(self.context):
            cd.driver()("cuModuleLoadData", ctypes.byref(self.module), self.image)

    def __call__(self, name, grid, block, args):
        drv = self.cd.driver()
        with self.cd._current(self.context):
            if name not in self.functions:
                self.functions[name] = ctypes.c_void_p()
                drv("cuModuleGetFunction", ctypes.byref(self.functions[name]), self.module, name.encode())
            values = [
                ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int32(a)
                for a in args
            ]
            params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            drv("cuLaunchKernel", self.functions[name], *grid, *block, 0, stream, params, None)


def test_on_gpu_exact_and_graph_capturable(cq):
    """The chain on a GPU equals the reference quantizer on the CPU; it syncs nothing with the
    host, so it captures into a CUDA graph, whose replay on new values is exact too."""
    from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    needs_nvcc()
    launch = GpuLauncher(cq, torch.cuda.current_device())
    x = values((37, 3001), 1)
    bits = torch.tensor([6], dtype=torch.int32)
    for scheme, per_row, signed in [
        ("sbm", False, None),
        ("symmetric", False, None),
        ("symmetric", True, True),
    ]:
        lo, hi = channel_range(x) if per_row else tensor_range(x)
        qp = qparams_from_range(lo, hi, 6, scheme, signed)
        for stochastic in (False, True):
            want = quantize_to_int(
                x, qp, stochastic=stochastic, generator=torch.Generator().manual_seed(2), noise="counter"
            )
            seed = noise_seed(torch.Generator().manual_seed(2)).cuda()
            xg = x.cuda()
            grid = cq.grids(
                cq.tensor_minmax(xg, 37 if per_row else 1, launch), bits.cuda(), scheme, signed, launch
            )
            out = torch.full((64, 3008), 5, dtype=torch.int8, device="cuda")
            rounding = "counter" if stochastic else "nearest"
            codes = cq.quantize_codes(xg, grid, launch, rounding=rounding, seed=seed, out=out)
            _check_codes(codes.cpu(), grid.cpu(), want, (64, 3008))
    # captured: range, grid and codes of whatever the static input holds at replay
    static = x.cuda()
    seed, b = noise_seed(torch.Generator().manual_seed(3)).cuda(), bits.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grid = cq.grids(cq.tensor_minmax(static, 1, launch), b, "symmetric", None, launch)
        codes = cq.quantize_codes(static, grid, launch, rounding="counter", seed=seed)
    fresh = values((37, 3001), 2).abs()  # non-negative: the unsigned grid, decided on the device
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    lo, hi = tensor_range(fresh)
    want = quantize_to_int(
        fresh,
        qparams_from_range(lo, hi, 6, "symmetric"),
        stochastic=True,
        generator=torch.Generator().manual_seed(3),
        noise="counter",
    )
    assert grid[0, 2].item() == 0.0
    _check_codes(codes.cpu(), grid.cpu(), want)
