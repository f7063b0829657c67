"""The integer GEMM for NVIDIA tensor cores: the contract of :mod:`.cuda` (``C[g, m, n] = sum_k
A[g, m, k] * B[g, n, k]``, ``A`` and ``B`` s8 K-contiguous ``(G, M, K)`` / ``(G, N, K)``, ``C``
s32 ``(G, M, N)``, shapes padded to the tile by the caller) scheduled on ``mma.sync.m16n8k32``
s8·s8→s32 (compute capability 8.0 and newer), with TVM generating the CUDA C and ``nvcc``
compiling it (:func:`.cuda.compile_source`).

Schedule (one thread block per ``bm × bn`` tile of C; ``(bm/wm) · (bn/wn)`` warps, each owning a
``wm × wn`` warp tile; ``block = (32, warps)``, so ``threadIdx.x`` is the lane and
``threadIdx.y`` the warp):

* grid ``(M/bm, N/bn, S·G)`` = ``blockIdx.(x, y, z)`` over (m-block, n-block, (K split, group));
* ``k`` in steps of ``bk`` bytes, two shared stages (TVM's software pipeline): while step ``k``
  computes, all threads copy the ``bm × bk`` tile of A and the ``bn × bk`` tile of B of step
  ``k + 1`` into the other stage with 16-byte ``cp.async`` (consecutive lanes, consecutive pieces
  of a row), commit, wait for step ``k``'s group, sync; shared rows are padded to 16 mod 32 bytes
  (``storage_align``): the eight 16-byte rows one ``ldmatrix`` phase reads hit distinct banks;
* per 32 bytes of ``k`` each warp loads its ``wm/16`` fragments of A and ``wn/16`` of B with
  ``ldmatrix.m8n8.x4.b16`` (one 16 × 32 s8 fragment per instruction; B is stored N × K, the
  ``.col`` operand of mma, so no transpose is needed) and runs ``2 · (wm/16) · (wn/16)``
  ``mma.sync.m16n8k32.row.col.s32.s8.s8.s32`` into ``wm·wn/32`` s32 accumulators per lane, sync;
* the accumulators go to C (scalar stores of the m16n8 accumulator layout), or with ``split_k`` S
  > 1 are added to C with ``atomicAdd``: the reduction over K is cut into S consecutive
  pieces, ``blockIdx.z = s·G + g`` runs piece ``s``, and the caller zeroes C before the launch
  (:attr:`MmaGemmShape.zero`). Integer addition is exact and commutative, so the order of the
  blocks' adds is irrelevant: this fills the GPU for the weight gradient (few tiles, long K).

Default tile 128 × 128 × 64, 8 warps of 64 × 32 (256 threads, 64 accumulators per lane, 40 KiB
shared in two stages; ptxas sm_80: 102 registers, no stack or spills); 64- or 32-wide blocks for
small problems. Not measured on a GPU. :mod:`.cuda_epilogue`: the dequantize in the write-back.

The tensor intrinsics are TVM's (``tvm/s_tir/tensor_intrin/cuda.py``: ``mma_ldmatrix_i8_a``,
``mma_ldmatrix_i8_b_trans``, ``mma_i8i8i32_trans_b``, ``mma_fill_16x16_i32`` and the plain-store
variant of ``mma_store_16x16_i32_global_``), restated under fraccompile's names: importing that
file registers all of its intrinsics (about 8 s on 2 cores). Two TIR passes run around TVM's
``LowerWarpMemory`` (:func:`_pipeline`): s8 fragments indexed per lane (TVM 0.27 leaves them
lane-indexed: local memory), accumulator stores read the lane's own registers, no shuffle.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from dataclasses import dataclass

import tvm
import tvm.s_tir as s_tir
import tvm_ffi
from tvm import te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from . import cuda
from .cuda import ARCHS, MAX_SHARED_BYTES, MAX_THREADS, compile_source, target  # noqa: F401 (re-exported)

SHARED_ROW_ALIGN = (32, 16)  # shared rows are 16 mod 32 bytes long (see the module docstring)
MAX_ACCUMULATORS = 128  # s32 accumulators per lane (wm·wn/32): more would spill
REFERENCE_SMS = 132  # split-K aims at 2 blocks per SM of this many (H100/H200: 132, A100: 108)


# -- the tensor intrinsics (TVM's, under our names) --------------------------------------------------
def _frag_layout(i, j):
    """16 × 32 s8 fragment element ``(i, j)`` -> ``(lane, byte)`` (TVM's
    ``shared_16x32_to_ldmatrix_32x16_layout``); A is ``(m, k)``, B ``(n, k)``."""
    return 4 * (i % 8) + (j % 16) // 4, 8 * (j // 16) + (i // 8) * 4 + j % 4


def _acc_layout(i, j):
    """16 × 16 s32 accumulator ``(i, j)`` -> ``(lane, index)`` (``shared_16x16_to_ldmatrix_32x8_layout``)."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + j % 2


def _acc_position(lane, index):
    """The inverse of :func:`_acc_layout` (``ldmatrix_32x8_to_shared_16x16_layout``)."""
    return 8 * (index % 4 // 2) + lane // 4, 8 * (index // 4) + (lane % 4) * 2 + index % 2


def _ldmatrix(operand: str):
    """A 16 × 32 s8 fragment from shared memory into a warp's registers, one ``ldmatrix.x4``:
    lane ``l`` gives the address of row ``l % 16`` at byte ``16 · (l // 16)`` (A), or of row
    ``8 · (l // 16) + l % 8`` at byte ``16 · (l % 16 // 8)`` (B), so the four 8 × 16-byte
    matrices are the a0..a3 (b0, b1 of both n8 halves) registers of mma.m16n8k32."""
    if operand == "A":
        offset = lambda tx, stride: stride * (tx % 16) + 16 * (tx // 16)  # noqa: E731
    else:
        offset = lambda tx, stride: stride * 8 * (tx // 16) + (tx % 8) * stride + 16 * (tx % 16 // 8)  # noqa: E731

    @T.prim_func(s_tir=True)
    def desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (16, 32), "int8", align=64, offset_factor=32, scope="shared")
        warp = T.match_buffer(warp_handle, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:32])
            T.writes(warp[0:32, 0:16])
            for ax0, ax1 in T.grid(16, 32):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    T.reads(shared[v0, v1])
                    lane, byte = T.meta_var(_frag_layout(v0, v1))
                    T.writes(warp[lane, byte])
                    warp[lane, byte] = shared[v0, v1]

    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(
            shared_handle, (16, 32), "int8", align=64, offset_factor=32, scope="shared", strides=[s0, s1]
        )
        warp = T.match_buffer(warp_handle, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:32])
            T.writes(warp[0:32, 0:16])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                T.evaluate(_ldmatrix_call(warp, shared, tx, offset(tx, s0)))

    return desc, impl


def _ldmatrix_call(warp, shared, tx, offset):
    """``ldmatrix.x4`` of lane ``tx``: 16 fragment bytes at ``16·tx``, the row at ``offset``."""
    dst = (warp.data, warp.elem_offset + 16 * tx)
    return T.ptx_legacy.ldmatrix(False, 4, ".b16", *dst, shared.access_ptr("r"), offset, dtype="int8")


def _mma_call(A, B, C, tx, half: int):
    """One mma.m16n8k32 of the fragment: n8 half ``half`` (B registers ``2·half``, ``2·half + 1``)."""
    kind = ("m16n8k32", "row", "col", "int8", "int8", "int32")
    a, b = (A.data, A.elem_offset + tx * 16), (B.data, B.elem_offset + tx * 16 + half * 8)
    return T.ptx_legacy.mma(*kind, *a, *b, C.data, C.elem_offset + tx * 8 + half * 4, False, dtype="int32")


def _mma():
    """``C (16 × 16) += A (16 × 32) · B (16 × 32)ᵀ`` on fragments: two mma.m16n8k32 (n 0-7 with
    B's registers 0-1, n 8-15 with 2-3)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        B = T.match_buffer(b, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        C = T.match_buffer(c, (32, 8), "int32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:32, 0:16], B[0:32, 0:16])
            T.writes(C[0:32, 0:8])
            for i, j, k in T.grid(16, 16, 32):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    lc, ic = T.meta_var(_acc_layout(vi, vj))
                    la, ia = T.meta_var(_frag_layout(vi, vk))
                    lb, ib = T.meta_var(_frag_layout(vj, vk))
                    T.reads(C[lc, ic], A[la, ia], B[lb, ib])
                    T.writes(C[lc, ic])
                    C[lc, ic] += T.Cast("int32", A[la, ia]) * T.Cast("int32", B[lb, ib])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        B = T.match_buffer(b, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        C = T.match_buffer(c, (32, 8), "int32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:32, 0:16], B[0:32, 0:16])
            T.writes(C[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                T.evaluate(_mma_call(A, B, C, tx, 0))
                T.evaluate(_mma_call(A, B, C, tx, 1))

    return desc, impl


def _fill():
    @T.prim_func(s_tir=True)
    def desc(a: T.handle) -> None:
        C = T.match_buffer(a, (32, 8), "int32", scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:32, 0:8])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    lane, index = T.meta_var(_acc_layout(i, j))
                    T.reads()
                    T.writes(C[lane, index])
                    C[lane, index] = T.int32(0)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle) -> None:
        C = T.match_buffer(a, (32, 8), "int32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:32, 0:8])
            for _lane in T.thread_binding(0, 32, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(8, C.data, C.elem_offset, dtype="int32"))

    return desc, impl


def _store(fold: int = 0):
    """Accumulators to a 16 × 16 tile of C: plain stores, or for ``fold`` > 0 (split-K)
    ``atomicAdd`` at the element's offset modulo ``fold`` (the kernel's buffer is declared
    ``(S, G, M, N)``, one partial sum per K piece, and ``fold = G·M·N`` sends every piece to the
    same ``(G, M, N)`` C)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        W = T.match_buffer(a, (32, 8), "int32", scope="warp")
        C = T.match_buffer(c, (16, 16), "int32", scope="global")
        with T.sblock("root"):
            T.reads(W[0:32, 0:8])
            T.writes(C[0:16, 0:16])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    lane, index = T.meta_var(_acc_layout(v0, v1))
                    T.reads(W[lane, index])
                    T.writes(C[v0, v1])
                    C[v0, v1] = W[lane, index]

    atomic, fold = fold > 0, fold or 1

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        off = T.int32()
        W = T.match_buffer(a, (32, 8), "int32", scope="warp", offset_factor=1)
        C = T.match_buffer(
            c, (16, 16), "int32", scope="global", offset_factor=1, strides=[s0, s1], elem_offset=off
        )
        with T.sblock("root"):
            T.reads(W[0:32, 0:8])
            T.writes(C[0:16, 0:16])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                for index in T.unroll(8):
                    row, col = T.meta_var(_acc_position(tx, index))
                    if atomic:
                        address = T.meta_var(
                            C.access_ptr("rw", offset=T.floormod(off, fold) - off + row * s0 + col)
                        )
                        T.evaluate(T.call_extern("int32", "atomicAdd", address, W[tx, index]))
                    else:
                        C[row, col] = W[tx, index]

    return desc, impl


def _register(name: str, make, *args) -> str:
    try:
        TensorIntrin.get(name)
    except Exception:  # not registered yet (TVM raises a ValueError/TVMError)
        TensorIntrin.register(name, *make(*args))
    return name


@functools.lru_cache(maxsize=None)
def register_intrinsics() -> dict[str, str]:
    """Register the fixed intrinsics once per process; returns their names by role."""
    makers = {"ldmatrix_a": (_ldmatrix, "A"), "ldmatrix_b": (_ldmatrix, "B"), "mma": (_mma,)}
    makers.update(fill=(_fill,), store=(_store,))
    return {role: _register(f"fraccompile_mma_{role}_s8s32", *make) for role, make in makers.items()}


def register_atomic_store(fold: int) -> str:
    return _register(f"fraccompile_mma_atomic_add_s32_mod{fold}", _store, fold)


# -- tiles and shapes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MmaTile:
    bm: int = 128  # rows of C per thread block
    bn: int = 128  # columns of C per thread block
    bk: int = 64  # bytes of K staged in shared memory per step (a multiple of 32)
    wm: int = 64  # rows of C per warp
    wn: int = 32  # columns of C per warp

    def __post_init__(self):
        if min(self.bm, self.bn, self.bk, self.wm, self.wn) < 1:
            raise ValueError(f"bad tile {self}: sizes must be positive")
        if self.wm % 16 or self.wn % 16 or self.bk % 32:
            raise ValueError(f"bad tile {self}: wm and wn must be multiples of 16, bk of 32 (mma.m16n8k32)")
        if self.bm % self.wm or self.bn % self.wn:
            raise ValueError(f"bad tile {self}: the warp tile must divide the block tile")
        if self.accumulators > MAX_ACCUMULATORS:
            raise ValueError(
                f"bad tile {self}: {self.accumulators} accumulators per lane (> {MAX_ACCUMULATORS})"
            )
        if self.threads > MAX_THREADS:
            raise ValueError(f"bad tile {self}: {self.threads} threads per block")
        step = 16 * self.threads  # bytes one cooperative copy step moves
        if (self.bm * self.bk) % step or (self.bn * self.bk) % step:
            raise ValueError(
                f"bad tile {self}: {self.threads} threads cannot copy the tiles in 16-byte steps"
            )
        if self.shared_bytes > MAX_SHARED_BYTES:
            raise ValueError(f"bad tile {self}: {self.shared_bytes} bytes of shared memory")

    @property
    def warps(self) -> int:
        return (self.bm // self.wm) * (self.bn // self.wn)

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def accumulators(self) -> int:
        return self.wm * self.wn // 32

    @property
    def shared_bytes(self) -> int:
        factor, offset = SHARED_ROW_ALIGN
        return 2 * (self.bm + self.bn) * (self.bk + (offset - self.bk) % factor)  # two stages


@dataclass(frozen=True)
class MmaGemmShape:
    """A padded problem: M, N a multiple of the block tile, K of ``split_k · bk``."""

    groups: int
    m: int
    n: int
    k: int
    tile: MmaTile
    split_k: int = 1

    kind = "mma"

    def __post_init__(self):
        t = self.tile
        if self.groups < 1 or min(self.m, self.n, self.k) < 1 or self.split_k < 1:
            raise ValueError(f"bad shape {self}")
        if self.m % t.bm or self.n % t.bn or self.k % (t.bk * self.split_k):
            raise ValueError(f"shape {self} is not padded to its tile and K split (use padded())")

    @property
    def name(self) -> str:
        t = self.tile
        return (
            f"cuda_mma_g{self.groups}_m{self.m}_n{self.n}_k{self.k}_s{self.split_k}"
            f"_t{t.bm}x{t.bn}x{t.bk}_w{t.wm}x{t.wn}"
        )

    @property
    def zero(self) -> tuple[str, ...]:
        """The buffers the caller zeroes before each launch: C when the kernel adds into it (split-K)."""
        return ("C",) if self.split_k > 1 else ()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(size: int) -> int:
    """Block width for one of M, N: 128 unless the problem is at most 64 (then 64) or 32 wide."""
    return 128 if size > 64 else 64 if size > 32 else 32


def default_tile(m: int, n: int, k: int) -> MmaTile:
    """A tile for an (unpadded) problem: blocks of 128 (or 64 or 32 for small M or N), warps of
    64 × 32 (32 × 32 in smaller blocks), 64 bytes of K per step."""
    bm, bn = _block(m), _block(n)
    return MmaTile(bm, bn, 64, bm // 2 if bm > 32 else 32, 32)


def split_k_for(groups: int, m: int, n: int, k: int, tile: MmaTile) -> int:
    """How many pieces to cut K into: 1 unless the problem has fewer output tiles than
    ``2 · REFERENCE_SMS`` and at least 8 K steps; then enough pieces for about ``2 ·
    REFERENCE_SMS`` blocks, each of at least 4 K steps, with as little K padding as possible.
    The choice depends on the problem only (not on the GPU), so exported kernels match."""
    tiles = groups * -(-m // tile.bm) * -(-n // tile.bn)
    steps = -(-k // tile.bk)
    if tiles >= 2 * REFERENCE_SMS or steps < 8:
        return 1
    pieces = min(-(-2 * REFERENCE_SMS // tiles), steps // 4)
    return -(-steps // -(-steps // pieces))  # pieces of equal length, fewest padded steps


def padded(
    groups: int, m: int, n: int, k: int, tile: MmaTile | None = None, split_k: int | None = None
) -> MmaGemmShape:
    """The padded shape for a ``(G, M, N, K)`` problem: M, N rounded up to ``bm``, ``bn``, K to
    ``split_k · bk``; ``split_k`` None: :func:`split_k_for`."""
    tile = tile or default_tile(m, n, k)
    if split_k is None:
        split_k = split_k_for(groups, m, n, k, tile)
    if split_k < 1:
        raise ValueError(f"split_k={split_k}: must be at least 1")
    return MmaGemmShape(
        groups, _round_up(m, tile.bm), _round_up(n, tile.bn), _round_up(k, tile.bk * split_k), tile, split_k
    )


def source_hash() -> str:
    """Hash of the code that defines the kernels (this module and :mod:`.cuda`, whose code
    generation and launch reading it shares): part of every cubin cache key."""
    h = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    h.update(pathlib.Path(cuda.__file__).read_bytes())
    return h.hexdigest()[:16]


# -- the schedule ----------------------------------------------------------------------------------
def definition(shape: MmaGemmShape):
    """The partial sums ``C[s, g, m, n]`` over the ``split_k`` pieces of K: with one piece the
    ``(G, M, N)`` product, with more a buffer that the atomic store folds onto ``(G, M, N)``."""
    g, m, n, k, s = shape.groups, shape.m, shape.n, shape.k, shape.split_k
    A = te.placeholder((g, m, k), "int8", name="A")
    B = te.placeholder((g, n, k), "int8", name="B")
    kc = k // s
    r = te.reduce_axis((0, kc), name="k")
    C = te.compute(
        (s, g, m, n),
        lambda p, b, i, j: te.sum(
            A[b, i, p * kc + r].astype("int32") * B[b, j, p * kc + r].astype("int32"), axis=r
        ),
        name="C",
    )
    return te.create_prim_func([A, B, C]).with_attr("global_symbol", shape.name)


def schedule(shape: MmaGemmShape, func=None, store=None) -> s_tir.Schedule:
    """The tensor-core schedule of the module docstring, of :func:`definition` or ``func`` (one
    of the same form: :func:`.cuda_conv.definition`, whose ``A`` is a gather from the input);
    ``store(sch, acc)``: the intrinsic for the write-back ``acc`` instead (:mod:`.cuda_epilogue`)."""
    t, names = shape.tile, register_intrinsics()
    sch = s_tir.Schedule(definition(shape) if func is None else func)
    blk = sch.get_sblock("C")
    *lead, i, j, k = sch.get_loops(blk)
    i, i_frag = sch.split(i, [None, 16])
    j, j_frag = sch.split(j, [None, 16])
    k, k_frag = sch.split(k, [None, 32])
    sch.reorder(*lead, i, j, k, i_frag, j_frag, k_frag)
    outer = sch.blockize(i_frag)  # one 16 x 16 x 32 step: the mma intrinsic's block
    bi, wi, fi = sch.split(i, [None, t.bm // t.wm, t.wm // 16])
    bj, wj, fj = sch.split(j, [None, t.bn // t.wn, t.wn // 16])
    ko, kf = sch.split(k, [None, t.bk // 32])
    sch.reorder(*lead, bi, bj, wi, wj, ko, kf, fi, fj)
    sch.bind(sch.fuse(*lead), "blockIdx.z")  # (piece, group)
    sch.bind(bi, "blockIdx.x")
    sch.bind(bj, "blockIdx.y")
    warp = sch.fuse(wi, wj)
    sch.bind(warp, "threadIdx.y")

    # the A and B tiles of one k step in shared memory, copied in 16-byte vectors
    for idx in (0, 1):
        sh = sch.cache_read(outer, idx, "shared")
        sch.compute_at(sh, ko)
        fused = sch.fuse(*sch.get_loops(sh)[-2:])
        _, wy, lane, vec = sch.split(fused, [None, t.warps, 32, 16])
        sch.bind(wy, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        sch.vectorize(vec)
        sch.storage_align(sh, 0, axis=-2, factor=SHARED_ROW_ALIGN[0], offset=SHARED_ROW_ALIGN[1])

    # fragments in registers ("warp" scope: lane-major), loaded per 32 bytes of k
    frags = [sch.cache_read(outer, idx, "warp") for idx in (0, 1)]
    acc = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(acc, warp)
    rows, cols = sch.get_loops(acc)[-2:]
    ro, ri = sch.split(rows, [None, 16])
    co, ci = sch.split(cols, [None, 16])
    sch.reorder(ro, co, ri, ci)
    # unrolled: constant fragment indices (registers). nvcc unrolls the mma and store loops itself;
    # unrolling them in TIR too gave a 304-byte stack frame (ptxas -v, default tile).
    unrolled = [kf]
    sch.decompose_reduction(outer, ko)
    for frag in frags:
        sch.compute_at(frag, kf)
        rows, cols = sch.get_loops(frag)[-2:]
        ro, ri = sch.split(rows, [None, 16])
        co, ci = sch.split(cols, [None, 32])
        sch.reorder(ro, co, ri, ci)
        unrolled.append(ro)
    for frag in frags:
        sch.transform_layout(
            frag, ("write", 0), lambda g, i, j: (g, i // 16, j // 32, *_frag_layout(i % 16, j % 32))
        )
    sch.transform_layout(
        acc, ("read", 0), lambda p, g, i, j: (p, g, i // 16, j // 16, *_acc_layout(i % 16, j % 16))
    )
    sch.tensorize(sch.get_loops(frags[0])[-2], names["ldmatrix_a"])
    sch.tensorize(sch.get_loops(frags[1])[-2], names["ldmatrix_b"])
    sch.tensorize(sch.get_loops(blk)[-3], names["mma"])
    sch.tensorize(sch.get_loops(sch.get_sblock("C_init"))[-2], names["fill"])
    atomic = shape.split_k > 1 and register_atomic_store(shape.groups * shape.m * shape.n)
    store = store(sch, acc) if store is not None else atomic or names["store"]
    sch.tensorize(sch.get_loops(acc)[-2], store)
    for loop in unrolled:
        sch.unroll(loop)
    # two shared stages: step k+1's tiles copied by cp.async (tirx_source) while step k computes
    for key, value in (("stage", [0, 0, 1]), ("order", [0, 1, 2]), ("async_stages", [0])):
        sch.annotate(ko, f"software_pipeline_{key}", value)
    return sch


# -- code generation -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def lower(shape: MmaGemmShape, arch: str = ARCHS[-1]) -> cuda.Kernel:
    """Schedule ``shape``, generate its CUDA C with TVM, and read the launch geometry (from the
    schedule's thread bindings) and the kernel name and parameter order (from the source)."""
    sch = schedule(shape)
    source = tirx_source(sch.mod, arch)
    kernels = list(cuda._SIGNATURE.finditer(source))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the generated source, found {len(kernels)}")
    bounds, name, params = kernels[0].groups()
    names = tuple(p.split()[-1].removesuffix("_ptr") for p in params.split(","))
    if sorted(names) != ["A", "B", "C"]:
        raise RuntimeError(f"unexpected kernel parameters {params!r}")
    ext = cuda._launch_extents(sch)
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
    t = shape.tile
    expected = ((shape.m // t.bm, shape.n // t.bn, shape.split_k * shape.groups), (32, t.warps, 1))
    if (grid, block) != expected or (bounds and int(bounds) != t.threads):
        raise RuntimeError(
            f"{shape.name}: launch {grid} x {block} (__launch_bounds__ {bounds}) does not match the "
            f"tile: expected {expected[0]} x {expected[1]}"
        )
    if "mma.sync.aligned.m16n8k32" not in source:
        raise RuntimeError(f"{shape.name}: the generated source has no mma.sync")
    return cuda.Kernel(source, name, names, grid, block)


def _call_pass(name: str, rewrite):
    """A TIR pass applying ``rewrite`` to every call node (bottom up)."""

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name=name)
    def apply(func, mod, ctx):
        return func.with_body(tvm_ffi.structural_map(func.body, [(tvm.ir.Call, rewrite)], order="post"))

    return apply


def _lane_local(call):
    """The s8 fragment offsets of ``ldmatrix`` / ``mma`` (warp scope: ``512·f + 16·lane + b``)
    indexed per lane (``16·f + b``), as ``LowerWarpMemory`` does for the accumulators: TVM
    0.27's pass leaves buffers only these intrinsics touch indexed by lane, so nvcc would keep
    them in local memory instead of registers."""
    slots = {"tirx.ptx_legacy.ldmatrix": (4,), "tirx.ptx_legacy.mma": (7, 9)}
    slots = slots.get(call.op.name, ()) if isinstance(call.op, tvm.ir.Op) else ()
    if not slots:
        return call
    local = lambda x: tvm.tirx.floordiv(x, 512) * 16 + tvm.tirx.floormod(x, 16)  # noqa: E731
    args = [local(a) if i in slots else a for i, a in enumerate(call.args)]
    return tvm.ir.Call(call.op, args, call.attrs, call.ty_args, call.span, ret_ty=call.ty)


def _own_lane(call):
    """``tvm_warp_shuffle(mask, v, threadIdx.x, 32, 32)`` -> ``v``: ``LowerWarpMemory`` reads
    each lane's own accumulators (lane = ``threadIdx.x``) through a shuffle."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "tirx.tvm_warp_shuffle"):
        return call
    _, value, lane, width, size = call.args
    own = isinstance(lane, tvm.tirx.Var) and lane.name == "threadIdx.x"
    return value if own and int(width) == int(size) == 32 else call


lower_fragments = _call_pass("FraccompileLowerMmaFragments", _lane_local)
drop_self_shuffles = _call_pass("FraccompileDropSelfShuffles", _own_lane)


def _pipeline():
    """TVM's s_tir pipeline, our passes around its device finalization (``LowerWarpMemory`` ...)."""
    pipeline, host, _ = tvm.tirx.get_tir_pipeline("s_tir")
    t = tvm.tirx.transform
    passes = [lower_fragments, t.LowerWarpMemory(), t.StmtSimplify(), drop_self_shuffles, t.LowerIntrin()]
    return pipeline, host, lambda: tvm.ir.transform.Sequential(passes)


tvm.tirx.compilation_pipeline.register_tir_pipeline("fraccompile_mma", _pipeline)


def tirx_source(mod, arch: str) -> str:
    """The CUDA C TVM generates for a scheduled module, through :func:`_pipeline`, with the
    software pipeline's global→shared copies as ``cp.async`` (``tirx.use_async_copy``)."""
    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        lib = tvm.compile(mod, target=target(arch), tir_pipeline="fraccompile_mma")
    return lib.mod.imports[0].inspect_source()


def combined_source(shapes, arch: str = ARCHS[-1]) -> str:
    """The CUDA C of several kernels in one source (an export's fatbin), each ``<shape name>_kernel``."""
    fns = {s.name: schedule(s).mod["main"].with_attr("global_symbol", s.name) for s in shapes}
    return tirx_source(tvm.IRModule(fns), arch)


def generate_source(shape: MmaGemmShape, arch: str = ARCHS[-1]) -> str:
    """The CUDA C of the kernel for ``shape`` (TVM's codegen, no nvcc involved)."""
    return lower(shape, arch).source


def launch_config(shape: MmaGemmShape, arch: str = ARCHS[-1]):
    """``(grid, block, kernel_name, param_order, zero)`` of the kernel for ``shape``: the caller
    zeroes the buffers named in ``zero`` before the launch (C, for split-K)."""
    k = lower(shape, arch)
    return k.grid, k.block, k.name, k.params, shape.zero


def compile_cubin(shape: MmaGemmShape, arch: str) -> bytes:
    """The kernel for ``shape`` as a cubin (ELF) for ``arch`` (sm_80 or newer: mma.m16n8k32)."""
    return compile_source(generate_source(shape, arch), arch, "cubin")
