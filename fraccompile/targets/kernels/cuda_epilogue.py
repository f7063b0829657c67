"""The tensor-core GEMM of :mod:`.cuda_mma` with the dequantize fused in its write-back: the
accumulators go from the registers straight to fp32, no int32 C is written or read back.

Contract (one kernel per :class:`MmaEpilogueShape`; ``A``, ``B`` as for :mod:`.cuda_mma`, padded
to the tile, ``split_k`` 1)::

    out[g, m, n] = float(C[g, m, n] + rc[g, m] + cc[g, n]) * scale[n] (+ p[g, m] * t[n]) + bias[n]

for ``m < M``, ``n < N`` (the problem's unpadded sizes, part of the shape), where ``C`` is the
s8·s8 product of the codes, ``rc`` / ``cc`` int32 ``(G, M)`` / ``(G, N)`` per-row / per-column
corrections (the caller's sign and code-offset terms; int32 additions wrap, so the result is exact
whenever the true sum fits in int32), ``scale``, ``bias`` (and ``t``) fp32 ``(N,)``, ``p`` fp32
``(G, M)`` (the rank-one term, variant ``rank1``) and ``out`` fp32 ``(G, M, N)``, contiguous. The
formula and its order are the CPU epilogue's (:func:`.quantize.dequant_definition`): the sum in
int32, one int-to-float conversion, then ``__fmul_rn`` / ``__fadd_rn`` (IEEE round-to-nearest,
so nvcc contracts nothing into an FMA): the scale, the rank-one product added, the bias added.

How: the definition is :func:`.cuda_mma.definition`'s with an elementwise stage ``out`` after
``C``; :func:`.cuda_mma.schedule` runs unchanged up to the write-back, where ``out`` is inlined
into the block that copies the accumulators out (``reverse_compute_inline``: ``C`` disappears)
and that block is tensorized with a store intrinsic registered per shape
(:func:`register_store`). Its description is the formula on a 16 × 16 tile of padded buffers;
its implementation writes only the elements inside ``M × N``, at their place in the unpadded
``out`` and reading the unpadded ``rc``, ``cc`` and ``p`` (addresses from the tile's offsets:
the padded buffers of the definition are declared, the unpadded ones passed). So the kernel
writes exactly ``(G, M, N)``, into a caller's buffer if it likes, with no copy.

Only for ``split_k`` 1: split-K blocks add partial sums with ``atomicAdd``, so their result is
known only after every block has run, and their dequantize stays a separate pass. The kernels
have not been run on a GPU: the tests run them in the CPU emulator of CUDA threads.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from dataclasses import dataclass

import tvm
import tvm.s_tir as s_tir
from tvm import te
from tvm.script import tirx as T

from . import cuda, cuda_mma
from .cuda_mma import ARCHS, MmaGemmShape, _acc_layout, _acc_position, _register

KIND = "mma_epilogue"


@dataclass(frozen=True)
class MmaEpilogueShape:
    """An mma GEMM shape (``split_k`` 1) with the dequantize in its write-back: ``gemm`` the padded
    problem, ``rows`` × ``cols`` (M × N) the part of it written, ``rank1`` whether the
    ``p·t`` term is added."""

    gemm: MmaGemmShape
    rows: int
    cols: int
    rank1: bool = False

    kind = KIND
    split_k = 1  # what cuda_mma.schedule reads
    zero = ()  # nothing to zero before a launch

    def __post_init__(self):
        g = self.gemm
        if g.split_k != 1:
            raise ValueError(f"{g.name}: the fused epilogue needs split_k 1 (split-K adds with atomicAdd)")
        if not (0 < self.rows <= g.m and 0 < self.cols <= g.n):
            raise ValueError(f"bad epilogue shape {self}: {self.rows} x {self.cols} outside {g.m} x {g.n}")
        if g.groups * max(g.m * g.k, g.n * g.k, g.m * g.n) >= 2**31:
            raise ValueError(f"epilogue shape {self}: too large for int32 indexing")

    groups = property(lambda self: self.gemm.groups)
    m = property(lambda self: self.gemm.m)
    n = property(lambda self: self.gemm.n)
    k = property(lambda self: self.gemm.k)
    tile = property(lambda self: self.gemm.tile)

    @property
    def name(self) -> str:
        rest = self.gemm.name.removeprefix("cuda_mma")
        return f"cuda_mmadq{rest}_o{self.rows}x{self.cols}{'_pt' if self.rank1 else ''}"

    @property
    def params(self) -> tuple[str, ...]:
        """The kernel's buffers, in the definition's order."""
        return ("A", "B", "rc", "cc", "scale", "bias", *(("p", "t") if self.rank1 else ()), "out")


def source_hash() -> str:
    """Hash of the code that defines the kernel (this module and :func:`.cuda_mma.source_hash`):
    part of every cubin cache key and of an export's check."""
    h = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    h.update(cuda_mma.source_hash().encode())
    return h.hexdigest()[:16]


# -- the formula -----------------------------------------------------------------------------------
def _f32(name: str, *args):
    return tvm.tirx.call_pure_extern("float32", name, *args)


def value(total, scale, bias, pt=None):
    """``float(total)·scale (+ p·t) + bias`` with ``__fmul_rn`` / ``__fadd_rn``: the CPU epilogue's
    order (``pt``: ``(p, t)`` or None). The expression of the definition and of the store
    intrinsic's description, which tensorize compares structurally."""
    y = _f32("__fmul_rn", tvm.tirx.Cast("float32", total), scale)
    if pt is not None:
        y = _f32("__fadd_rn", y, _f32("__fmul_rn", *pt))
    return _f32("__fadd_rn", y, bias)


def _pt(p, t, i, j):
    """``(p[i], t[j])``, or None without a rank-one term (``p`` None)."""
    return None if p is None else (p[i], t[j])


def definition(shape: MmaEpilogueShape):
    """``main(A, B, rc, cc, scale, bias[, p, t], out)``: :func:`.cuda_mma.definition` (one K piece)
    followed by the elementwise dequantize ``out`` (all buffers declared padded)."""
    G, M, N, K = shape.groups, shape.m, shape.n, shape.k
    A = te.placeholder((G, M, K), "int8", name="A")
    B = te.placeholder((G, N, K), "int8", name="B")
    rc = te.placeholder((G, M), "int32", name="rc")
    cc = te.placeholder((G, N), "int32", name="cc")
    scale = te.placeholder((N,), "float32", name="scale")
    bias = te.placeholder((N,), "float32", name="bias")
    extra = [te.placeholder((G, M), "float32", name="p"), te.placeholder((N,), "float32", name="t")]
    extra = extra if shape.rank1 else []
    r = te.reduce_axis((0, K), name="k")
    C = te.compute(
        (1, G, M, N),
        lambda s, b, i, j: te.sum(
            A[b, i, s * K + r].astype("int32") * B[b, j, s * K + r].astype("int32"), axis=r
        ),
        name="C",
    )

    def dequantize(s, b, i, j):
        pt = (extra[0][b, i], extra[1][j]) if extra else None
        return value(C[s, b, i, j] + rc[b, i] + cc[b, j], scale[j], bias[j], pt)

    out = te.compute((1, G, M, N), dequantize, name="out")
    func = te.create_prim_func([A, B, rc, cc, scale, bias, *extra, out])
    return func.with_attr("global_symbol", shape.name)


# -- the store intrinsic ---------------------------------------------------------------------------
def _inside(i, j, shape: MmaEpilogueShape):
    """The guard of element ``(i, j)`` (padded coordinates): True where no padding can occur."""
    conds = [i < shape.rows] if shape.rows < shape.m else []
    conds += [j < shape.cols] if shape.cols < shape.n else []
    return True if not conds else conds[0] if len(conds) == 1 else tvm.tirx.And(*conds)


def _store(shape: MmaEpilogueShape):
    """Description: ``out[v0, v1] = value(W[lane, index] + rc[v0] + cc[v1], ...)`` on a 16 × 16
    tile (padded buffers). Implementation: lane ``tx`` dequantizes its 8 accumulators; the
    tile's group, first row and first column come from the offsets of its ``rc`` and ``cc``
    regions (``g·Mp + i0``, ``g·Np + j0``), and an element inside ``M × N`` is written at
    ``(g·M + i)·N + j`` of ``out`` with ``rc[g·M + i]``, ``cc[g·N + j]`` (``p`` likewise):
    indices past the 16-element regions, which address the unpadded tensors the caller passes."""
    mp, np_, M, N, rank1 = shape.m, shape.n, shape.rows, shape.cols, shape.rank1

    @T.macro
    def desc_body(W, rc, cc, scale, bias, out, p, t):
        for i0, i1 in T.grid(16, 16):
            with T.sblock("out"):
                v0, v1 = T.axis.remap("SS", [i0, i1])
                lane, index = T.meta_var(_acc_layout(v0, v1))
                out[v0, v1] = value(W[lane, index] + rc[v0] + cc[v1], scale[v1], bias[v1], _pt(p, t, v0, v1))

    @T.macro
    def impl_body(W, rc, cc, scale, bias, out, roff, coff, off, p, t, poff):
        for tx in T.thread_binding(0, 32, "threadIdx.x"):
            for index in T.unroll(8):
                row, col = T.meta_var(_acc_position(tx, index))
                g, i, j = T.meta_var((roff // mp, roff % mp + row, coff % np_ + col))
                if _inside(i, j, shape):
                    total = T.meta_var(W[tx, index] + rc[g * M + i - roff] + cc[g * N + j - coff])
                    pt = T.meta_var(_pt(p, t, g * M + i - poff, col))
                    out[0, (g * M + i) * N + j - off] = value(total, scale[col], bias[col], pt)

    if rank1:

        @T.prim_func(s_tir=True)
        def desc(
            w: T.handle,
            r: T.handle,
            c: T.handle,
            s: T.handle,
            b: T.handle,
            pp: T.handle,
            tt: T.handle,
            d: T.handle,
        ) -> None:
            W = T.match_buffer(w, (32, 8), "int32", scope="warp")
            rc = T.match_buffer(r, (16,), "int32")
            cc = T.match_buffer(c, (16,), "int32")
            scale = T.match_buffer(s, (16,), "float32")
            bias = T.match_buffer(b, (16,), "float32")
            p = T.match_buffer(pp, (16,), "float32")
            t = T.match_buffer(tt, (16,), "float32")
            out = T.match_buffer(d, (16, 16), "float32")
            with T.sblock("root"):
                T.reads(W[0:32, 0:8], rc[0:16], cc[0:16], scale[0:16], p[0:16], t[0:16], bias[0:16])
                T.writes(out[0:16, 0:16])
                desc_body(W, rc, cc, scale, bias, out, p, t)

        @T.prim_func(s_tir=True)
        def impl(
            w: T.handle,
            r: T.handle,
            c: T.handle,
            s: T.handle,
            b: T.handle,
            pp: T.handle,
            tt: T.handle,
            d: T.handle,
        ) -> None:
            roff = T.int32()
            coff = T.int32()
            poff = T.int32()
            off = T.int32()
            s0 = T.int32()
            s1 = T.int32()
            W = T.match_buffer(w, (32, 8), "int32", scope="warp", offset_factor=1)
            rc = T.match_buffer(r, (16,), "int32", offset_factor=1, elem_offset=roff)
            cc = T.match_buffer(c, (16,), "int32", offset_factor=1, elem_offset=coff)
            scale = T.match_buffer(s, (16,), "float32", offset_factor=1)
            bias = T.match_buffer(b, (16,), "float32", offset_factor=1)
            p = T.match_buffer(pp, (16,), "float32", offset_factor=1, elem_offset=poff)
            t = T.match_buffer(tt, (16,), "float32", offset_factor=1)
            out = T.match_buffer(d, (16, 16), "float32", offset_factor=1, strides=[s0, s1], elem_offset=off)
            with T.sblock("root"):
                T.reads(W[0:32, 0:8], rc[0:16], cc[0:16], scale[0:16], p[0:16], t[0:16], bias[0:16])
                T.writes(out[0:16, 0:16])
                impl_body(W, rc, cc, scale, bias, out, roff, coff, off, p, t, poff)

        return desc, impl

    @T.prim_func(s_tir=True)
    def desc(w: T.handle, r: T.handle, c: T.handle, s: T.handle, b: T.handle, d: T.handle) -> None:
        W = T.match_buffer(w, (32, 8), "int32", scope="warp")
        rc = T.match_buffer(r, (16,), "int32")
        cc = T.match_buffer(c, (16,), "int32")
        scale = T.match_buffer(s, (16,), "float32")
        bias = T.match_buffer(b, (16,), "float32")
        out = T.match_buffer(d, (16, 16), "float32")
        with T.sblock("root"):
            T.reads(W[0:32, 0:8], rc[0:16], cc[0:16], scale[0:16], bias[0:16])
            T.writes(out[0:16, 0:16])
            desc_body(W, rc, cc, scale, bias, out, None, None)

    @T.prim_func(s_tir=True)
    def impl(w: T.handle, r: T.handle, c: T.handle, s: T.handle, b: T.handle, d: T.handle) -> None:
        roff = T.int32()
        coff = T.int32()
        off = T.int32()
        s0 = T.int32()
        s1 = T.int32()
        W = T.match_buffer(w, (32, 8), "int32", scope="warp", offset_factor=1)
        rc = T.match_buffer(r, (16,), "int32", offset_factor=1, elem_offset=roff)
        cc = T.match_buffer(c, (16,), "int32", offset_factor=1, elem_offset=coff)
        scale = T.match_buffer(s, (16,), "float32", offset_factor=1)
        bias = T.match_buffer(b, (16,), "float32", offset_factor=1)
        out = T.match_buffer(d, (16, 16), "float32", offset_factor=1, strides=[s0, s1], elem_offset=off)
        with T.sblock("root"):
            T.reads(W[0:32, 0:8], rc[0:16], cc[0:16], scale[0:16], bias[0:16])
            T.writes(out[0:16, 0:16])
            impl_body(W, rc, cc, scale, bias, out, roff, coff, off, None, None, 0)

    return desc, impl


def register_store(shape: MmaEpilogueShape) -> str:
    """The store intrinsic of ``shape`` (its padded and unpadded sizes are constants of the
    implementation), registered once per process."""
    variant = f"m{shape.m}_n{shape.n}_o{shape.rows}x{shape.cols}{'_pt' if shape.rank1 else ''}"
    return _register(f"fraccompile_mma_dequant_store_{variant}", _store, shape)


# -- the schedule and code generation --------------------------------------------------------------
def schedule(shape: MmaEpilogueShape) -> s_tir.Schedule:
    """:func:`.cuda_mma.schedule` of :func:`definition`, the dequantize inlined into the write-back
    of the accumulators and tensorized with :func:`register_store`."""

    def store(sch, acc):
        sch.reverse_compute_inline(sch.get_sblock("out"))
        return register_store(shape)

    return cuda_mma.schedule(shape, definition(shape), store)


@functools.lru_cache(maxsize=64)
def lower(shape: MmaEpilogueShape, arch: str = ARCHS[-1]) -> cuda.Kernel:
    """Schedule ``shape`` and generate its CUDA C (through :func:`.cuda_mma.tirx_source`), with the
    launch geometry read from the schedule and checked against the tile."""
    sch = schedule(shape)
    source = cuda_mma.tirx_source(sch.mod, arch)
    kernels = list(cuda._SIGNATURE.finditer(source))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the generated source, found {len(kernels)}")
    bounds, name, params = kernels[0].groups()
    names = tuple(p.split()[-1].removesuffix("_ptr") for p in params.split(","))
    if sorted(names) != sorted(shape.params):
        raise RuntimeError(f"unexpected kernel parameters {params!r}")
    ext = cuda._launch_extents(sch)
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
    t = shape.tile
    expected = ((shape.m // t.bm, shape.n // t.bn, shape.groups), (32, t.warps, 1))
    if (grid, block) != expected or (bounds and int(bounds) != t.threads):
        raise RuntimeError(
            f"{shape.name}: launch {grid} x {block} (__launch_bounds__ {bounds}) does not match the "
            f"tile: expected {expected[0]} x {expected[1]}"
        )
    if "mma.sync.aligned.m16n8k32" not in source or "atomicAdd" in source:
        raise RuntimeError(f"{shape.name}: the generated source has no mma.sync, or atomic adds")
    return cuda.Kernel(source, name, names, grid, block)


def generate_source(shape: MmaEpilogueShape, arch: str = ARCHS[-1]) -> str:
    """The CUDA C of the kernel for ``shape`` (TVM's codegen, no nvcc involved)."""
    return lower(shape, arch).source


def launch_config(shape: MmaEpilogueShape, arch: str = ARCHS[-1]):
    """``(grid, block, kernel_name, param_order, zero)`` of the kernel for ``shape`` (nothing to
    zero)."""
    k = lower(shape, arch)
    return k.grid, k.block, k.name, k.params, shape.zero


def compile_cubin(shape: MmaEpilogueShape, arch: str) -> bytes:
    """The kernel for ``shape`` as a cubin (ELF) for ``arch`` (sm_80 or newer)."""
    return cuda.compile_source(generate_source(shape, arch), arch, "cubin")


def combined_source(shapes, arch: str = ARCHS[-1]) -> str:
    """The CUDA C of several kernels, mma GEMMs (:class:`.cuda_mma.MmaGemmShape`) and fused ones,
    in one source (``fraccompile export``'s fatbin), each named ``<shape name>_kernel``."""
    fns = {
        s.name: (schedule(s) if isinstance(s, MmaEpilogueShape) else cuda_mma.schedule(s))
        .mod["main"]
        .with_attr("global_symbol", s.name)
        for s in shapes
    }
    return cuda_mma.tirx_source(tvm.IRModule(fns), arch)
