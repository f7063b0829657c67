"""The tensor-core GEMM with the dequantize fused in its write-back
(fraccompile.targets.kernels.cuda_epilogue), its runtime (runtime/cuda_epilogue.py) and the GPU
branch of ``IntegerGemms.gemm_f32`` on it.

Without a GPU: shapes and refusals, the generated CUDA C for sm_80/sm_90 (mma.sync, no atomics, no
shuffles, the fp32 operations as ``__fmul_rn``/``__fadd_rn``), cubins and ptxas with no spills, the
kernel run by the CPU emulator of CUDA threads against a float64 reference of the formula (and bit
for bit against fp32 in the same operation order), the runtime's corrections, fallbacks and
exported-library check with a torch stand-in for the launch, gemm_f32 fused against gemm_f32
unfused, and a training step on the GPU branch with the fused path (no host reads, the reference
backend's loss and gradients). With a GPU: the fused kernel against the unfused path.
"""

import subprocess
from types import SimpleNamespace

import pytest
import torch
from _cuda_emulator import EmulatedKernel
from _cuda_helpers import DTYPES, codes, elf_arch, gpu, needs_nvcc, reference

from fraccompile.targets import tvm_unavailable_reason
from fraccompile.targets.runtime.cuda_driver import CudaGemm

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


@pytest.fixture(scope="module")
def ep():
    from fraccompile.targets.kernels import cuda_epilogue

    return cuda_epilogue


def _shape(G, M, N, K, tile=None, rank1=False):
    from fraccompile.targets.kernels import cuda_epilogue, cuda_mma

    gemm = cuda_mma.padded(G, M, N, K, cuda_mma.MmaTile(*tile) if tile else None, split_k=1)
    return cuda_epilogue.MmaEpilogueShape(gemm, M, N, rank1)


# -- shapes and generated code ---------------------------------------------------------------------
def test_shapes_and_refusals(ep):
    from fraccompile.targets.kernels import cuda_mma

    s = _shape(3, 100, 70, 33)
    assert s.name == "cuda_mmadq_g3_m128_n128_k64_s1_t128x128x64_w64x32_o100x70"
    assert (s.groups, s.m, s.n, s.k, s.split_k, s.zero, s.kind) == (3, 128, 128, 64, 1, (), "mma_epilogue")
    assert s.params == ("A", "B", "rc", "cc", "scale", "bias", "out")
    r = _shape(3, 100, 70, 33, rank1=True)
    assert r.name == s.name + "_pt" and r.params == ("A", "B", "rc", "cc", "scale", "bias", "p", "t", "out")
    with pytest.raises(ValueError, match="needs split_k 1"):
        ep.MmaEpilogueShape(cuda_mma.padded(1, 512, 512, 8192), 512, 512)
    with pytest.raises(ValueError, match="outside 128 x 128"):
        ep.MmaEpilogueShape(cuda_mma.padded(1, 100, 100, 64), 129, 100)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("rank1", [False, True])
def test_generated_source(ep, arch, rank1):
    s = _shape(2, 200, 70, 100, rank1=rank1)
    src = ep.generate_source(s, arch)
    grid, block, name, params, zero = ep.launch_config(s, arch)
    t = s.tile
    assert grid == (s.m // t.bm, s.n // t.bn, 2) and block == (32, t.warps, 1) and zero == ()
    assert sorted(params) == sorted(s.params) and f"__launch_bounds__({t.threads}) {name}(" in src
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in src and "ldmatrix.sync" in src
    assert "atomicAdd" not in src and "__shfl_sync" not in src and "C_ptr" not in src
    assert "__fadd_rn(__fmul_rn(((float)" in src  # the scale, then the rest, no FMA contraction
    assert ("__fmul_rn(p_ptr[" in src) == rank1
    plain = ep.cuda_mma.generate_source(s.gemm, arch)
    assert src.count("out_ptr[") == src.count("if (") - plain.count("if (") == 8  # 8 per lane, guarded


def test_no_guard_without_padding(ep):
    s = _shape(1, 128, 128, 64)
    src, plain = ep.generate_source(s), ep.cuda_mma.generate_source(s.gemm)
    assert src.count("out_ptr[") == 8 and src.count("if (") == plain.count("if (")


@pytest.mark.parametrize("rank1", [False, True])
def test_ptxas_keeps_the_accumulators_in_registers(ep, tmp_path, rank1):
    """The default 128 × 128 tile with the fused write-back: no stack frame, no spills, for sm_80
    and sm_90 (a cubin of each)."""
    needs_nvcc()
    s = _shape(1, 500, 300, 512, rank1=rank1)
    for arch in ("sm_80", "sm_90"):
        src = tmp_path / f"k{arch}.cu"
        src.write_text(ep.generate_source(s, arch))
        cmd = [ep.cuda.nvcc_path(), "--cubin", "-O3", f"-arch={arch}", "-w", "-Xptxas", "-v"]
        cubin = tmp_path / f"k{arch}.cubin"
        out = subprocess.run([*cmd, "-o", str(cubin), str(src)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in out.stderr, out.stderr
        assert elf_arch(cubin.read_bytes()) == int(arch[3:])


# -- the kernel in the emulator --------------------------------------------------------------------
class Emulated(EmulatedKernel):
    """The fused kernel for ``shape`` on the CPU; called with the buffers by name."""

    def __init__(self, ep, shape, workdir):
        self.shape = shape
        grid, block, name, params, _ = ep.launch_config(shape)
        super().__init__(ep.generate_source(shape), name, grid, block, params, workdir, shape.name)

    def __call__(self, buffers):
        self.launch([buffers[p].data_ptr() for p in self.params])


def _inputs(shape, gen, extreme=False):
    """Padded operands (garbage in the padding rows, zeros past K), unpadded corrections,
    scales, bias and rank-one term, and an output inside a NaN-filled buffer."""
    G, M, N, K = shape.groups, shape.rows, shape.cols, shape.k - 7  # the last 7 columns: K padding
    A = codes((G, shape.m, shape.k), torch.int8, gen)
    B = codes((G, shape.n, shape.k), torch.int8, gen)
    A[..., K:], B[..., K:] = 0, 0
    if extreme:  # the extreme products over the whole K, in the first and the last group
        A[0, 0, :K], B[0, 0, :K] = -128, -128
        A[-1, M - 1, :K], B[-1, N - 1, :K] = -128, 127
    flat = torch.full((G * M * N + 64,), float("nan"))
    buffers = {
        "A": A,
        "B": B,
        "rc": torch.randint(-(2**20), 2**20, (G, M), dtype=torch.int32, generator=gen),
        "cc": torch.randint(-(2**20), 2**20, (G, N), dtype=torch.int32, generator=gen),
        "scale": torch.randn(N, generator=gen) * 1e-3,
        "bias": torch.randn(N, generator=gen),
        "out": flat[: G * M * N].view(G, M, N),
    }
    if shape.rank1:
        buffers["p"] = torch.randn(G, M, generator=gen)
        buffers["t"] = torch.randn(N, generator=gen)
    return buffers, flat


def _expected(shape, buf):
    """The formula in float64, and in fp32 in the kernel's operation order."""
    C = reference(buf["A"], buf["B"])[:, : shape.rows, : shape.cols]
    total = C + buf["rc"].long().unsqueeze(-1) + buf["cc"].long().unsqueeze(-2)
    f64 = total.double() * buf["scale"].double()
    f32 = total.float() * buf["scale"]
    if shape.rank1:
        f64 = f64 + buf["p"].double().unsqueeze(-1) * buf["t"].double()
        f32 = f32 + buf["p"].unsqueeze(-1) * buf["t"]
    return f64 + buf["bias"].double(), f32 + buf["bias"]


EMULATED = [
    (1, 32, 32, 64, (32, 32, 32, 32, 32), False),  # one warp, no padding
    (3, 40, 20, 100, None, True),  # odd sizes in 64 x 32 blocks of 2 warps, rank-one term
    (2, 70, 50, 64, None, False),  # 128 x 64 blocks of 4 warps, rows and columns padded
]


@pytest.mark.parametrize("G,M,N,K,tile,rank1", EMULATED)
def test_fused_kernel_in_emulation(ep, tmp_path, G, M, N, K, tile, rank1):
    shape = _shape(G, M, N, K, tile, rank1)
    run = Emulated(ep, shape, tmp_path)
    gen = torch.Generator().manual_seed(G * 100 + M)
    buf, flat = _inputs(shape, gen, extreme=True)
    run(buf)
    f64, f32 = _expected(shape, buf)
    out = buf["out"]
    assert torch.isnan(flat[G * M * N :]).all()  # nothing written past (G, M, N)
    assert torch.equal(out, f32)  # the same IEEE operations in the same order
    torch.testing.assert_close(out.double(), f64, rtol=1e-6, atol=1e-5)
    assert reference(buf["A"], buf["B"])[0, 0, 0] == 128 * 128 * (shape.k - 7)


# -- the runtime and gemm_f32 ----------------------------------------------------------------------
class StandIn(CudaGemm):
    """CudaGemm with torch for its kernels: the plain GEMM (``_s8_gemm``) and the fused one
    (``_launch`` of an epilogue shape: its formula from the operands), or the emulated fused
    kernel ``emulated`` where its shape is asked for. Checks the buffers it is given."""

    def __init__(self, emulated=None, **kw):
        super().__init__(kernel="mma", **kw)
        self.fused, self.plain, self.emulated = [], 0, emulated

    def _s8_gemm(self, a, b, shape):
        self.plain += 1
        return (a.long() @ b.long().mT).int()

    def _launch(self, shape, buf):
        assert shape.kind == "mma_epilogue" and sorted(buf) == sorted(shape.params)
        G, M, N = shape.groups, shape.rows, shape.cols
        assert buf["A"].shape == (G, shape.m, shape.k) and buf["B"].shape == (G, shape.n, shape.k)
        assert buf["A"].dtype == buf["B"].dtype == torch.int8 and buf["A"].is_contiguous()
        expected = {"rc": (G, M), "cc": (G, N), "scale": (N,), "bias": (N,), "p": (G, M), "t": (N,)}
        expected["out"] = (G, M, N)
        for name, x in buf.items():
            if name in expected:
                assert tuple(x.shape) == expected[name] and x.is_contiguous(), name
        self.fused.append(shape)
        if self.emulated is not None and self.emulated.shape == shape:
            return self.emulated(buf)
        buf["out"].copy_(_expected(shape, buf)[1])


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """CPU tensors taken for CUDA ones by the fused path."""
    from fraccompile.targets.runtime import cuda_epilogue

    monkeypatch.setattr(cuda_epilogue, "runs_kernels", lambda t: True)
    return cuda_epilogue


def _unfused(gemm, a, b, scale, bias=None, offsets=(None, None), row_term=None):
    from fraccompile.targets.backend.gemm_runtime import _dequantize

    return _dequantize(gemm.gemm(a, b, *offsets).double(), scale.double(), bias, None, row_term)


def _close(y, ref):
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref.double(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
def test_fused_gemm_corrects_signs(fused_on_cpu, a_dtype, b_dtype):
    gen = torch.Generator().manual_seed(1)
    a, b = codes((2, 30, 100), a_dtype, gen), codes((2, 50, 100), b_dtype, gen)
    scale, bias = torch.rand(50, generator=gen), torch.randn(50, generator=gen)
    gemm = StandIn()
    for bb in (None, bias):
        _close(fused_on_cpu.gemm_f32(gemm, a, b, scale, bb), _unfused(gemm, a, b, scale, bb))
    assert len(gemm.fused) == 2 and gemm.fused[0].rows == 30 and gemm.fused[0].cols == 50


def test_fused_gemm_with_device_offsets_operands_and_rank_one(fused_on_cpu):
    """Per-tensor and per-group code offsets (the quantize kernel's), the padded operands taken as
    they are, the rank-one term, and an ``out`` to write into (a non-contiguous one by a copy)."""
    gen = torch.Generator().manual_seed(2)
    gemm = StandIn()
    G, M, N, K = 3, 37, 21, 90
    a, b = codes((G, M, K), torch.int8, gen), codes((G, N, K), torch.int8, gen)
    scale = torch.rand(1, generator=gen)
    for offsets in [
        (torch.tensor([[128]]), None),
        (None, torch.tensor(128)),
        (torch.tensor([[128], [0], [128]]), torch.tensor([[0], [128], [128]])),
    ]:
        y = fused_on_cpu.gemm_f32(gemm, a, b, scale, offsets=offsets)
        _close(y, _unfused(gemm, a, b, scale, offsets=offsets))
    shape = gemm.fused[-1]
    A = torch.zeros((G, shape.m, shape.k), dtype=torch.int8)
    Bp = torch.zeros((G, shape.n, shape.k), dtype=torch.int8)
    A[:, :M, :K], Bp[:, :N, :K] = a, b
    p, t = torch.randn(G, M, generator=gen), torch.randn(N, generator=gen)
    out = torch.empty(G, M, N)
    offsets = (torch.tensor([[128]]), None)
    y = fused_on_cpu.gemm_f32(
        gemm, A[:, :M, :K], Bp[:, :N, :K], scale, None, out, offsets, (A, Bp), row_term=(p, t)
    )
    assert y is out and gemm.fused[-1].rank1
    _close(y, _unfused(gemm, a, b, scale, offsets=offsets, row_term=(p, t)))
    strided = torch.empty(G, N, M).mT
    assert fused_on_cpu.gemm_f32(gemm, a, b, scale, out=strided) is strided
    _close(strided, _unfused(gemm, a, b, scale))


def test_where_the_fused_kernel_does_not_apply(fused_on_cpu, monkeypatch):
    from fraccompile.targets.runtime import cuda_epilogue

    gen = torch.Generator().manual_seed(3)
    a, b = codes((1, 30, 100), torch.int8, gen), codes((1, 20, 100), torch.int8, gen)
    s = torch.ones(1)
    per_row = (torch.zeros(1, 30, dtype=torch.int64), None)  # a routed site's per-sample offsets
    assert fused_on_cpu.gemm_f32(StandIn(), a, b, s, offsets=per_row) is None
    assert fused_on_cpu.gemm_f32(StandIn(max_k=64), a, b, s) is None  # K over one kernel call
    assert fused_on_cpu.gemm_f32(StandIn(split_k=2), a, b, s) is None  # split-K: atomicAdd
    big_a, big_b = codes((1, 512, 8192), torch.int8, gen), codes((1, 512, 8192), torch.int8, gen)
    assert fused_on_cpu.gemm_f32(StandIn(), big_a, big_b, s) is None  # split-K chosen
    wide = torch.zeros((1, 2, 40000), dtype=torch.uint8)  # 255·255·K does not fit in int32
    assert fused_on_cpu.gemm_f32(StandIn(), wide, wide, s) is None
    dp4a = CudaGemm(kernel="dp4a")
    assert fused_on_cpu.gemm_f32(dp4a, a, b, s) is None
    monkeypatch.setattr(cuda_epilogue, "runs_kernels", lambda t: False)  # CPU tensors
    assert cuda_epilogue.gemm_f32(StandIn(), a, b, s) is None


def test_exported_library_without_the_fused_kernel_falls_back(fused_on_cpu, monkeypatch):
    """With an exported library: fused only where it holds the kernel (``has_kernel``), else
    None (the plain kernel and the torch dequantize), and an older library object without the
    method counts as lacking it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gen = torch.Generator().manual_seed(4)
    a, b = codes((1, 30, 100), torch.int8, gen), codes((1, 20, 100), torch.int8, gen)
    s = torch.ones(1)
    asked = []
    lib = SimpleNamespace(kind="mma", has_kernel=lambda shape, arch: asked.append((shape, arch)) or True)
    gemm = StandIn(library=lib)
    _close(fused_on_cpu.gemm_f32(gemm, a, b, s), _unfused(gemm, a, b, s))
    assert asked == [(gemm.fused[0], "sm_90")]
    lib.has_kernel = lambda shape, arch: False
    assert fused_on_cpu.gemm_f32(gemm, a, b, s) is None
    assert fused_on_cpu.gemm_f32(StandIn(library=SimpleNamespace(kind="mma")), a, b, s) is None


def test_cuda_library_has_kernel(ep, tmp_path):
    from fraccompile.targets.kernels import cuda_mma
    from fraccompile.targets.runtime.exported import CudaLibrary

    fused, plain = _shape(1, 30, 20, 100), cuda_mma.padded(1, 30, 20, 100)
    lib = CudaLibrary(tmp_path, None, fallback=True)
    assert not lib.has_kernel(fused, "sm_90")  # no cuda target
    lib.info = {"archs": ["sm_80", "sm_90"], "kernels": {fused.name: {}, plain.name: {}}}
    assert lib.has_kernel(plain, "sm_90") and not lib.has_kernel(plain, "sm_75")
    assert not lib.has_kernel(fused, "sm_90")  # written before the fused kernels had an entry
    lib.info["epilogue"] = {"source_hash": "0" * 16}
    assert not lib.has_kernel(fused, "sm_90")  # another version's
    lib.info["epilogue"] = {"source_hash": ep.source_hash()}
    assert lib.has_kernel(fused, "sm_90") and not lib.has_kernel(_shape(1, 31, 20, 100), "sm_90")


def test_fused_gemm_runs_the_emulated_kernel(ep, fused_on_cpu, tmp_path):
    """The glue and the kernel together: uint8 · int8 codes with a per-group offset, bias and the
    rank-one term, through the emulated kernel."""
    G, M, N, K = 2, 40, 20, 100
    shape = _shape(G, M, N, K, rank1=True)
    gemm = StandIn(emulated=Emulated(ep, shape, tmp_path))
    gen = torch.Generator().manual_seed(5)
    a, b = codes((G, M, K), torch.uint8, gen), codes((G, N, K), torch.int8, gen)
    a[0, 0], b[0, 0] = 255, -128
    scale, bias = torch.rand(N, generator=gen), torch.randn(N, generator=gen)
    p, t = torch.randn(G, M, generator=gen), torch.randn(N, generator=gen)
    offsets = (None, torch.tensor([[3], [-5]]))
    y = fused_on_cpu.gemm_f32(gemm, a, b, scale, bias, offsets=offsets, row_term=(p, t))
    assert gemm.fused == [shape]
    _close(y, _unfused(gemm, a, b, scale, bias, offsets, (p, t)))


def test_integer_gemms_gpu_branch_uses_the_fused_kernel(fused_on_cpu, monkeypatch):
    """``IntegerGemms.gemm_f32`` on the GPU branch: the fused kernel where it applies, equal to the
    GEMM + torch dequantize it replaces; the rest (per-row offsets) still on that path."""
    from fraccompile.targets.backend import TVMBackend
    from fraccompile.targets.runtime import cuda_epilogue

    monkeypatch.setattr(TVMBackend, "on_gpu", staticmethod(lambda t: True))
    backend = TVMBackend()
    backend._cuda = gemm = StandIn()
    gen = torch.Generator().manual_seed(6)
    a, b = codes((1, 64, 96), torch.int8, gen), codes((1, 48, 96), torch.int8, gen)
    scale, bias = torch.rand(48, generator=gen), torch.randn(48, generator=gen)
    offsets = (torch.tensor([[128]]), None)
    y = backend.gemm_f32(a, b, scale, bias, offsets=offsets)
    assert len(gemm.fused) == 1 and gemm.plain == 0
    monkeypatch.setattr(cuda_epilogue, "runs_kernels", lambda t: False)
    ref = backend.gemm_f32(a, b, scale, bias, offsets=offsets)
    assert gemm.plain == 1
    _close(y, ref)
    monkeypatch.setattr(cuda_epilogue, "runs_kernels", lambda t: True)
    per_row = (torch.full((1, 64), 128), None)
    _close(backend.gemm_f32(a, b, scale, bias, offsets=per_row), ref)
    assert len(gemm.fused) == 1 and gemm.plain == 2


@pytest.fixture(scope="module")
def quant_emu(tmp_path_factory):
    """The CUDA quantization kernels in the emulator (as ``test_cuda_backend``'s ``emu``)."""
    from _cuda_quant_helpers import EmulatedQuantKernels

    from fraccompile.targets.kernels import cuda_quantize

    return EmulatedQuantKernels(cuda_quantize, tmp_path_factory.mktemp("emu"))


@pytest.mark.parametrize(
    "cfg", [dict(scheme="symmetric"), dict(scheme="sbm", weight_scale="gemm", g=12)], ids=["sym", "sbm"]
)
def test_gpu_branch_step_with_the_fused_kernel(fused_on_cpu, monkeypatch, quant_emu, cfg):
    """A training step of the conv + linear + matmul model of ``test_cuda_backend`` on the GPU
    branch (emulated quantization kernels, im2col convs) with the fused GEMM's torch stand-in:
    the linear and matmul GEMMs run fused, nothing is read on the host, and the loss and
    gradients are the reference backend's."""
    from _tvm_helpers import TOL, rel
    from test_cuda_backend import Net, _no_host_reads, _step

    from fraccompile.targets.backend import TVMBackend

    monkeypatch.setattr(TVMBackend, "on_gpu", staticmethod(lambda t: True))
    for name in [n for n in dir(TVMBackend) if n.startswith("_gpu_conv")]:
        monkeypatch.setattr(TVMBackend, name, lambda *args, **kwargs: None)
    backend = TVMBackend()
    backend._cuda, backend._cuda_quant = StandIn(), SimpleNamespace(launcher=lambda device: quant_emu)
    gemm = backend._cuda
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    _step(model, x, y, cfg, backend, compile_on="tvm")  # warm the per-value caches
    loss, grads = _step(model, x, y, cfg, backend, guard=_no_host_reads, compile_on="tvm")
    ref_loss, ref_grads = _step(model, x, y, cfg)
    assert gemm.fused and rel(ref_loss, loss) < TOL
    for r, g in zip(ref_grads, grads):
        assert rel(r, g) < TOL


# -- on a GPU --------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("a_dtype,b_dtype", DTYPES)
@pytest.mark.parametrize(
    "G,M,N,K,rank1,split",
    [(1, 200, 129, 77, False, False), (3, 37, 130, 448, True, False), (3, 37, 130, 1000, True, True)],
)
def test_gpu_fused_against_unfused(a_dtype, b_dtype, G, M, N, K, rank1, split):
    """The fused kernel equals the GEMM + torch dequantize; a problem the mma kernel splits along
    K (few output tiles, a long reduction) is declined (None): its sum is complete only after
    every block's atomicAdd, so its dequantize stays a separate pass."""
    from fraccompile.targets.runtime import cuda_epilogue

    gen = torch.Generator().manual_seed(0)
    a, b = codes((G, M, K), a_dtype, gen).cuda(), codes((G, N, K), b_dtype, gen).cuda()
    scale, bias = torch.rand(N, generator=gen).cuda(), torch.randn(N, generator=gen).cuda()
    row_term = (torch.randn(G, M).cuda(), torch.randn(N).cuda()) if rank1 else None
    gemm = CudaGemm()
    assert (gemm.padded_shape(G, M, N, K, "mma").split_k > 1) == split
    y = cuda_epilogue.gemm_f32(gemm, a, b, scale, bias, row_term=row_term)
    if split:
        assert y is None
        return
    assert y is not None and y.is_cuda
    _close(y.cpu(), _unfused(gemm, a, b, scale, bias, row_term=row_term).cpu())
