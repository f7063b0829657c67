"""The CUDA dp4a GEMM (fraccompile.targets.kernels.cuda) and its driver-API launcher (.cuda_driver).
The tensor-core (mma) kernel, CudaGemm's default on compute capability 8.0+, is tested in
test_cuda_mma.py; the GPU tests here run the dp4a kernel explicitly (``CudaGemm(kernel="dp4a")``).

Without a GPU: the generated CUDA C, nvcc's cubins for sm_80/sm_90 (ELF header and arch), the
padding and launch geometry, the disk cache, and ``CudaGemm``'s sign shifts, K split and padding
with a torch stand-in for the kernel call. The generated kernels themselves run on the CPU in a
small emulator (the kernel's CUDA C compiled by g++ with one std::thread per CUDA thread and a
std::barrier for ``__syncthreads``), so the schedule's indexing, shared-memory staging and
synchronization are checked without a GPU, and so is CudaGemm's GPU path (arch choice, cubin
cache, cuLaunchKernel's arguments) with a fake libcuda whose launch runs the emulated kernel.
With a GPU: exact results against torch.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from _cuda_emulator import EmulatedKernel
from _cuda_helpers import DTYPES, codes, elf_arch, gpu, needs_nvcc, reference

from fraccompile.targets import tvm_unavailable_reason
from fraccompile.targets.runtime.cuda_driver import (
    MAX_K,
    CUDAError,
    CudaGemm,
    _Driver,
    arch_for,
    gpu_unavailable_reason,
)

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


@pytest.fixture(scope="module")
def cuda():
    from fraccompile.targets.kernels import cuda

    return cuda


# -- shapes, tiles, generated source ---------------------------------------------------------------
def test_padded_rounds_to_the_tile(cuda):
    s = cuda.padded(3, 100, 70, 33)
    assert (s.groups, s.m, s.n, s.k) == (3, 128, 128, 64)
    assert s.name == "cuda_gemm_g3_m128_n128_k64_t128x128x32_8x8"
    assert cuda.padded(1, 20, 50, 1).tile == cuda.CudaTile(32, 64, 32, 2, 4)
    s = cuda.padded(1, 20, 50, 1)
    assert (s.m, s.n, s.k) == (32, 64, 32)
    t = cuda.CudaTile(64, 32, 64, 4, 2)
    s = cuda.padded(2, 65, 33, 65, t)
    assert (s.m, s.n, s.k, s.tile) == (128, 64, 128, t)
    for size in (1, 31, 32, 33, 64, 65, 128, 129, 8192):  # padding is idempotent
        s = cuda.padded(1, size, size, size)
        assert cuda.padded(1, s.m, s.n, s.k) == s
        assert s.m >= size and s.k % 4 == 0 and s.k - size < s.tile.bk


def test_bad_tiles_and_shapes_are_rejected(cuda):
    for bad in [
        dict(bk=6),
        dict(tm=3),
        dict(bm=256, bn=256, tm=4, tn=4),  # 4096 threads
        dict(bk=4),
    ]:  # 256 threads cannot copy a 128x4 tile in 4-byte words
        with pytest.raises(ValueError):
            cuda.CudaTile(**bad)
    with pytest.raises(ValueError, match="not padded"):
        cuda.CudaGemmShape(1, 100, 128, 32, cuda.CudaTile())


LAUNCH_SHAPES = [
    (1, 128, 128, 512, None),
    (2, 200, 150, 70, None),
    (3, 5, 300, 7, None),
    (1, 8192, 512, 512, None),
    (2, 65, 33, 65, (64, 32, 64, 4, 2)),
    (1, 256, 256, 64, (128, 64, 32, 8, 4)),
]


@pytest.mark.parametrize("G,M,N,K,tile", LAUNCH_SHAPES)
def test_launch_config_covers_the_output(cuda, G, M, N, K, tile):
    s = cuda.padded(G, M, N, K, cuda.CudaTile(*tile) if tile else None)
    grid, block, name, params = cuda.launch_config(s)
    t = s.tile
    assert grid == (s.m // t.bm, s.n // t.bn, G)
    assert block == (t.bn // t.tn, t.bm // t.tm, 1)
    # every thread owns tm x tn outputs: the launch covers C exactly once
    assert grid[0] * block[1] * t.tm == s.m and grid[1] * block[0] * t.tn == s.n
    assert name == f"{s.name}_kernel" and sorted(params) == ["A", "B", "C"]
    src = cuda.generate_source(s)
    assert f"__launch_bounds__({t.threads}) {name}(" in src


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_generated_source_uses_dp4a(cuda, arch):
    s = cuda.padded(1, 128, 128, 512)
    src = cuda.generate_source(s, arch)
    assert "__global__" in src and "__dp4a(" in src
    assert "__shared__" in src and "__syncthreads()" in src
    # every multiply-add of the kernel is a dp4a: bk/4 * tm * tn per k step, fully unrolled
    assert src.count("__dp4a(A_shared") == (32 // 4) * 8 * 8
    assert re.search(r"int C_local\w*\[64\]", src)  # 8x8 accumulators per thread


def test_target_and_archs(cuda):
    assert cuda.ARCHS == ("sm_80", "sm_90")
    assert str(cuda.target("sm_80").kind) == "cuda"
    with pytest.raises(ValueError):
        cuda.target("sm_70")


def test_arch_for_capabilities():
    assert arch_for((8, 0)) == ("sm_80", "cubin")
    assert arch_for((8, 9)) == ("sm_80", "cubin")
    assert arch_for((9, 0)) == ("sm_90", "cubin")
    assert arch_for((10, 0)) == ("sm_90", "ptx")  # no sm_90 cubin runs on Blackwell: JIT PTX
    with pytest.raises(ValueError):
        arch_for((7, 5))


# -- nvcc ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_cubin(cuda, arch):
    needs_nvcc()
    cubin = cuda.compile_cubin(cuda.padded(1, 128, 128, 512), arch)
    assert cubin[:4] == b"\x7fELF"
    assert elf_arch(cubin) == int(arch[3:])
    if shutil.which("cuobjdump"):
        out = subprocess.run(["cuobjdump", "--list-elf", "-"], input=cubin, capture_output=True)
        if out.returncode == 0:
            assert arch.encode() in out.stdout


def test_compile_ptx(cuda):
    needs_nvcc()
    ptx = cuda.compile_ptx(cuda.padded(1, 128, 128, 512), "sm_90").decode()
    assert ".target sm_90" in ptx and "dp4a.s32.s32" in ptx


def test_cubin_disk_cache(cuda, tmp_path, monkeypatch):
    from fraccompile.targets.runtime import cuda_driver

    needs_nvcc()
    s = cuda.padded(1, 32, 32, 32)
    first = cuda_driver.load_or_build(s, "sm_80", "cubin", tmp_path)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [cuda_driver.kernel_path(s, "sm_80", "cubin", tmp_path).name]
    assert files[0].read_bytes() == first and files[0].name.startswith(s.name + "-sm_80-")

    def no_nvcc(*args):
        raise AssertionError("rebuilt a cached kernel")

    monkeypatch.setattr(cuda, "compile_source", no_nvcc)
    assert cuda_driver.load_or_build(s, "sm_80", "cubin", tmp_path) == first
    # the default directory is $FRACCOMPILE_CACHE_DIR (tests/conftest.py points it at a temp dir)
    monkeypatch.setenv("FRACCOMPILE_CACHE_DIR", str(tmp_path / "env"))
    assert cuda_driver.kernel_path(s, "sm_90", "cubin").parent == tmp_path / "env"


# -- the generated kernels, run on the CPU ---------------------------------------------------------
class Emulated(EmulatedKernel):
    """The dp4a kernel generated for ``shape``, run on the CPU by the emulator
    (``tests/_cuda_emulator.py``); called like the kernel, on padded int8 operands."""

    def __init__(self, cuda, shape, workdir):
        self.shape = shape
        grid, block, name, params = cuda.launch_config(shape)
        super().__init__(cuda.generate_source(shape), name, grid, block, params, workdir, shape.name)

    def __call__(self, a, b):
        s = self.shape
        assert a.dtype == b.dtype == torch.int8 and a.is_contiguous() and b.is_contiguous()
        assert a.shape == (s.groups, s.m, s.k) and b.shape == (s.groups, s.n, s.k)
        c = torch.full((s.groups, s.m, s.n), -1, dtype=torch.int32)
        bufs = {"A": a, "B": b, "C": c}
        self.launch([bufs[p].data_ptr() for p in self.params])
        return c


@pytest.fixture(scope="module")
def emulated(cuda, tmp_path_factory):
    """The kernel every CudaGemm test case below pads to (G=2, M<=64, N<=128, K chunks <=32)."""
    return Emulated(cuda, cuda.padded(2, 64, 128, 32), tmp_path_factory.mktemp("emu"))


@pytest.mark.parametrize("G,M,N,K,tile", [(2, 200, 150, 70, None), (1, 65, 33, 130, (64, 32, 64, 4, 2))])
def test_generated_kernel_is_exact_in_emulation(cuda, tmp_path, G, M, N, K, tile):
    shape = cuda.padded(G, M, N, K, cuda.CudaTile(*tile) if tile else None)
    run = Emulated(cuda, shape, tmp_path)
    gen = torch.Generator().manual_seed(0)
    a = codes((shape.groups, shape.m, shape.k), torch.int8, gen)
    b = codes((shape.groups, shape.n, shape.k), torch.int8, gen)
    a[0, 0, :], b[0, 0, :] = -128, -128  # the extreme product
    assert torch.equal(run(a, b).long(), reference(a, b))


class StandInGemm(CudaGemm):
    """``CudaGemm`` with the kernel call replaced: a torch reference, or the emulated kernel
    ``run``. Checks what the kernel is given: contiguous int8 operands padded to its shape."""

    def __init__(self, run=None, **kw):
        super().__init__(**kw)
        self.run, self.calls = run, []

    def _s8_gemm(self, a, b, shape):
        assert (shape.groups, shape.m, shape.n, shape.k) == (*a.shape[:2], b.shape[1], a.shape[2])
        assert a.dtype == b.dtype == torch.int8 and a.is_contiguous() and b.is_contiguous()
        self.calls.append(shape)
        if self.run is not None:
            return self.run(a, b)
        c = reference(a, b)
        assert c.abs().max() < 2**31
        return c.int()


@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
@pytest.mark.parametrize(
    "G,M,N,K,max_k",
    [
        (1, 1, 1, 1, MAX_K),
        (3, 5, 7, 13, MAX_K),
        (2, 37, 130, 1000, 64),
        (1, 9, 4, 301, 100),
        (2, 3, 2, 50, 7),
    ],
)
def test_sign_corrections_and_k_split(cuda, a_dtype, b_dtype, G, M, N, K, max_k):
    gen = torch.Generator().manual_seed(G * 1000 + M * 100 + N * 10 + K)
    a, b = codes((G, M, K), a_dtype, gen), codes((G, N, K), b_dtype, gen)
    gemm = StandInGemm(max_k=max_k)
    c = gemm.gemm(a, b)
    assert c.dtype == (torch.int32 if K <= max_k else torch.int64)
    assert torch.equal(c.long(), reference(a, b))
    assert len(gemm.calls) == -(-K // max_k)


def test_strided_operands(cuda):
    gen = torch.Generator().manual_seed(1)
    a = codes((2, 40, 9), torch.uint8, gen).mT  # (2, 9, 40), K-strided
    b = codes((2, 30, 50), torch.int8, gen)[:, ::3, 5:45]  # (2, 10, 40)
    assert torch.equal(StandInGemm(max_k=16).gemm(a, b).long(), reference(a, b))


def test_extreme_values_and_the_result_dtype(cuda):
    g = CudaGemm()
    K = MAX_K
    cases = [
        (torch.int8, -128, torch.int8, -128, K, torch.int32),  # 2**30
        (torch.uint8, 255, torch.int8, -128, K, torch.int32),  # -255·128·65536 > -2**31
        (torch.uint8, 255, torch.uint8, 255, 33025, torch.int32),  # 255²·33025 < 2**31
        (torch.uint8, 255, torch.uint8, 255, 33026, torch.int64),
        (torch.int8, -128, torch.int8, -128, K + 1, torch.int64),
    ]  # split
    for a_dtype, av, b_dtype, bv, k, dtype in cases:
        assert g.out_dtype(a_dtype, b_dtype, k) == dtype
        a = torch.full((1, 2, k), av, dtype=a_dtype)
        b = torch.full((1, 3, k), bv, dtype=b_dtype)
        c = StandInGemm().gemm(a, b)
        assert c.dtype == dtype and torch.equal(c.long(), reference(a, b))


def test_bad_operands(cuda):
    g = CudaGemm()
    with pytest.raises(ValueError):
        g.gemm(torch.zeros(2, 3, 4, dtype=torch.int8), torch.zeros(2, 3, 5, dtype=torch.int8))
    with pytest.raises(TypeError):
        g.gemm(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4, dtype=torch.int8))
    with pytest.raises(ValueError):
        CudaGemm(max_k=MAX_K + 1)
    empty = g.gemm(torch.zeros(1, 0, 4, dtype=torch.int8), torch.zeros(1, 3, 4, dtype=torch.int8))
    assert empty.shape == (1, 0, 3)


@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
def test_cuda_gemm_with_the_emulated_kernel(cuda, emulated, a_dtype, b_dtype):
    """All of CudaGemm on the CPU: shifts, a K split (max_k 32), padding, and the real kernel's
    code with its launch geometry and parameter order. Every case pads to one kernel shape."""
    gen = torch.Generator().manual_seed(7)
    a, b = codes((2, 37, 45), a_dtype, gen), codes((2, 70, 45), b_dtype, gen)
    gemm = StandInGemm(emulated, max_k=32, kernel="dp4a")
    c = gemm.gemm(a, b)
    assert c.dtype == torch.int64 and torch.equal(c, reference(a, b))
    assert gemm.calls == [emulated.shape] * 2


# -- the driver ------------------------------------------------------------------------------------
def test_cuda_error_names_the_driver_error():
    class FakeLib:
        @staticmethod
        def cuGetErrorName(code, out):
            out._obj.value = b"CUDA_ERROR_INVALID_IMAGE"
            return 0

        @staticmethod
        def cuGetErrorString(code, out):
            out._obj.value = b"device kernel image is invalid"
            return 0

    drv = _Driver.__new__(_Driver)
    drv.lib = FakeLib()
    with pytest.raises(
        CUDAError,
        match="cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE "
        r"\(200\): device kernel image is invalid",
    ) as e:
        drv.check("cuModuleLoadData", 200)
    assert e.value.name == "CUDA_ERROR_INVALID_IMAGE" and e.value.code == 200


class FakeDriver:
    """Stands in for libcuda: hands out handles, checks that contexts are pushed around module
    loads and launches, and runs a launch with the emulated kernel (the "device pointers" are
    CPU tensors' ``data_ptr()``)."""

    def __init__(self, emulated, image):
        self.emulated, self.image, self.calls, self.depth = emulated, image, [], 0

    def __call__(self, name, *args):
        self.calls.append(name)
        if name == "cuDeviceGet":
            args[0]._obj.value = args[1]
        elif name == "cuDevicePrimaryCtxRetain":
            args[0]._obj.value = 0xC0
        elif name == "cuCtxPushCurrent_v2":
            assert args[0].value == 0xC0
            self.depth += 1
        elif name == "cuCtxPopCurrent_v2":
            self.depth -= 1
        elif name == "cuModuleLoadData":
            assert self.depth == 1 and args[1].raw == self.image + b"\0"
            args[0]._obj.value = 0x111
        elif name == "cuModuleGetFunction":
            assert args[1].value == 0x111 and args[2] == self.emulated.name.encode()
            args[0]._obj.value = 0x222
        elif name == "cuLaunchKernel":
            f, grid, block, shmem, stream, params, extra = (
                args[0],
                args[1:4],
                args[4:7],
                args[7],
                args[8],
                args[9],
                args[10],
            )
            assert self.depth == 1 and f.value == 0x222 and shmem == 0 and extra is None
            assert tuple(grid) == self.emulated.grid and tuple(block) == self.emulated.block
            assert stream.value == 0x5
            ptrs = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_void_p)).contents.value for i in range(3)]
            self.emulated.launch(ptrs)
        else:
            raise AssertionError(name)


def test_cuda_gemm_through_the_driver_path(cuda, emulated, tmp_path, monkeypatch):
    """CudaGemm's GPU path on the CPU: arch choice, the (real, nvcc-built) cubin through the disk
    cache, the launch geometry and argument marshalling of cuLaunchKernel, with a fake driver
    whose launch runs the emulated kernel."""
    from types import SimpleNamespace

    from fraccompile.targets.runtime import cuda_driver

    needs_nvcc()
    fake = FakeDriver(emulated, cuda_driver.load_or_build(emulated.shape, "sm_90", "cubin", tmp_path))
    monkeypatch.setattr(cuda_driver, "driver", lambda: fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(cuda_stream=5))
    cuda_driver._primary_context.cache_clear()
    try:
        gen = torch.Generator().manual_seed(3)
        for a_dtype, b_dtype in DTYPES:
            a, b = codes((2, 50, 40), a_dtype, gen), codes((2, 99, 40), b_dtype, gen)
            gemm = CudaGemm(max_k=32, cache_dir=tmp_path, kernel="dp4a")
            assert torch.equal(gemm.gemm(a, b), reference(a, b))
    finally:
        cuda_driver._primary_context.cache_clear()
    assert fake.depth == 0
    assert fake.calls.count("cuModuleLoadData") == len(DTYPES)  # once per CudaGemm and device
    assert fake.calls.count("cuLaunchKernel") == 2 * len(DTYPES)  # two K chunks each


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible (the next test)")
def test_gpu_unavailable_reason_without_a_gpu():
    reason = gpu_unavailable_reason()
    assert isinstance(reason, str) and "torch.cuda.is_available() is False" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible to torch")
def test_gpu_unavailable_reason_on_a_gpu():
    """With a GPU: no reason on compute capability 8.0 and newer (the driver loads), and the
    reason names the capability on older ones; the arch chosen for it is one we build."""
    from fraccompile.targets.kernels.cuda import ARCHS

    reason = gpu_unavailable_reason()
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        assert reason is None, reason
        arch, fmt = arch_for((major, minor))
        assert arch in ARCHS and fmt in ("cubin", "ptx")
    else:
        assert reason == (f"compute capability {major}.{minor}: the kernels are built for 8.0 and newer")


def test_importing_fraccompile_does_not_import_tvm():
    code = (
        "import sys, fraccompile, fraccompile.targets, fraccompile.targets.runtime.cuda_driver as d; "
        "d.gpu_unavailable_reason(); d.CudaGemm(); "
        "assert 'tvm' not in sys.modules, 'tvm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


# -- on a GPU --------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
@pytest.mark.parametrize(
    "G,M,N,K", [(1, 1, 1, 1), (3, 5, 7, 13), (2, 37, 130, 1000), (1, 200, 129, 77), (1, 512, 384, 256)]
)
def test_gpu_exact(a_dtype, b_dtype, G, M, N, K):
    gen = torch.Generator().manual_seed(0)
    a, b = codes((G, M, K), a_dtype, gen), codes((G, N, K), b_dtype, gen)
    c = CudaGemm(kernel="dp4a").gemm(a.cuda(), b.cuda())
    assert c.is_cuda and c.dtype == torch.int32
    assert torch.equal(c.cpu().long(), reference(a, b))


@gpu
@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
def test_gpu_k_split_and_strided_operands(a_dtype, b_dtype):
    gen = torch.Generator().manual_seed(1)
    a = codes((2, 100, 33), a_dtype, gen).mT  # (2, 33, 100)
    b = codes((2, 21, 100), b_dtype, gen)
    c = CudaGemm(max_k=40, kernel="dp4a").gemm(a.cuda(), b.cuda())
    assert c.dtype == torch.int64 and torch.equal(c.cpu(), reference(a, b))


@gpu
def test_gpu_extremes_and_stream():
    k = MAX_K
    a = torch.full((1, 3, k), 255, dtype=torch.uint8)
    b = torch.full((1, 2, k), -128, dtype=torch.int8)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        c = CudaGemm(kernel="dp4a").gemm(a.cuda(), b.cuda())
    s.synchronize()
    assert torch.equal(c.cpu().long(), reference(a, b))


@gpu
@pytest.mark.parametrize("weight_scale", ["channel", "tensor"])
def test_gpu_training_step_matches_the_reference_backend(weight_scale):
    """A step of a small conv + linear + matmul model on the GPU: the tvm backend (dp4a GEMMs)
    gives the reference backend's loss and gradients (TF32 off, so the reference is plain fp32).
    With one weight range per tensor the linear sites' error backprop runs on dp4a too."""
    import copy

    import torch.nn.functional as F

    import fraccompile
    from fraccompile import FracConfig

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.b = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 24)
            self.out = torch.nn.Linear(24, 10)

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))
            h = self.fc(h)
            return self.out(h + (h.unsqueeze(2) @ h.unsqueeze(1)).mean(2))

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(6, 3, 10, 10), torch.randint(0, 10, (6,))
    out = {}
    for be in ("reference", "tvm"):
        m = copy.deepcopy(model)
        cfg = FracConfig(scheme="symmetric", backend=be, full_precision=("out",), weight_scale=weight_scale)
        fm = fraccompile.compile(m, x, cfg).cuda()
        torch.manual_seed(1)
        loss = F.cross_entropy(fm(x.cuda()), y.cuda())
        loss.backward()
        out[be] = (loss.detach().cpu(), [p.grad.cpu() for p in m.parameters()])
    assert torch.allclose(out["reference"][0], out["tvm"][0], rtol=1e-4)
    for r, g in zip(out["reference"][1], out["tvm"][1]):
        assert ((r - g).norm() / r.norm().clamp_min(1e-30)) < 1e-4
