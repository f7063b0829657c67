"""The implicit-GEMM tensor-core conv (fraccompile.targets.kernels.cuda_conv), its launcher
(fraccompile.targets.runtime.cuda_conv.CudaConv) and the backend's GPU conv forward on it.

Without a GPU: shapes and bad geometries, the generated CUDA C (mma.sync, ldmatrix, the gather
from X as 16-byte cp.async copies), nvcc's cubins for sm_80/sm_90 (ELF arch; ptxas keeps the
fragments in registers), the kernel run on the CPU by the emulator (``tests/_cuda_emulator.py``)
exact against torch's conv in float64 (strides, padding, dilation, 1x1 and 3x3, odd sizes,
channel padding, split-K, extreme codes), CudaConv's operand preparation and sign correction
with the emulated kernel, its driver path with a fake libcuda, bad inputs refused, and the
backend's conv forward on CUDA tensors (stood in by CPU tensors and torch kernels) equal to its
im2col + GEMM path bit for bit. With a GPU: exact results against torch.
"""

import contextlib
import ctypes
import re
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _cuda_emulator import EmulatedKernel
from _cuda_helpers import codes, elf_arch, gpu, needs_nvcc

from fraccompile.targets import tvm_unavailable_reason
from fraccompile.targets.runtime.cuda_conv import CudaConv, padded_input
from fraccompile.targets.runtime.cuda_driver import MAX_K

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


@pytest.fixture(scope="module")
def cc():
    from fraccompile.targets.kernels import cuda_conv

    return cuda_conv


def reference(x, w, stride, padding, dilation):
    """The exact conv of codes ``x (N, H, W, C)`` and ``w (OC, kh, kw, C)`` (zero padding = code
    0) as int64 ``(N·OH·OW, OC)``: float64 holds every sum exactly."""
    y = F.conv2d(
        x.permute(0, 3, 1, 2).double(),
        w.permute(0, 3, 1, 2).double(),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    return y.permute(0, 2, 3, 1).reshape(-1, w.shape[0]).long()


# -- shapes ----------------------------------------------------------------------------------------
def test_padded_shape(cc):
    g = cc.ConvGeometry(2, 7, 7, 32, 3, 3, 2, 1, 1, 2)
    assert (g.oh, g.ow, g.rows, g.depth) == (3, 3, 18, 288)
    s = cc.padded(g, 20)
    assert (s.m, s.n, s.k, s.split_k, s.zero, s.groups) == (32, 32, 320, 1, (), 1)
    assert s.name == "cuda_conv_n2_h7_w7_c32_k3x3_s2x1_d1x2_m32_n32_k320_s1_t32x32x64_w32x32"
    # a ResNet stage conv (batch 32, 32x32, 16 channels): 128-row blocks, no K split
    s = cc.padded(cc.ConvGeometry(32, 34, 34, 16, 3, 3), 16)
    assert (s.m, s.n, s.k, s.split_k) == (32 * 32 * 32, 32, 192, 1) and s.tile.bm == 128
    # few pixels and a long reduction: K split (the caller zeroes C)
    s = cc.padded(cc.ConvGeometry(1, 6, 6, 512, 3, 3), 512)
    assert s.split_k > 1 and s.zero == ("C",) and s.k % (s.split_k * s.tile.bk) == 0


@pytest.mark.parametrize(
    "args,match",
    [
        ((1, 5, 5, 3, 3, 3), "multiple of 16"),
        ((1, 2, 5, 16, 3, 3), "does not fit"),
        ((1, 5, 5, 16, 3, 3, 0, 1), "at least 1"),
        ((1, 5, 5, 16, 0, 3), "positive"),
        ((1 << 12, 1 << 8, 1 << 8, 16, 1, 1), "int32 indexing"),
    ],
)
def test_bad_geometries_are_refused(cc, args, match):
    with pytest.raises(ValueError, match=match):
        cc.ConvGeometry(*args)


def test_unpadded_shapes_are_refused(cc):
    g = cc.ConvGeometry(1, 5, 5, 16, 3, 3)
    s = cc.padded(g, 16)
    with pytest.raises(ValueError, match="not padded"):
        cc.MmaConvShape(g, s.m, s.n, s.k - 32, s.tile)
    with pytest.raises(ValueError, match="smaller than"):
        cc.MmaConvShape(g, s.m, s.n, 64, s.tile)
    with pytest.raises(ValueError, match="oc=0"):
        cc.padded(g, 0)


# -- generated code --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_generated_source_gathers_with_vector_loads(cc, arch):
    s = cc.padded(cc.ConvGeometry(2, 9, 9, 48, 3, 3, 2, 2, 1, 1), 64)
    src = cc.generate_source(s, arch)
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src
    # 16-byte gathers only, as cp.async copies into the next shared stage
    assert re.search(r"cp_async\w*_16\w*\(A_shared_ptr, [^;]*, X_ptr, ", src) and "X_ptr[" not in src
    assert "A_ptr" not in src and "atomicAdd(" not in src  # no im2col buffer; no K split
    grid, block, name, params, zero = cc.launch_config(s, arch)
    assert name == f"{s.name}_kernel" and sorted(params) == ["B", "C", "X"] and zero == ()
    assert grid == (s.m // s.tile.bm, s.n // s.tile.bn, 1) and block == (32, s.tile.warps, 1)
    split = cc.padded(s.geometry, 64, split_k=3)
    assert cc.launch_config(split)[0][2] == 3 and "atomicAdd(" in cc.generate_source(split)


def test_generated_weight_gradient_source(cc):
    """The weight gradient's kernel: A = dyᵀ, B gathered from X byte by byte (16 pixels of a
    tap are not contiguous), split along the pixels with atomic adds."""
    s = cc.padded_gc(cc.ConvGeometry(32, 34, 34, 16, 3, 3), 16)
    assert (s.m, s.n, s.role, s.kind) == (32, 256, "gc", "mma_conv_gc") and s.split_k > 1
    assert s.k >= 32 * 32 * 32 and s.name.startswith("cuda_convgc_n32_h34_w34_c16_k3x3")
    src = cc.generate_source(s)
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in src and "atomicAdd(" in src
    assert "= X_ptr[" in src and "*(int4*)(X_ptr" not in src  # X byte by byte, synchronously
    assert re.search(r"cp_async\w*_16\w*\(A_shared_ptr, [^;]*, A_ptr, ", src)  # dyᵀ by cp.async
    grid, block, name, params, zero = cc.launch_config(s)
    assert sorted(params) == ["A", "C", "X"] and zero == ("C",) and grid[2] == s.split_k
    with pytest.raises(ValueError, match="smaller than"):
        cc.MmaConvShape(s.geometry, s.m, 128, s.k, s.tile, s.split_k, "gc")
    with pytest.raises(ValueError, match="bad conv shape"):
        cc.MmaConvShape(s.geometry, s.m, s.n, s.k, s.tile, s.split_k, "eb")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_cubin(cc, arch):
    needs_nvcc()
    cubin = cc.compile_cubin(cc.padded(cc.ConvGeometry(8, 18, 18, 64, 3, 3), 64), arch)
    assert elf_arch(cubin) == int(arch[3:])


@pytest.mark.parametrize("role,split", [("fw", 1), ("fw", 4), ("gc", None)])
def test_ptxas_keeps_the_fragments_in_registers(cc, tmp_path, role, split):
    """The default 128 x 128 tile (and split-K) with the gather: no stack frame, no spills."""
    needs_nvcc()
    pad = cc.padded if role == "fw" else cc.padded_gc
    s = pad(cc.ConvGeometry(8, 18, 18, 64, 3, 3), 128, split_k=split)
    assert (s.tile.bm, s.tile.bn) == (128, 128)
    src = tmp_path / "k.cu"
    src.write_text(cc.generate_source(s, "sm_80"))
    cmd = [cc.cuda.nvcc_path(), "--cubin", "-O3", "-arch=sm_80", "-w", "-Xptxas", "-v"]
    out = subprocess.run([*cmd, "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in out.stderr, out.stderr


# -- the generated kernel, run on the CPU ----------------------------------------------------------
class Emulated(EmulatedKernel):
    """The conv kernel generated for ``shape``, run by the emulator on the kernel's operands."""

    def __init__(self, cc, shape, workdir):
        self.shape = shape
        grid, block, name, params, self.zero = cc.launch_config(shape)
        super().__init__(cc.generate_source(shape), name, grid, block, params, workdir, shape.name)

    def __call__(self, x, operand, c=None):
        """``operand``: B (the weights) of the forward, A (dyᵀ) of the weight gradient."""
        s, g = self.shape, self.shape.geometry
        assert x.dtype == operand.dtype == torch.int8 and x.is_contiguous() and operand.is_contiguous()
        rows, name = (s.n, "B") if s.role == "fw" else (s.m, "A")
        assert x.shape == (g.n, g.hp, g.wp, g.c) and operand.shape == (1, rows, s.k)
        if c is None:  # garbage the kernel must overwrite, or zeros where it adds
            c = torch.full((1, s.m, s.n), 0 if "C" in self.zero else -1, dtype=torch.int32)
        bufs = {"X": x, name: operand, "C": c}
        self.launch([bufs[p].data_ptr() for p in self.params])
        return c


class StandInConv(CudaConv):
    """CudaConv with the kernel call replaced by ``run`` (the emulated kernel, or a torch
    stand-in); records the shapes it is called with."""

    def __init__(self, run, **kw):
        super().__init__(**kw)
        self.run, self.calls = run, []

    def _s8_conv(self, x, operand, shape):
        g = shape.geometry
        rows = shape.n if shape.role == "fw" else shape.m  # B (weights) or A (dyᵀ)
        assert x.shape == (g.n, g.hp, g.wp, g.c) and operand.shape == (1, rows, shape.k)
        assert x.dtype == operand.dtype == torch.int8 and x.is_contiguous() and operand.is_contiguous()
        assert x.data_ptr() % 16 == 0 and operand.data_ptr() % 16 == 0  # the kernels' vector loads
        self.calls.append(shape)
        return self.run(x, operand, shape)


def torch_kernel(x, operand, shape):
    """The kernel's contract in torch (int64), padded as the kernel's C: ``C = patches(X)·Bᵀ``
    (forward) or ``C = A·patches(X)`` (weight gradient, A = dyᵀ)."""
    g = shape.geometry
    c = torch.full((1, shape.m, shape.n), -7, dtype=torch.int32)
    if shape.role == "fw":
        w = operand[0, :, : g.depth].reshape(shape.n, g.kh, g.kw, g.c)
        c[0, : g.rows] = reference(x, w, (g.sh, g.sw), (0, 0), (g.dh, g.dw)).int()
    else:
        dy = operand[0, :, : g.rows].t().reshape(g.n, g.oh, g.ow, shape.m)
        c[0, :, : g.depth] = (
            gc_reference(x, dy, (g.kh, g.kw), (g.sh, g.sw), 0, (g.dh, g.dw)).reshape(shape.m, -1).int()
        )
    return c


def gc_reference(x, dy, kernel_size, stride, padding, dilation):
    """The exact weight gradient ``Σ dy·x`` of codes ``x (N, H, W, C)``, ``dy (N, OH, OW, OC)`` as
    int64 ``(OC, kh, kw, C)`` (float64 holds every sum exactly)."""
    dw = torch.nn.grad.conv2d_weight(
        x.permute(0, 3, 1, 2).double(),
        (dy.shape[3], x.shape[3], *kernel_size),
        dy.permute(0, 3, 1, 2).double(),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    return dw.permute(0, 2, 3, 1).long()


# (N, H, W, C, OC, k, stride, padding, dilation, x dtype, tile, split_k): a few small problems, each
# a separate kernel compiled by g++ and run block by block (seconds on 2 cores)
EMULATED = [
    (2, 5, 5, 16, 16, 3, 1, 1, 1, torch.int8, None, None),  # 3x3, stride 1, "same" padding
    (1, 7, 6, 3, 20, 3, 2, 1, 1, torch.uint8, None, None),  # stride 2, odd sizes, 3 channels
    (3, 3, 5, 32, 40, 1, 1, 0, 1, torch.int8, None, None),  # 1x1: x read in place, no copy
    (1, 6, 7, 16, 8, 3, (1, 2), (2, 1), (2, 1), torch.uint8, None, None),  # mixed strides, dilation
    (2, 4, 4, 48, 32, 3, 1, 1, 1, torch.int8, (32, 32, 64, 32, 32), 2),  # split-K: adds into C
]


@pytest.mark.parametrize("N,H,W,C,OC,k,stride,padding,dilation,dtype,tile,split", EMULATED)
def test_emulated_conv_is_exact(
    cc, tmp_path, N, H, W, C, OC, k, stride, padding, dilation, dtype, tile, split
):
    """CudaConv.forward with the generated kernel emulated: the padded, shifted input, the weight
    operand, the kernel's gather and tensor-core GEMM, the sign correction; exact against torch."""
    from fraccompile.targets.kernels.cuda_mma import MmaTile

    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    gen = torch.Generator().manual_seed(N * 100 + C)
    x, w = codes((N, H, W, C), dtype, gen), codes((OC, k, k, C), torch.int8, gen)
    x[0, 0, 0, :] = 255 if dtype == torch.uint8 else -128  # extreme codes at a corner (padded taps)
    w[0] = -128
    tile = MmaTile(*tile) if tile else None
    conv = CudaConv(tile=tile, split_k=split)
    shape = conv.shape(x.shape, w.shape, stride, padding, dilation)
    kernel = Emulated(cc, shape, tmp_path)
    run = StandInConv(lambda X, B, s: kernel(X, B), tile=tile, split_k=split)
    y = run.forward(x, w, stride, padding, dilation)
    assert y.dtype == torch.int32 and y.shape == (shape.geometry.rows, OC)
    assert torch.equal(y.long(), reference(x, w, stride, padding, dilation))
    assert run.calls == [shape] and shape.split_k == (split or 1)
    if split:  # the split-K kernel adds into C: a second launch on the same C doubles it
        X, B = (
            padded_input(x, padding, shape.geometry.c),
            torch.zeros((1, shape.n, shape.k), dtype=torch.int8),
        )
        B[0, :OC, : shape.geometry.depth] = w.reshape(OC, -1)
        c = kernel(X, B)
        assert torch.equal(
            kernel(X, B, c)[0, : shape.geometry.rows, :OC].long(),
            2 * reference(x, w, stride, padding, dilation),
        )


def test_emulated_extreme_codes_over_the_whole_reduction(cc, tmp_path):
    """Every code extreme (uint8 255 and int8 -128 against -128 and 127): the largest sums of the
    s8 kernel plus the shift's correction, padded taps included."""
    x = torch.full((1, 4, 4, 64), 255, dtype=torch.uint8)
    w = torch.full((2, 3, 3, 64), -128, dtype=torch.int8)
    w[1] = 127
    conv = CudaConv()
    shape = conv.shape(x.shape, w.shape, (1, 1), (1, 1), (1, 1))
    kernel = Emulated(cc, shape, tmp_path)
    run = StandInConv(lambda X, B, s: kernel(X, B))
    y = run.forward(x, w, padding=(1, 1))
    assert torch.equal(y.long(), reference(x, w, 1, 1, 1)) and y[5, 0] == 255 * -128 * 9 * 64
    y = run.forward(x.view(torch.int8) * 0 - 128, w, padding=(1, 1))
    assert y[5, 0] == 128 * 128 * 9 * 64


# (N, H, W, C, OC, k, stride, padding, dilation, x dtype, split_k, max_k) of the weight gradient
EMULATED_GC = [
    (2, 5, 5, 16, 16, 3, 1, 1, 1, torch.int8, None, None),  # 3x3, stride 1, padding
    (1, 7, 6, 3, 20, 3, 2, 1, 1, torch.uint8, None, None),  # stride 2, odd sizes, 3 channels
    (3, 3, 5, 32, 24, 1, 1, 0, 1, torch.uint8, 2, None),  # 1x1, split-K
    (3, 4, 3, 16, 8, 3, (1, 2), (2, 1), (2, 1), torch.int8, None, 10),  # 3 batch chunks of 1 image
]


@pytest.mark.parametrize("N,H,W,C,OC,k,stride,padding,dilation,dtype,split,max_k", EMULATED_GC)
def test_emulated_weight_gradient_is_exact(
    cc, tmp_path, N, H, W, C, OC, k, stride, padding, dilation, dtype, split, max_k
):
    """CudaConv.weight_grad with the generated kernel (B gathered from the codes, A = dyᵀ)
    emulated: exact against torch, the pixels summed over batch chunks where ``max_k`` says."""
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    gen = torch.Generator().manual_seed(N * 10 + C)
    x = codes((N, H, W, C), dtype, gen)
    conv = CudaConv(split_k=split, max_k=max_k or MAX_K)
    g = conv.shape(x.shape, (OC, k, k, C), stride, padding, dilation, "gc").geometry
    dy = codes((N, g.oh, g.ow, OC), torch.int8, gen)
    dy[0, 0, 0, :], x[0, -1, -1, :] = -128, 255 if dtype == torch.uint8 else -128  # extremes
    kernels = {}

    def run(X, A, shape):
        if shape not in kernels:
            kernels[shape] = Emulated(cc, shape, tmp_path)
        return kernels[shape](X, A)

    dw = StandInConv(run, split_k=split, max_k=max_k or MAX_K).weight_grad(
        x, dy, (k, k), stride, padding, dilation
    )
    assert dw.dtype == (torch.int64 if max_k else torch.int32) and dw.shape == (OC, k, k, C)
    assert torch.equal(dw.long(), gc_reference(x, dy, (k, k), stride, padding, dilation))
    assert all(s.role == "gc" and s.split_k == (split or 1) for s in kernels) and len(kernels) == 1


def test_weight_gradient_with_a_torch_kernel():
    """weight_grad's operands through the kernel's contract: uint8 codes (shift and 128·Σdy),
    channels-last views of NCHW codes, uneven batch chunks (2 + 2 + 1 images)."""
    gen = torch.Generator().manual_seed(2)
    x = codes((5, 9, 8, 21), torch.uint8, gen).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    dy = codes((5, 5, 4, 7), torch.int8, gen).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    conv = StandInConv(torch_kernel, max_k=2 * 5 * 4 + 3)
    dw = conv.weight_grad(x, dy, (3, 3), (2, 2), (1, 1), (1, 1))
    assert torch.equal(dw, gc_reference(x, dy, (3, 3), 2, 1, 1))
    assert [s.geometry.n for s in conv.calls] == [2, 2, 1]
    with pytest.raises(ValueError, match="the conv's output is 5 x 4"):
        conv.weight_grad(x, dy[:, :4], (3, 3), (2, 2), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="dy: expected int8"):
        conv.weight_grad(x, dy.view(torch.uint8), (3, 3), (2, 2), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="20 output pixels per image is over 19"):
        StandInConv(torch_kernel, max_k=19).weight_grad(x, dy, (3, 3), (2, 2), (1, 1), (1, 1))


# -- the launcher ----------------------------------------------------------------------------------
def test_padded_input():
    x = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    X = padded_input(x, (1, 0), 16)
    assert X.dtype == torch.int8 and X.shape == (1, 3, 1, 16) and X.is_contiguous()
    assert X[0, 1, 0, :3].tolist() == [-128, 127, 0] and set(X[0, 0].flatten().tolist()) == {-128}
    assert set(X[0, 1, 0, 3:].tolist()) == {-128}
    s = torch.zeros((2, 3, 3, 32), dtype=torch.int8)
    assert padded_input(s, (0, 0), 32) is s  # nothing to change: no copy
    assert padded_input(s[:, :, :, :16], (0, 0), 16).is_contiguous()  # a strided view is copied
    assert padded_input(s, (1, 1), 32).eq(0).all()


I8, U8 = torch.int8, torch.uint8


@pytest.mark.parametrize(
    "x,w,kw,exc,match",
    [
        (((1, 4, 4, 3), I8), ((2, 3, 3, 4), I8), {}, ValueError, "expected x"),
        (((4, 4, 3), I8), ((2, 3, 3, 3), I8), {}, ValueError, "expected x"),
        (((1, 4, 4, 3), torch.float32), ((2, 3, 3, 3), I8), {}, TypeError, "x: dtype"),
        (((1, 4, 4, 3), I8), ((2, 3, 3, 3), U8), {}, TypeError, "w: dtype"),
        (((1, 4, 4, 3), I8), ((2, 3, 3, 3), I8), {"stride": (0, 1)}, ValueError, "stride"),
        (((1, 4, 4, 3), I8), ((2, 3, 3, 3), I8), {"padding": (-1, 0)}, ValueError, "padding"),
        (((1, 4, 4, 3), I8), ((2, 3, 3, 3), I8), {"dilation": (1,)}, ValueError, "dilation"),
        (((0, 4, 4, 3), I8), ((2, 3, 3, 3), I8), {}, ValueError, "empty"),
        (((1, 4, 4, 8192), I8), ((1, 3, 3, 8192), I8), {}, ValueError, f"over {MAX_K}"),
        (((1, 2, 2, 16), I8), ((1, 3, 3, 16), I8), {}, ValueError, "does not fit"),
    ],
)
def test_bad_inputs_are_refused(x, w, kw, exc, match):
    with pytest.raises(exc, match=match):
        StandInConv(torch_kernel).forward(torch.zeros(x[0], dtype=x[1]), torch.zeros(w[0], dtype=w[1]), **kw)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_forward_with_a_torch_kernel(dtype):
    """The operands CudaConv hands to the kernel (padded input, weight rows padded per tap)
    give the conv through the kernel's contract: channels not a multiple of 16, 5x5, stride 3."""
    gen = torch.Generator().manual_seed(5)
    x, w = codes((2, 11, 9, 21), dtype, gen), codes((7, 5, 5, 21), torch.int8, gen)
    xl = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # channels-last view of NCHW
    y = StandInConv(torch_kernel).forward(xl[:, :, 1:], w, (3, 3), (2, 1), (1, 1))
    assert torch.equal(y.long(), reference(x[:, :, 1:], w, 3, (2, 1), 1))


class FakeDriver:
    """Stands in for libcuda and runs a launch with the emulated kernel, after checking the
    launch geometry, the cubin and (for split-K) that C was zeroed."""

    def __init__(self, emulated, image):
        self.emulated, self.image, self.calls = emulated, image, []

    def __call__(self, name, *args):
        self.calls.append(name)
        if name == "cuDeviceGet":
            args[0]._obj.value = args[1]
        elif name in ("cuDevicePrimaryCtxRetain", "cuModuleLoadData", "cuModuleGetFunction"):
            assert name != "cuModuleLoadData" or args[1].raw == self.image + b"\0"
            assert name != "cuModuleGetFunction" or args[2] == self.emulated.name.encode()
            args[0]._obj.value = 0x111
        elif name == "cuLaunchKernel":
            grid, block, params = tuple(args[1:4]), tuple(args[4:7]), args[9]
            assert (grid, block) == (self.emulated.grid, self.emulated.block)
            ptrs = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_void_p)).contents.value for i in range(3)]
            s = self.emulated.shape
            c = ptrs[self.emulated.params.index("C")]
            assert set((ctypes.c_int32 * (s.m * s.n)).from_address(c)) == {0}, "C not zeroed"
            self.emulated.launch(ptrs)
        elif name not in ("cuCtxPushCurrent_v2", "cuCtxPopCurrent_v2"):
            raise AssertionError(name)


def test_forward_through_the_driver_path(cc, tmp_path, monkeypatch):
    """CudaConv's GPU path on the CPU with the split-K kernel: the nvcc-built cubin through the
    disk cache (built once), the launch geometry and parameter order (X, B, C), C zeroed."""
    from fraccompile.targets.kernels import cuda, cuda_mma
    from fraccompile.targets.runtime import cuda_conv as runtime
    from fraccompile.targets.runtime import cuda_driver

    needs_nvcc()
    tile = cuda_mma.MmaTile(32, 32, 64, 32, 32)
    conv = CudaConv(tile=tile, split_k=2, cache_dir=tmp_path)
    gen = torch.Generator().manual_seed(9)
    x, w = codes((1, 5, 5, 16), torch.uint8, gen), codes((24, 3, 3, 16), torch.int8, gen)
    shape = conv.shape(x.shape, w.shape, (1, 1), (1, 1), (1, 1))
    emulated = Emulated(cc, shape, tmp_path)
    fake = FakeDriver(emulated, runtime.load_or_build(shape, "sm_90", "cubin", tmp_path))
    assert [p.name for p in tmp_path.glob("*.cubin")] == [runtime.kernel_path(shape, "sm_90", "cubin").name]
    monkeypatch.setattr(cuda_driver, "driver", lambda: fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(cuda_stream=5))
    monkeypatch.setattr(cuda, "compile_source", lambda *a: pytest.fail("rebuilt a cached kernel"))
    cuda_driver._primary_context.cache_clear()
    try:
        for _ in range(2):
            assert torch.equal(conv.forward(x, w, padding=(1, 1)).long(), reference(x, w, 1, 1, 1))
    finally:
        cuda_driver._primary_context.cache_clear()
    assert fake.calls.count("cuModuleLoadData") == 1 and fake.calls.count("cuLaunchKernel") == 2


# -- the backend's conv forward on CUDA tensors -----------------------------------------------------
@contextlib.contextmanager
def _no_host_reads(active=True):
    """Reading a tensor's value on the host (``bool``, ``int``, ``float``, ``.item()``,
    ``.tolist()``, ``nonzero``) raises inside the block: the conv paths add no host sync."""

    def refuse(*args, **kwargs):
        raise AssertionError("host read in the conv path")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"):
            if active:
                mp.setattr(torch.Tensor, name, refuse)
        yield


def _backend_on_gpu(monkeypatch, library=None):
    """A fresh tvm backend that takes CPU tensors for CUDA ones, with torch stand-ins for the
    kernels: the GEMM's (``CudaGemm._s8_gemm``) and the conv's (:func:`torch_kernel`)."""
    from fraccompile.targets.backend.tvm_backend import TVMBackend, make_tvm_backend
    from fraccompile.targets.runtime.cuda_driver import CudaGemm

    class TorchGemm(CudaGemm):
        def _s8_gemm(self, a, b, shape):
            return (a.long() @ b.long().mT).int()

    monkeypatch.setattr(TVMBackend, "on_gpu", staticmethod(lambda t: True))
    be = make_tvm_backend({})
    be._cuda = TorchGemm(library=library)
    be._cuda_conv = StandInConv(torch_kernel)
    return be


@pytest.mark.parametrize(
    "dtype,stride,padding,dilation,zero",
    [
        (torch.uint8, 1, 1, 1, False),
        (torch.int8, 2, 1, 1, False),
        (torch.uint8, (2, 1), (0, 2), (1, 2), False),
        (torch.int8, 1, 1, 1, True),  # weight zero points (sbm): the terms added after the product
    ],
)
def test_backend_conv_forward_runs_on_the_conv_kernel(monkeypatch, dtype, stride, padding, dilation, zero):
    """The backend's GPU conv forward on CudaConv gives its im2col + CudaGemm result bit for bit
    (the same integers, the same dequantize), and a GEMM serving an exported library (which holds
    no conv kernels) keeps im2col."""
    from fraccompile.ops.spec import SiteSpec
    from fraccompile.targets.backend.codes import IntCodes

    gen = torch.Generator().manual_seed(11)
    N, C, H, W, OC = 2, 5, 7, 6, 12
    xc = codes((N, H, W, C), dtype, gen).permute(0, 3, 1, 2)  # NCHW, channels-last in memory
    wc = codes((OC, C, 3, 3), torch.int8, gen)
    xq = IntCodes(
        xc, torch.tensor([0.05]), dtype == torch.int8, None, 255.0 if dtype == torch.uint8 else 127.0
    )
    scale = torch.rand((OC, 1, 1, 1), generator=gen) * 0.01 + 0.001
    wzero = (torch.rand((OC, 1, 1, 1), generator=gen) - 0.5) * 0.1 if zero else None
    wq = IntCodes(wc, scale, True, wzero, 127.0)
    bias = torch.randn(OC, generator=gen)
    spec = SiteSpec.conv(2, stride, padding, dilation)
    be = _backend_on_gpu(monkeypatch)
    with _no_host_reads(not zero):  # (a zero point's presence is read on the host)
        y = be.fw(spec, xq, wq, xc.shape, wc.shape, bias)
    assert be._cuda_conv.calls and be._cuda_conv.calls[0].geometry.c == 16
    im2col = _backend_on_gpu(monkeypatch, library=SimpleNamespace(kind="mma"))
    y2 = im2col.fw(spec, xq, wq, xc.shape, wc.shape, bias)
    assert im2col._cuda_conv.calls == [] and torch.equal(y, y2)
    ref = F.conv2d(xq.dequantize(), wq.dequantize(), bias, spec.stride, spec.padding, spec.dilation)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "dilation,padding,wide,column", [(1, 1, False, False), (2, 1, True, False), (1, 0, False, True)]
)
def test_backend_conv_error_backprop_runs_on_the_conv_kernel(monkeypatch, dilation, padding, wide, column):
    """A stride-1 conv's integer error backprop on CUDA tensors (one weight scale, or one per
    input channel: ``weight_scale="gemm"``) is the conv kernel's forward of the transposed conv:
    exact integer sums, per 8-bit part of wide gradient codes (the low part unsigned), against
    the fp32 backprop of the dequantized operands; strided convs keep their fp32 backprop."""
    from fraccompile.ops.spec import SiteSpec
    from fraccompile.targets.backend.codes import IntCodes

    gen = torch.Generator().manual_seed(13)
    N, C, H, W, OC, k = 2, 6, 6, 5, 9, 3
    wc = codes((OC, C, k, k), torch.int8, gen)
    wscale = torch.rand((1, C, 1, 1), generator=gen) * 0.01 + 0.001 if column else torch.tensor([0.02])
    wq = IntCodes(wc, wscale, True, None, 127.0)
    xq = IntCodes(codes((N, C, H, W), torch.int8, gen), torch.tensor([0.1]), True, None, 127.0)
    spec = SiteSpec.conv(2, 1, padding, dilation)
    OH, OW = (H + 2 * padding - dilation * (k - 1) - 1) + 1, (W + 2 * padding - dilation * (k - 1) - 1) + 1
    lo, hi = (-3000, 3000) if wide else (-128, 128)
    dyc = torch.randint(lo, hi, (N, OC, OH, OW), generator=gen, dtype=torch.int32 if wide else torch.int8)
    dyq = IntCodes(dyc, torch.tensor([1e-3]), True, None, float(hi - 1))
    be = _backend_on_gpu(monkeypatch)
    with _no_host_reads():
        dx = be.eb(spec, dyq, xq, wq, (N, C, H, W), wc.shape, column_scales=column)
    assert len(be._cuda_conv.calls) == (2 if wide else 1)
    ref = torch.nn.grad.conv2d_input(
        (N, C, H, W), wq.dequantize().double(), dyq.dequantize().double(), 1, padding, dilation
    )
    assert dx.shape == ref.shape and torch.allclose(dx.double(), ref, rtol=1e-5, atol=1e-6)
    size = [2 * (o - 1) + 1 + dilation * (k - 1) - 2 * padding for o in (OH, OW)]
    strided, x2 = _backend_on_gpu(monkeypatch), (N, C, *size)  # the same dy, stride 2
    xq = IntCodes(codes(x2, torch.int8, gen), torch.tensor([0.1]), True, None, 127.0)
    dx = strided.eb(SiteSpec.conv(2, 2, padding, dilation), dyq, xq, wq, x2, wc.shape)
    assert strided._cuda_conv.calls == [] and dx.shape == x2


@pytest.mark.parametrize(
    "dtype,stride,padding,dilation,wide",
    [
        (torch.uint8, 1, 1, 1, False),
        (torch.int8, 2, 1, 1, True),
        (torch.uint8, (1, 2), (2, 0), (2, 1), False),
    ],
)
def test_backend_conv_weight_gradient_runs_on_the_conv_kernel(
    monkeypatch, dtype, stride, padding, dilation, wide
):
    """The backend's GPU conv weight gradient on CudaConv.weight_grad gives its im2col + CudaGemm
    result bit for bit (uint8 and int8 activation codes, wide gradient codes as two parts)."""
    from fraccompile.ops.spec import SiteSpec
    from fraccompile.targets.backend.codes import IntCodes

    gen = torch.Generator().manual_seed(17)
    N, C, H, W, OC, k = 3, 5, 7, 6, 10, 3
    spec = SiteSpec.conv(2, stride, padding, dilation)
    xc = codes((N, H, W, C), dtype, gen).permute(0, 3, 1, 2)
    xq = IntCodes(
        xc, torch.tensor([0.05]), dtype == torch.int8, None, 255.0 if dtype == torch.uint8 else 127.0
    )
    out = F.conv2d(
        torch.zeros(N, C, H, W), torch.zeros(OC, C, k, k), None, spec.stride, spec.padding, spec.dilation
    )
    lo, hi = (-3000, 3000) if wide else (-128, 128)
    dyc = torch.randint(lo, hi, out.shape, generator=gen, dtype=torch.int32 if wide else torch.int8)
    dyq = IntCodes(dyc, torch.tensor([1e-3]), True, None, float(hi - 1))
    w_shape = (OC, C, k, k)
    be = _backend_on_gpu(monkeypatch)
    with _no_host_reads(not wide):  # (wide codes: the low part's zero point is checked on the host)
        dw = be.gc(spec, xq, dyq, xc.shape, w_shape)
    assert len(be._cuda_conv.calls) == (2 if wide else 1) and be._cuda_conv.calls[0].role == "gc"
    im2col = _backend_on_gpu(monkeypatch, library=SimpleNamespace(kind="mma"))
    assert torch.equal(dw, im2col.gc(spec, xq, dyq, xc.shape, w_shape)) and im2col._cuda_conv.calls == []
    ref = torch.nn.grad.conv2d_weight(
        xq.dequantize().double(), w_shape, dyq.dequantize().double(), spec.stride, spec.padding, spec.dilation
    )
    assert torch.allclose(dw.double(), ref, rtol=1e-5, atol=1e-5)


# -- on a GPU --------------------------------------------------------------------------------------


GPU_CASES = [
    (1, 1, 1, 1, 1, 1, 1, 0, 1),
    (2, 9, 7, 3, 16, 3, 1, 1, 1),
    (32, 32, 32, 16, 16, 3, 1, 1, 1),
    (8, 16, 16, 32, 64, 3, 2, 1, 1),
    (4, 8, 8, 64, 64, 1, 2, 0, 1),
    (2, 10, 10, 24, 40, 3, 1, 2, 2),
    (1, 4, 4, 512, 512, 3, 1, 1, 1),  # split-K (forward)
    (128, 32, 32, 16, 16, 3, 1, 1, 1),  # weight gradient: two batch chunks of 64 images
]


@gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("N,H,W,C,OC,k,stride,padding,dilation", GPU_CASES)
def test_gpu_exact(dtype, N, H, W, C, OC, k, stride, padding, dilation):
    """Forward and weight gradient on the GPU, exact against torch."""
    gen = torch.Generator().manual_seed(0)
    x, w = codes((N, H, W, C), dtype, gen), codes((OC, k, k, C), torch.int8, gen)
    pair = (stride,) * 2, (padding,) * 2, (dilation,) * 2
    conv = CudaConv()
    y = conv.forward(x.cuda(), w.cuda(), *pair)
    assert y.is_cuda and torch.equal(y.cpu().long(), reference(x, w, stride, padding, dilation))
    g = conv.shape(x.shape, w.shape, *pair, "gc").geometry
    dy = codes((N, g.oh, g.ow, OC), torch.int8, gen)
    dw = conv.weight_grad(x.cuda(), dy.cuda(), (k, k), *pair)
    assert torch.equal(dw.cpu().long(), gc_reference(x, dy, (k, k), *pair))


@gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_gpu_backend_conv_roles(dtype):
    """On a GPU the backend's conv forward and weight gradient on the conv kernel equal its
    im2col + GEMM results bit for bit (a CudaGemm serving a library keeps im2col); the stride-1
    integer error backprop is close to the fp32 one."""
    from fraccompile.ops.spec import SiteSpec
    from fraccompile.targets.backend.codes import IntCodes
    from fraccompile.targets.backend.tvm_backend import make_tvm_backend
    from fraccompile.targets.runtime.cuda_driver import CudaGemm

    gen = torch.Generator().manual_seed(3)
    N, C, H, W, OC = 8, 16, 12, 12, 32
    xc = codes((N, H, W, C), dtype, gen).permute(0, 3, 1, 2).cuda()
    xq = IntCodes(xc, torch.tensor([0.05]).cuda(), dtype == torch.int8, None, 127.0)
    wq = IntCodes(
        codes((OC, C, 3, 3), torch.int8, gen).cuda(), torch.tensor([0.01]).cuda(), True, None, 127.0
    )
    dyq = IntCodes(
        codes((N, OC, H, W), torch.int8, gen).cuda(), torch.tensor([1e-3]).cuda(), True, None, 127.0
    )
    spec, shapes = SiteSpec.conv(2, 1, 1), (xc.shape, wq.codes.shape)
    conv, im2col = make_tvm_backend({}), make_tvm_backend({})
    im2col._cuda = CudaGemm(library=SimpleNamespace(kind="mma", kernel=lambda *a: None))
    assert torch.equal(conv.fw(spec, xq, wq, *shapes), im2col.fw(spec, xq, wq, *shapes))
    assert torch.equal(conv.gc(spec, xq, dyq, *shapes), im2col.gc(spec, xq, dyq, *shapes))
    assert conv._cuda_conv._kernels and getattr(im2col, "_cuda_conv", None) is None
    dx = conv.eb(spec, dyq, xq, wq, *shapes)
    assert torch.allclose(dx, im2col.eb(spec, dyq, xq, wq, *shapes), rtol=1e-5, atol=1e-6)
