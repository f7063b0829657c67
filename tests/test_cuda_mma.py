"""The tensor-core GEMM (fraccompile.targets.kernels.cuda_mma) and CudaGemm's use of it.

Without a GPU: tiles, padding and the K split, the generated CUDA C (mma.sync, ldmatrix, atomic
adds for split-K), nvcc's cubins for sm_80/sm_90 (ELF arch; ptxas keeps the fragments in
registers), the launch geometry, the cubin cache per kernel kind, and the generated kernels run
on the CPU by the emulator (``tests/_cuda_emulator.py``: ``ldmatrix`` and ``mma.sync`` as
warp-collective C++ with the PTX ISA's fragment layouts), exact against torch, alone, inside
CudaGemm, and through CudaGemm's driver path with a fake libcuda (which checks that C is zeroed
before a split-K launch). With a GPU: exact results against torch.
"""

import ctypes
import re
import subprocess
from types import SimpleNamespace

import pytest
import torch
from _cuda_emulator import EmulatedKernel
from _cuda_helpers import DTYPES, codes, elf_arch, gpu, needs_nvcc, reference

from fraccompile.targets import tvm_unavailable_reason
from fraccompile.targets.runtime.cuda_driver import MAX_K, CudaGemm

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


@pytest.fixture(scope="module")
def mma():
    from fraccompile.targets.kernels import cuda_mma

    return cuda_mma


# -- tiles, shapes, K split ------------------------------------------------------------------------
def test_padded_rounds_to_the_tile_and_the_k_split(mma):
    s = mma.padded(3, 100, 70, 33)
    assert (s.groups, s.m, s.n, s.k, s.split_k) == (3, 128, 128, 64, 1)
    assert s.tile == mma.MmaTile(128, 128, 64, 64, 32) and s.zero == ()
    assert s.name == "cuda_mma_g3_m128_n128_k64_s1_t128x128x64_w64x32"
    assert mma.padded(1, 20, 50, 1).tile == mma.MmaTile(32, 64, 64, 32, 32)
    # few output tiles and a long K (the weight gradient): K cut into equal pieces of whole steps
    s = mma.padded(1, 512, 512, 8192)
    assert (s.split_k, s.k, s.zero) == (16, 8192, ("C",))
    assert s.name == "cuda_mma_g1_m512_n512_k8192_s16_t128x128x64_w64x32"
    s = mma.padded(1, 512, 512, 1000)  # 16 steps of 64: 4 pieces of 4 steps
    assert (s.split_k, s.k) == (4, 1024)
    assert mma.padded(1, 4096, 4096, 4096).split_k == 1  # 1024 tiles fill the GPU
    assert mma.padded(1, 128, 128, 7 * 64).split_k == 1  # fewer than 8 K steps
    assert mma.padded(1, 512, 512, 8192, split_k=1).split_k == 1
    s = mma.padded(2, 65, 33, 100, mma.MmaTile(64, 32, 32, 32, 32), split_k=3)
    assert (s.m, s.n, s.k) == (128, 64, 192)
    for size in (1, 31, 33, 64, 65, 129, 8192):  # padding with the split it chose is idempotent
        s = mma.padded(1, size, size, size)
        assert mma.padded(1, s.m, s.n, s.k, split_k=s.split_k) == s
        assert s.k % (s.tile.bk * s.split_k) == 0 and s.k >= size


@pytest.mark.parametrize(
    "tile,match",
    [
        (dict(wm=24), "multiples of 16"),
        (dict(bk=48), "multiples of 16, bk of 32"),
        (dict(bm=96), "must divide the block tile"),
        (dict(wm=128, wn=64), "256 accumulators"),
        (dict(bm=256, bn=256, wm=32, wn=32), "2048 threads"),
        (dict(bm=32, bn=128, bk=32, wm=32, wn=32), "cannot copy the tiles in 16-byte steps"),
        (dict(bk=256), "bytes of shared memory"),
        (dict(bn=0), "sizes must be positive"),
    ],
)
def test_bad_tiles_are_rejected(mma, tile, match):
    with pytest.raises(ValueError, match=match):
        mma.MmaTile(**tile)


def test_bad_shapes_and_options_are_rejected(mma):
    with pytest.raises(ValueError, match="not padded to its tile and K split"):
        mma.MmaGemmShape(1, 128, 128, 64, mma.MmaTile(), split_k=2)
    with pytest.raises(ValueError, match="bad shape"):
        mma.MmaGemmShape(0, 128, 128, 64, mma.MmaTile())
    with pytest.raises(ValueError, match="split_k=0"):
        mma.padded(1, 64, 64, 64, split_k=0)
    with pytest.raises(ValueError, match="kernel='wmma'"):
        CudaGemm(kernel="wmma")
    with pytest.raises(ValueError, match="only the mma kernel splits K"):
        CudaGemm(kernel="dp4a", split_k=2)
    with pytest.raises(ValueError, match="with a mma tile"):
        CudaGemm(kernel="dp4a", tile=mma.MmaTile())
    with pytest.raises(ValueError, match="expected one of sm_80, sm_90"):
        mma.compile_cubin(mma.padded(1, 32, 32, 64), "sm_75")


LAUNCH_SHAPES = [
    (1, 128, 128, 512, None, 1),
    (2, 200, 150, 70, None, 1),
    (3, 5, 300, 7, None, 1),
    (1, 512, 512, 8192, None, None),
    (2, 65, 33, 100, (64, 32, 32, 32, 32), 3),
]


@pytest.mark.parametrize("G,M,N,K,tile,split", LAUNCH_SHAPES)
def test_launch_config_covers_the_output(mma, G, M, N, K, tile, split):
    s = mma.padded(G, M, N, K, mma.MmaTile(*tile) if tile else None, split)
    grid, block, name, params, zero = mma.launch_config(s)
    t = s.tile
    assert grid == (s.m // t.bm, s.n // t.bn, s.split_k * G)
    assert block == (32, t.warps, 1) and t.warps == (t.bm // t.wm) * (t.bn // t.wn)
    # every warp owns a wm x wn tile of its block: the grid covers C once per K piece
    assert grid[0] * t.bm == s.m and grid[1] * t.bn == s.n
    assert name == f"{s.name}_kernel" and sorted(params) == ["A", "B", "C"]
    assert zero == (("C",) if s.split_k > 1 else ())
    src = mma.generate_source(s)
    assert f"__launch_bounds__({t.threads}) {name}(" in src
    assert ("atomicAdd(" in src) == (s.split_k > 1)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_generated_source_uses_ldmatrix_and_mma(mma, arch):
    src = mma.generate_source(mma.padded(1, 128, 128, 512), arch)
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src
    assert "__shared__" in src and "__syncthreads()" in src and "__dp4a" not in src.split("__global__")[-1]
    # fragments indexed per lane (no threadIdx in a fragment offset), no self-shuffles
    assert not re.search(r"_shared_warp_ptr \+ [^;]*threadIdx", src)
    assert "__shfl_sync" not in src
    assert re.search(r"int C_warp_ptr\[64\]", src)  # 64 x 32 warp tile: 64 accumulators per lane
    # two shared stages: the next step's tiles by 16-byte cp.async, one commit group per step
    assert "cp.async.cg.shared.global [%0], [%1], %2;" in src and '"n"(16)' in src
    assert "cp.async.commit_group" in src and "cp.async.wait_group 1" in src
    assert mma.MmaTile().shared_bytes == 2 * (128 + 128) * 80 == 40960


def test_combined_source_holds_every_kernel(mma):
    """``fraccompile export --target cuda`` compiles one source of all a model's kernels."""
    shapes = [mma.padded(1, 512, 512, 8192), mma.padded(2, 64, 64, 64)]
    src = mma.combined_source(shapes)
    for s in shapes:
        assert re.search(rf"__launch_bounds__\({s.tile.threads}\) {s.name}_kernel\(", src)
    assert src.count("atomicAdd(") == mma.generate_source(shapes[0]).count("atomicAdd(") > 0


# -- nvcc ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_cubin(mma, arch):
    needs_nvcc()
    cubin = mma.compile_cubin(mma.padded(1, 512, 512, 8192), arch)
    assert elf_arch(cubin) == int(arch[3:])
    ptx = mma.compile_source(mma.generate_source(mma.padded(1, 128, 128, 512), arch), arch, "ptx").decode()
    assert f".target {arch}" in ptx and "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in ptx


@pytest.mark.parametrize("split", [1, 16])
def test_ptxas_keeps_the_fragments_in_registers(mma, tmp_path, split):
    """The default tile compiles without local memory: no stack frame, no spills (a fragment
    indexed by lane, or an unrolling that defeats nvcc, shows up here first)."""
    needs_nvcc()
    src = tmp_path / "k.cu"
    src.write_text(mma.generate_source(mma.padded(1, 512, 512, 8192, split_k=split), "sm_80"))
    cmd = [mma.cuda.nvcc_path(), "--cubin", "-O3", "-arch=sm_80", "-w", "-Xptxas", "-v"]
    out = subprocess.run([*cmd, "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in out.stderr, out.stderr


def test_cubin_cache_keys_on_the_kernel_kind(mma, tmp_path, monkeypatch):
    from fraccompile.targets.kernels import cuda
    from fraccompile.targets.runtime import cuda_driver

    needs_nvcc()
    s, d = mma.padded(1, 32, 32, 64), cuda.padded(1, 32, 32, 64)
    assert cuda_driver.kind_of(s) == "mma" and cuda_driver.kind_of(d) == "dp4a"
    assert mma.source_hash() != cuda.source_hash()
    paths = {cuda_driver.kernel_path(x, "sm_80", "cubin", tmp_path) for x in (s, d)}
    assert len(paths) == 2 and all(p.parent == tmp_path for p in paths)
    first = cuda_driver.load_or_build(s, "sm_80", "cubin", tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == [
        cuda_driver.kernel_path(s, "sm_80", "cubin", tmp_path).name
    ]
    assert elf_arch(first) == 80

    def no_nvcc(*args):
        raise AssertionError("rebuilt a cached kernel")

    monkeypatch.setattr(cuda, "compile_source", no_nvcc)
    assert cuda_driver.load_or_build(s, "sm_80", "cubin", tmp_path) == first


# -- the generated kernels, run on the CPU ---------------------------------------------------------
class Emulated(EmulatedKernel):
    """The mma kernel generated for ``shape``, run on the CPU by the emulator; called like the
    kernel, on padded int8 operands, into a C that is zeroed when the launch says so (else
    filled with garbage the kernel must overwrite)."""

    def __init__(self, mma, shape, workdir):
        self.shape = shape
        grid, block, name, params, self.zero = mma.launch_config(shape)
        super().__init__(mma.generate_source(shape), name, grid, block, params, workdir, shape.name)

    def __call__(self, a, b, c=None):
        s = self.shape
        assert a.dtype == b.dtype == torch.int8 and a.is_contiguous() and b.is_contiguous()
        assert a.shape == (s.groups, s.m, s.k) and b.shape == (s.groups, s.n, s.k)
        if c is None:
            c = torch.full((s.groups, s.m, s.n), 0 if "C" in self.zero else -1, dtype=torch.int32)
        bufs = {"A": a, "B": b, "C": c}
        self.launch([bufs[p].data_ptr() for p in self.params])
        return c


EMULATED = [
    (1, 32, 32, 64, (32, 32, 32, 32, 32), 1),  # one warp
    (1, 128, 128, 64, None, 1),  # the default tile: 8 warps of 64 x 32
    (3, 40, 20, 100, None, 1),  # padded odd sizes, 64 x 32 blocks of 2 warps
    (2, 96, 64, 192, (32, 64, 64, 32, 32), 3),  # split-K into 3 pieces, C of 2*96*64 (not 2^k)
]


@pytest.mark.parametrize("G,M,N,K,tile,split", EMULATED)
def test_generated_kernel_is_exact_in_emulation(mma, tmp_path, G, M, N, K, tile, split):
    shape = mma.padded(G, M, N, K, mma.MmaTile(*tile) if tile else None, split)
    run = Emulated(mma, shape, tmp_path)
    gen = torch.Generator().manual_seed(0)
    a = codes((shape.groups, shape.m, shape.k), torch.int8, gen)
    b = codes((shape.groups, shape.n, shape.k), torch.int8, gen)
    a[0, 0, :], b[0, 0, :] = -128, -128  # the extreme product over the whole K
    a[-1, -1, :], b[-1, -1, :] = -128, 127
    assert torch.equal(run(a, b).long(), reference(a, b))


def test_split_k_adds_into_c(mma, tmp_path):
    """Extreme codes everywhere, in groups and K pieces; the split-K kernel adds into C (the
    caller must zero it): a second launch doubles the result."""
    shape = mma.padded(2, 64, 64, 256, mma.MmaTile(64, 64, 64, 32, 32), split_k=2)
    run = Emulated(mma, shape, tmp_path)
    a = torch.full((2, 64, 256), -128, dtype=torch.int8)
    b = torch.full((2, 64, 256), -128, dtype=torch.int8)
    b[1, ::2] = 127
    c = run(a, b)
    assert torch.equal(c.long(), reference(a, b)) and c[0, 0, 0] == 128 * 128 * 256
    assert torch.equal(run(a, b, c).long(), 2 * reference(a, b))


def test_emulator_refuses_inline_ptx_it_does_not_know():
    from _cuda_emulator import replace_inline_ptx

    body = 'void k() { __asm__ __volatile__("cp.async.bulk.shared.global [%0], [%1], 16;" :: "r"(a)); }'
    with pytest.raises(ValueError, match="cannot run this inline PTX: 'cp.async.bulk.shared.global"):
        replace_inline_ptx(body)
    cp = '__asm__ __volatile__("cp.async.cg.shared.global [%0], [%1], %2;" :: "r"(a), "l"(b), "n"(16));'
    assert replace_inline_ptx(cp) == "std::memcpy((void*)(a), (const void*)(b), 16);"  # synchronous
    ldm = (
        '__asm__ __volatile__("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16" "{%0, %1}, [%2];"'
        ' : "=r"(x[0]), "=r"(x[1]) : "r"(p));'
    )
    assert replace_inline_ptx(ldm) == (
        "{ void* const o[] = {(void*)&(x[0]), (void*)&(x[1])}; emu_ldmatrix(2, true, (uintptr_t)(p), o); }"
    )


class StandInGemm(CudaGemm):
    """``CudaGemm`` with the kernel call replaced by the emulated kernel ``run``; checks what
    the kernel is given."""

    def __init__(self, run, **kw):
        super().__init__(**kw)
        self.run, self.calls = run, []

    def _s8_gemm(self, a, b, shape):
        assert (shape.groups, shape.m, shape.n, shape.k) == (*a.shape[:2], b.shape[1], a.shape[2])
        self.calls.append(shape)
        return self.run(a, b)


SPLIT_TILE = (32, 64, 32, 32, 32)


@pytest.fixture(scope="module")
def emulated_split(mma, tmp_path_factory):
    """The split-K kernel every CudaGemm case below pads to (G=2, M<=32, N<=64, K chunks <= 64)."""
    shape = mma.padded(2, 32, 64, 64, mma.MmaTile(*SPLIT_TILE), split_k=2)
    return Emulated(mma, shape, tmp_path_factory.mktemp("emu"))


@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
def test_cuda_gemm_with_the_emulated_kernel(mma, emulated_split, a_dtype, b_dtype):
    """All of CudaGemm on the CPU with the mma kernel: shifts, a K split into chunks (max_k 64)
    and pieces (split_k 2), padding. Every chunk pads to the one emulated kernel."""
    gen = torch.Generator().manual_seed(7)
    a, b = codes((2, 30, 100), a_dtype, gen), codes((2, 50, 100), b_dtype, gen)
    gemm = StandInGemm(emulated_split, max_k=64, tile=mma.MmaTile(*SPLIT_TILE), split_k=2)
    c = gemm.gemm(a, b)
    assert c.dtype == torch.int64 and torch.equal(c, reference(a, b))
    assert gemm.calls == [emulated_split.shape] * 2


def test_kernel_kind_choice(mma, monkeypatch):
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap["value"])
    dev = torch.device("cuda", 0)
    assert CudaGemm().kind_for(dev) == "mma"
    cap["value"] = (7, 5)
    assert CudaGemm().kind_for(dev) == "dp4a"
    assert CudaGemm(kernel="mma").kind_for(dev) == "mma"
    assert CudaGemm(tile=mma.MmaTile()).kind_for(dev) == "mma"
    cap["value"] = (8, 0)
    assert CudaGemm(kernel="dp4a").kind_for(dev) == "dp4a"
    assert CudaGemm(library=SimpleNamespace(kind="dp4a")).kind_for(dev) == "dp4a"  # an older export
    assert CudaGemm().kind_for(torch.device("cpu")) == "mma"
    assert CudaGemm(kernel="dp4a").padded_shape(1, 5, 5, 5).name.startswith("cuda_gemm_")
    assert CudaGemm(split_k=4).padded_shape(1, 5, 5, 5).split_k == 4


class FakeDriver:
    """Stands in for libcuda (as in test_cuda.py) and runs a launch with the emulated kernel,
    after checking the launch geometry and that C was zeroed when the kernel adds into it."""

    def __init__(self, emulated, image):
        self.emulated, self.image, self.calls, self.depth = emulated, image, [], 0

    def __call__(self, name, *args):
        self.calls.append(name)
        if name == "cuDeviceGet":
            args[0]._obj.value = args[1]
        elif name == "cuDevicePrimaryCtxRetain":
            args[0]._obj.value = 0xC0
        elif name in ("cuCtxPushCurrent_v2", "cuCtxPopCurrent_v2"):
            self.depth += 1 if name == "cuCtxPushCurrent_v2" else -1
        elif name == "cuModuleLoadData":
            assert self.depth == 1 and args[1].raw == self.image + b"\0"
            args[0]._obj.value = 0x111
        elif name == "cuModuleGetFunction":
            assert args[2] == self.emulated.name.encode()
            args[0]._obj.value = 0x222
        elif name == "cuLaunchKernel":
            grid, block, params = tuple(args[1:4]), tuple(args[4:7]), args[9]
            assert self.depth == 1 and (grid, block) == (self.emulated.grid, self.emulated.block)
            ptrs = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_void_p)).contents.value for i in range(3)]
            s = self.emulated.shape
            c = ptrs[self.emulated.params.index("C")]
            assert set((ctypes.c_int32 * (s.groups * s.m * s.n)).from_address(c)) == {0}, "C not zeroed"
            self.emulated.launch(ptrs)
        else:
            raise AssertionError(name)


def test_cuda_gemm_through_the_driver_path(mma, emulated_split, tmp_path, monkeypatch):
    """CudaGemm's GPU path on the CPU with the split-K mma kernel: the nvcc-built cubin through
    the disk cache, the launch geometry, C zeroed before each launch (torch.zeros: an output of
    torch.empty would hold the previous call's sums), and a fake driver running the emulation."""
    from fraccompile.targets.runtime import cuda_driver

    needs_nvcc()
    fake = FakeDriver(
        emulated_split, cuda_driver.load_or_build(emulated_split.shape, "sm_90", "cubin", tmp_path)
    )
    monkeypatch.setattr(cuda_driver, "driver", lambda: fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(cuda_stream=5))
    cuda_driver._primary_context.cache_clear()
    try:
        gen = torch.Generator().manual_seed(3)
        gemm = CudaGemm(max_k=64, cache_dir=tmp_path, tile=mma.MmaTile(*SPLIT_TILE), split_k=2)
        for a_dtype, b_dtype in DTYPES:
            a, b = codes((2, 31, 120), a_dtype, gen), codes((2, 64, 120), b_dtype, gen)
            assert torch.equal(gemm.gemm(a, b), reference(a, b))
    finally:
        cuda_driver._primary_context.cache_clear()
    assert fake.depth == 0
    assert fake.calls.count("cuModuleLoadData") == 1  # one kernel shape, loaded once
    assert fake.calls.count("cuLaunchKernel") == 2 * len(DTYPES)  # two K chunks each


# -- on a GPU --------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
@pytest.mark.parametrize(
    "G,M,N,K",
    [
        (1, 1, 1, 1),
        (3, 5, 7, 13),
        (2, 37, 130, 1000),
        (1, 200, 129, 77),
        (1, 64, 96, 9000),
        (1, 512, 512, 8192),
    ],
)
def test_gpu_exact(a_dtype, b_dtype, G, M, N, K):
    """The mma kernel (CudaGemm's default on 8.0+), split-K for the long-K cases."""
    gen = torch.Generator().manual_seed(0)
    a, b = codes((G, M, K), a_dtype, gen), codes((G, N, K), b_dtype, gen)
    gemm = CudaGemm()
    assert gemm.kind_for(torch.device("cuda")) == "mma"
    c = gemm.gemm(a.cuda(), b.cuda())
    assert c.is_cuda and torch.equal(c.cpu().long(), reference(a, b))


@gpu
def test_gpu_extremes_strides_and_stream():
    a = torch.full((1, 3, MAX_K), 255, dtype=torch.uint8)
    b = torch.full((1, 2, MAX_K), -128, dtype=torch.int8)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        c = CudaGemm().gemm(a.cuda(), b.cuda())  # split-K: C zeroed on the side stream
        c2 = CudaGemm(split_k=1).gemm(a.cuda(), b.cuda())
    s.synchronize()
    assert torch.equal(c.cpu().long(), reference(a, b)) and torch.equal(c2.cpu(), c.cpu())
    gen = torch.Generator().manual_seed(1)
    a = codes((2, 100, 33), torch.uint8, gen).mT
    b = codes((2, 21, 100), torch.int8, gen)
    assert torch.equal(CudaGemm(max_k=40).gemm(a.cuda(), b.cuda()).cpu(), reference(a, b))
