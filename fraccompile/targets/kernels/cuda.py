"""The integer GEMM for NVIDIA GPUs: a TE definition, a shared-memory tiled TIR schedule with the
``dp4a`` dot product, and the CUDA C that TVM generates for it, compiled to a cubin by ``nvcc``.

``C[g, m, n] = sum_k A[g, m, k] * B[g, n, k]`` with ``A`` and ``B`` s8, both K-contiguous
(row-major ``(G, M, K)`` and ``(G, N, K)``), and ``C`` s32 ``(G, M, N)``. The same contract as the
CPU kernel (:mod:`.gemm`) but both operands signed: ``dp4a.s32.s32`` multiplies four s8 pairs and
adds them to an s32. Exact while ``128·128·K < 2**31``; the caller
(:class:`..runtime.cuda_driver.CudaGemm`) splits ``K`` and shifts u8 operands into s8. Shapes are padded to
the tile by the caller (zeros add nothing), so one kernel is built per padded shape and tile.

Schedule (one thread block per ``bm × bn`` tile of C, ``(bm/tm) × (bn/tn)`` threads):

* grid ``(M/bm, N/bn, G)`` = ``blockIdx.(x, y, z)`` over (m-block, n-block, group);
  block ``(bn/tn, bm/tm)`` = ``threadIdx.(x, y)``; thread ``(tx, ty)`` owns the ``tm × tn``
  sub-tile at rows ``ty·tm ..`` and columns ``tx·tn ..`` of the block tile, accumulated in
  ``tm·tn`` s32 registers (``C_local``);
* ``k`` in steps of ``bk`` bytes: all threads copy the ``bm × bk`` tile of A and the ``bn × bk``
  tile of B into shared memory in 4-byte words (a warp reads 4 rows × 32 contiguous bytes), sync,
  then every thread runs ``bk/4 × tm × tn`` ``__dp4a`` (fully unrolled; the k-inner loop of 4
  tensorized with the dp4a intrinsic below), sync;
* shared rows are padded to a length of 4 mod 32 bytes (36 for ``bk`` 32: an odd number of
  4-byte banks), and B's rows are stored permuted (row ``n`` at ``(n % tn)·(bn/tn) + n // tn``),
  so the 16 B rows a warp reads at one k (``tx·tn + j``) fall in 16 different banks; a warp
  reads two rows of A (broadcasts);
* the accumulators go to C with vector stores of up to 4 s32.

The default tile is 128×128×32 with 8×8 per thread (256 threads, 64 accumulators; ptxas: 125-128
registers, no spills, 9 KiB shared memory on sm_80/sm_90); smaller problems get 64- or 32-wide
blocks. No double buffering or tensor cores: this is the plain dp4a baseline.

The dp4a tensor intrinsic is TVM's ``dp4a_s8s8s32`` (``tvm/s_tir/tensor_intrin/
dot_product_common.py``: s8x4 words of A and B in shared memory, an s32 accumulator in registers,
``__dp4a``), restated here: importing that module imports the whole ``tensor_intrin`` package,
which parses every bundled intrinsic (over a minute of TVMScript on 2 cores without bytecode).

TVM 0.27's pip wheel has no CUDA runtime: ``tvm.compile`` still generates the CUDA C (the device
module's ``inspect_source()``), and :func:`compile_cubin` runs ``nvcc`` on it; the cubin is
launched by :mod:`..runtime.cuda_driver` through the CUDA driver API. (``tvm.support.nvcc.compile_cuda``
exists in this version, ``tvm.contrib.nvcc`` does not; it is not used because it queries a GPU for
the compute version unless a target scope is entered, and adds fast-math and verbose ptxas flags.)
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import tvm
import tvm.s_tir as s_tir
from tvm import te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

ARCHS = ("sm_80", "sm_90")
MAX_THREADS = 1024
MAX_SHARED_BYTES = 48 * 1024  # static shared memory per block
SHARED_ROW_ALIGN = (32, 4)  # shared rows are 4 mod 32 bytes long (see the module docstring)

# TVM's dp4a_s8s8s32: C[0] += A[0:4] · B[0:4], four s8 pairs from shared memory into an s32
# register, as one __dp4a (the same description and implementation, under our own name)
DP4A_S8S8S32 = "fraccompile_dp4a_s8s8s32"


@T.prim_func(s_tir=True)
def _dp4a_desc(
    A: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
    B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
    C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for i in range(0, 4):
            with T.sblock("update"):
                vi = T.axis.remap("R", [i])
                C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")


@T.prim_func(s_tir=True)
def _dp4a_impl(
    A: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
    B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
    C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        C[0] += T.call_pure_extern(
            "__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), T.int32(0), dtype="int32"
        )


def register_dp4a() -> str:
    """Register the dp4a intrinsic once per process; returns its name."""
    try:
        TensorIntrin.get(DP4A_S8S8S32)
    except Exception:  # not registered yet (TVM raises a ValueError/TVMError)
        TensorIntrin.register(DP4A_S8S8S32, _dp4a_desc, _dp4a_impl)
    return DP4A_S8S8S32


@dataclass(frozen=True)
class CudaTile:
    bm: int = 128  # rows of C per thread block
    bn: int = 128  # columns of C per thread block
    bk: int = 32  # bytes of K staged in shared memory per step (a multiple of 4)
    tm: int = 8  # rows of C per thread
    tn: int = 8  # columns of C per thread

    def __post_init__(self):
        if min(self.bm, self.bn, self.tm, self.tn) < 1 or self.bk < 4 or self.bk % 4:
            raise ValueError(f"bad tile {self}")
        if self.bm % self.tm or self.bn % self.tn:
            raise ValueError(f"bad tile {self}: the thread tile must divide the block tile")
        if self.threads > MAX_THREADS:
            raise ValueError(f"bad tile {self}: {self.threads} threads per block")
        step = 4 * self.threads  # bytes one cooperative copy step moves
        if (self.bm * self.bk) % step or (self.bn * self.bk) % step:
            raise ValueError(
                f"bad tile {self}: the {self.threads} threads must copy the shared "
                "tiles in whole 4-byte steps"
            )
        if self.shared_bytes > MAX_SHARED_BYTES:
            raise ValueError(f"bad tile {self}: {self.shared_bytes} bytes of shared memory")

    @property
    def threads_x(self) -> int:
        return self.bn // self.tn

    @property
    def threads_y(self) -> int:
        return self.bm // self.tm

    @property
    def threads(self) -> int:
        return self.threads_x * self.threads_y

    @property
    def shared_bytes(self) -> int:
        factor, offset = SHARED_ROW_ALIGN
        return (self.bm + self.bn) * (self.bk + (offset - self.bk) % factor)


@dataclass(frozen=True)
class CudaGemmShape:
    """A padded problem: every size a multiple of its tile."""

    groups: int
    m: int
    n: int
    k: int
    tile: CudaTile

    def __post_init__(self):
        t = self.tile
        if self.groups < 1 or min(self.m, self.n, self.k) < 1:
            raise ValueError(f"bad shape {self}")
        if self.m % t.bm or self.n % t.bn or self.k % t.bk:
            raise ValueError(f"shape {self} is not padded to its tile (use padded())")

    @property
    def name(self) -> str:
        t = self.tile
        return f"cuda_gemm_g{self.groups}_m{self.m}_n{self.n}_k{self.k}_t{t.bm}x{t.bn}x{t.bk}_{t.tm}x{t.tn}"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(size: int) -> int:
    """Block width for one of M, N: 128 unless the problem is at most 64 (then 64) or 32 wide."""
    return 128 if size > 64 else 64 if size > 32 else 32


def default_tile(m: int, n: int, k: int) -> CudaTile:
    """A tile for an (unpadded) problem: 16×16 threads, each on a (block/16)² sub-tile, with
    blocks of 128 (or 64 or 32 for small M or N) and 32 bytes of K per step."""
    bm, bn = _block(m), _block(n)
    return CudaTile(bm, bn, 32, bm // 16, bn // 16)


def padded(groups: int, m: int, n: int, k: int, tile: CudaTile | None = None) -> CudaGemmShape:
    """The padded shape for a ``(G, M, N, K)`` problem: M, N, K rounded up to ``bm``, ``bn``,
    ``bk`` (``bk`` is a multiple of 4, so K is too)."""
    tile = tile or default_tile(m, n, k)
    return CudaGemmShape(groups, _round_up(m, tile.bm), _round_up(n, tile.bn), _round_up(k, tile.bk), tile)


def source_hash() -> str:
    """Hash of the code that defines the kernels: part of every cubin cache key."""
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]


def target(arch: str) -> tvm.target.Target:
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def definition(shape: CudaGemmShape):
    g, m, n, k = shape.groups, shape.m, shape.n, shape.k
    A = te.placeholder((g, m, k), "int8", name="A")
    B = te.placeholder((g, n, k), "int8", name="B")
    r = te.reduce_axis((0, k), name="k")
    C = te.compute(
        (g, m, n),
        lambda b, i, j: te.sum(A[b, i, r].astype("int32") * B[b, j, r].astype("int32"), axis=r),
        name="C",
    )
    return te.create_prim_func([A, B, C]).with_attr("global_symbol", shape.name)


def schedule(shape: CudaGemmShape) -> s_tir.Schedule:
    """The tiled dp4a schedule of the module docstring."""
    t = shape.tile
    sch = s_tir.Schedule(definition(shape))
    blk = sch.get_sblock("C")
    g, i, j, k = sch.get_loops(blk)
    bi, ty, ii = sch.split(i, [None, t.threads_y, t.tm])
    bj, tx, jj = sch.split(j, [None, t.threads_x, t.tn])
    ko, kin, ki = sch.split(k, [None, t.bk // 4, 4])
    sch.reorder(g, bj, bi, ty, tx, ko, kin, ii, jj, ki)
    sch.bind(g, "blockIdx.z")
    sch.bind(bj, "blockIdx.y")
    sch.bind(bi, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")

    # per-thread accumulators in registers, written back with vector stores
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, tx)
    vec = next(v for v in (4, 2, 1) if t.tn % v == 0)
    sch.vectorize(sch.split(sch.get_loops(acc)[-1], [None, vec])[1])

    # the A and B tiles of one k step in shared memory, copied cooperatively in 4-byte words
    for idx in (0, 1):
        sh = sch.cache_read(blk, idx, "shared")
        sch.compute_at(sh, ko)
        if idx == 1:  # B row n of the block tile at (n % tn) * threads_x + n // tn
            sch.transform_layout(
                sh, ("write", 0), lambda b, n, kk: (b, n // t.bn, n % t.tn, (n % t.bn) // t.tn, kk)
            )
        fused = sch.fuse(*sch.get_loops(sh)[-2:])
        _, wy, wx, v = sch.split(fused, [None, t.threads_y, t.threads_x, 4])
        sch.bind(wy, "threadIdx.y")
        sch.bind(wx, "threadIdx.x")
        sch.vectorize(v)
        sch.storage_align(sh, 0, axis=-2, factor=SHARED_ROW_ALIGN[0], offset=SHARED_ROW_ALIGN[1])

    sch.decompose_reduction(blk, ko)
    sch.tensorize(ki, register_dp4a())
    for loop in (kin, ii, jj):
        sch.unroll(loop)
    return sch


@dataclass(frozen=True)
class Kernel:
    """A generated kernel and how to launch it: ``name<<<grid, block>>>(*params)``, where
    ``params`` names the buffers (``"A"``, ``"B"``, ``"C"``) in the kernel's parameter order. All
    shared memory is static."""

    source: str
    name: str
    params: tuple[str, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]


_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(([^)]*)\)\s*\{')


def _launch_extents(sch: s_tir.Schedule) -> dict[str, int]:
    """``thread tag -> extent`` of every loop the schedule binds to a GPU thread axis."""
    extents: dict[str, int] = {}
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        for loop in sch.get_loops(blk):
            node = sch.get(loop)
            if node.thread_binding is None:
                continue
            tag, ext = node.thread_binding.thread_tag, int(node.extent)
            if extents.setdefault(tag, ext) != ext:
                raise RuntimeError(f"{tag} bound with extents {extents[tag]} and {ext}")
    return extents


@functools.lru_cache(maxsize=64)
def lower(shape: CudaGemmShape, arch: str = ARCHS[-1]) -> Kernel:
    """Schedule ``shape``, generate its CUDA C with TVM, and read the launch geometry (from the
    schedule's thread bindings) and the kernel name and parameter order (from the source)."""
    sch = schedule(shape)
    lib = tvm.compile(sch.mod, target=target(arch))
    source = lib.mod.imports[0].inspect_source()
    kernels = list(_SIGNATURE.finditer(source))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the generated source, found {len(kernels)}")
    bounds, name, params = kernels[0].groups()
    names = tuple(re.sub(r"_ptr$", "", p.split()[-1]) for p in params.split(","))
    if sorted(names) != ["A", "B", "C"]:
        raise RuntimeError(f"unexpected kernel parameters {params!r}")
    ext = _launch_extents(sch)
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
    threads = block[0] * block[1] * block[2]
    if threads != shape.tile.threads or (bounds and int(bounds) != threads):
        raise RuntimeError(
            f"{shape.name}: block {block} does not match the tile "
            f"({shape.tile.threads} threads, __launch_bounds__ {bounds})"
        )
    return Kernel(source, name, names, grid, block)


def generate_source(shape: CudaGemmShape, arch: str = ARCHS[-1]) -> str:
    """The CUDA C of the kernel for ``shape`` (TVM's codegen, no nvcc involved)."""
    return lower(shape, arch).source


def launch_config(shape: CudaGemmShape, arch: str = ARCHS[-1]):
    """``(grid, block, kernel_name, param_order)`` of the kernel for ``shape``."""
    k = lower(shape, arch)
    return k.grid, k.block, k.name, k.params


# -- nvcc ------------------------------------------------------------------------------------------
def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


@functools.lru_cache(maxsize=None)
def nvcc_unavailable_reason() -> str | None:
    """None when ``nvcc`` runs, else a one-line reason."""
    nvcc = nvcc_path()
    if nvcc is None:
        return "nvcc not found (not on PATH, nor in $CUDA_HOME, $CUDA_PATH or /usr/local/cuda)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} does not run: {e}"
    if out.returncode != 0:
        return f"{nvcc} --version failed: {(out.stderr or out.stdout).strip()[:200]}"
    return None


def compile_source(source: str, arch: str, fmt: str = "cubin") -> bytes:
    """``nvcc --cubin`` (or ``--ptx``) of CUDA C for ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
    if fmt not in ("cubin", "ptx"):
        raise ValueError(f"format {fmt!r}: expected cubin or ptx")
    reason = nvcc_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="fraccompile-nvcc-") as tmp:
        src, out = os.path.join(tmp, "kernel.cu"), os.path.join(tmp, f"kernel.{fmt}")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc_path(), f"--{fmt}", "-O3", f"-arch={arch}", "-w", "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr or proc.stdout}")
        return pathlib.Path(out).read_bytes()


def compile_cubin(shape: CudaGemmShape, arch: str) -> bytes:
    """The kernel for ``shape`` as a cubin (ELF) for ``arch``."""
    return compile_source(generate_source(shape, arch), arch, "cubin")


def compile_ptx(shape: CudaGemmShape, arch: str) -> bytes:
    """The kernel as PTX for ``arch`` (the driver JIT-compiles it for newer GPUs)."""
    return compile_source(generate_source(shape, arch), arch, "ptx")


def compile_fatbin(source: str) -> bytes:
    """CUDA C compiled by nvcc into one fatbin: a cubin per arch of :data:`ARCHS` and PTX of the
    newest (which the driver compiles at load time for newer GPUs). ``fraccompile export --target
    cuda`` ships all of a model's kernels in one such file."""
    reason = nvcc_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    gencode = [f"-gencode=arch=compute_{a[3:]},code=sm_{a[3:]}" for a in ARCHS]
    newest = ARCHS[-1][3:]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    with tempfile.TemporaryDirectory(prefix="fraccompile-nvcc-") as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.fatbin")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc_path(), "--fatbin", "-O3", "-w", *gencode, "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr or proc.stdout}")
        return pathlib.Path(out).read_bytes()
