"""The integer GEMM every site role lowers to, as a TE definition and a hand-written TIR schedule.

``C[g, m, n] = sum_k A[g, m, k] * B[g, n, k]`` with ``A`` u8, ``B`` s8 and ``C`` s32 (exact: the
callers keep ``K`` under 2**31 / (255·128)). ``B`` is passed packed as ``(G, N/16, K/4, 16, 4)`` —
the layout the 16x4 VNNI instruction reads in one load. Shapes are padded to the tile sizes by the
caller (zeros in A and B add nothing), so one kernel is built per padded shape and tile.

With an ``epilogue`` (:func:`definition`) the kernel writes the dequantized fp32 product instead of
the int32 one: the backend's dequantize pass
(:func:`fraccompile.targets.kernels.quantize.dequant_definition`, the same expression) applied to
the accumulators as they leave the registers, so the int32 product never goes to memory.

Schedule (VNNI): the ``m`` axis in blocks of ``mb`` rows and ``n`` in ``nb`` vectors of 16, so the
``mb × nb`` int32x16 accumulators live in registers (24 of the 32 zmm registers at 6×4); ``k`` in
blocks of ``kb`` (32: it led 6x4x64 in same-run sweeps on 1024³; the machine's speed drifts
between runs, so only same-run comparisons count); the (group, n-block,
m-block) loop is fused and parallel over the cores. Without VNNI the same loop nest is vectorized
over ``n`` by LLVM (correct, several times slower).
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from dataclasses import dataclass

import tvm
import tvm.s_tir as s_tir
from tvm import te

from ..runtime.host import HostTarget, detect
from . import intrin


@dataclass(frozen=True)
class Tile:
    mb: int = 6  # rows of A per register block
    nb: int = 4  # 16-wide column vectors per register block
    kb: int = 32  # reduction block (a multiple of 4)

    def __post_init__(self):
        if self.mb < 1 or self.nb < 1 or self.kb < 4 or self.kb % 4:
            raise ValueError(f"bad tile {self}")


@dataclass(frozen=True)
class GemmShape:
    """A padded problem: every size a multiple of its tile."""

    groups: int
    m: int
    n: int
    k: int
    tile: Tile

    @property
    def name(self) -> str:
        t = self.tile
        return f"gemm_g{self.groups}_m{self.m}_n{self.n}_k{self.k}_t{t.mb}x{t.nb}x{t.kb}"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_tile(m: int, n: int, k: int) -> Tile:
    """A tile for an (unpadded) problem: a 6-, 4- or 8-row register block, whichever pads fewest
    rows (ties: the first), and ``nb``/``kb`` dividing the 16- and 4-padded sizes."""
    mb = m if m < 4 else min((6, 4, 8), key=lambda b: _round_up(m, b) - m)
    n16 = _round_up(n, 16) // 16
    nb = next(b for b in (4, 3, 2, 1) if n16 % b == 0)
    k4 = _round_up(k, 4)
    kb = next(b for b in (32, 64, 48, 16, 8, 4) if k4 % b == 0)  # 32 measured best on 1024³
    return Tile(mb, nb, kb)


def padded(groups: int, m: int, n: int, k: int, tile: Tile | None = None) -> GemmShape:
    tile = tile or default_tile(m, n, k)
    return GemmShape(groups, _round_up(m, tile.mb), _round_up(n, 16 * tile.nb), _round_up(k, tile.kb), tile)


@functools.lru_cache(maxsize=None)  # read once per process: every cache lookup keys on it
def source_hash() -> str:
    """Hash of the code that defines the kernels: part of every cache key."""
    h = hashlib.sha256()
    targets = pathlib.Path(__file__).parent.parent
    for name in ("kernels/gemm.py", "kernels/intrin.py", "runtime/host.py"):
        h.update((targets / name).read_bytes())
    return h.hexdigest()[:16]


EPILOGUES = ("dq", "dqz")


def definition(shape: GemmShape, epilogue: str | None = None):
    """``main(A, B, C)``: the int32 product. ``epilogue`` ``"dq"``: ``main(A, B, rc, cc, scale,
    bias, Y)`` with ``Y[g, m, n] = float(C[g, m, n] + rc[g, m] + cc[g, n]) · scale[n] + bias[n]``
    (fp32; ``rc``/``cc`` int32 sign corrections, ``scale``/``bias`` per column); ``"dqz"``: also
    ``+ p[g, m]·t[n]`` before the bias (``main(A, B, rc, cc, scale, bias, p, t, Y)``), an ``sbm``
    weight zero point's term. ``Y`` has the padded shape: the caller keeps the rows it asked for."""
    if epilogue is not None and epilogue not in EPILOGUES:
        raise ValueError(f"GEMM epilogue {epilogue!r}: choose one of {EPILOGUES}")
    g, m, n, k = shape.groups, shape.m, shape.n, shape.k
    A = te.placeholder((g, m, k), "uint8", name="A")
    B = te.placeholder((g, n // 16, k // 4, 16, 4), "int8", name="B")
    r = te.reduce_axis((0, k), name="k")
    C = te.compute(
        (g, m, n),
        lambda b, i, j: te.sum(
            A[b, i, r].astype("int32") * B[b, j // 16, r // 4, j % 16, r % 4].astype("int32"), axis=r
        ),
        name="C",
    )
    if epilogue is None:
        return te.create_prim_func([A, B, C]).with_attr("global_symbol", "main")
    rc = te.placeholder((g, m), "int32", name="rc")
    cc = te.placeholder((g, n), "int32", name="cc")
    scale = te.placeholder((n,), "float32", name="scale")
    bias = te.placeholder((n,), "float32", name="bias")
    extra, term = [], None
    if epilogue == "dqz":
        p = te.placeholder((g, m), "float32", name="p")
        t = te.placeholder((n,), "float32", name="t")
        extra, term = [p, t], lambda b, i, j: p[b, i] * t[j]

    def value(b, i, j):  # the order of quantize.dequant_definition's expression: the same bits
        y = (C[b, i, j] + rc[b, i] + cc[b, j]).astype("float32") * scale[j]
        return (y if term is None else y + term(b, i, j)) + bias[j]

    Y = te.compute((g, m, n), value, name="Y")
    return te.create_prim_func([A, B, rc, cc, scale, bias, *extra, Y]).with_attr("global_symbol", "main")


def schedule(shape: GemmShape, isa: str, epilogue: str | None = None) -> s_tir.Schedule:
    """The scheduled GEMM (``epilogue``: see :func:`definition`; VNNI only)."""
    t = shape.tile
    if epilogue is not None and isa != "avx512-vnni":
        raise ValueError(f"the GEMM with a dequantize epilogue is built for avx512-vnni, not {isa}")
    sch = s_tir.Schedule(definition(shape, epilogue))
    blk = sch.get_sblock("C")
    b, i, j, kk = sch.get_loops(blk)
    io, ii = sch.split(i, [None, t.mb])
    jo, jn, ji = sch.split(j, [None, t.nb, 16])
    ko, kin, ki = sch.split(kk, [None, t.kb // 4, 4])
    sch.reorder(b, jo, io, ko, kin, ii, jn, ji, ki)
    if isa == "avx512-vnni":
        vnni_block(sch, ji, io, (b, jo, io), ko, (jn, ii), epilogue="Y" if epilogue else None)
    else:  # no integer dot instruction: k outside, LLVM vectorizes the 16 contiguous lanes of n
        sch.reorder(b, jo, io, ko, kin, ki, ii, jn, ji)
        sch.parallel(sch.fuse(b, jo, io))
        sch.decompose_reduction(blk, ko)
        sch.unroll(jn)
        sch.unroll(ii)
    return sch


def vnni_block(
    sch: s_tir.Schedule, lanes, acc_at, parallel, reduction, unrolled, epilogue: str | None = None
) -> None:
    """The register block every VNNI kernel ends in, on loops already split and ordered so that
    ``lanes`` (16 output lanes) and the 4-element reduction under it are innermost: those two
    become one ``vpdpbusd`` (:mod:`.intrin`), the accumulators live in registers from the first
    ``reduction`` loop on and are written back at ``acc_at`` (vectorized), the ``parallel`` loops
    are fused and run over the cores, the ``unrolled`` ones (the register block) unrolled.
    ``epilogue``: the name of an elementwise block that consumes the product (same indices);
    it is inlined into the write-back, so the registers go straight into its output."""
    inner = sch.blockize(lanes)
    acc = sch.cache_write(inner, 0, "global")
    if epilogue is not None:
        sch.reverse_compute_inline(sch.get_sblock(epilogue))
    sch.reverse_compute_at(acc, acc_at)
    sch.parallel(sch.fuse(*parallel))
    sch.decompose_reduction(inner, reduction)
    sch.tensorize(inner, intrin.register())
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(acc)[-1])


def scheduled(shape: GemmShape, isa: str, name: str = "main"):
    """The scheduled PrimFunc of ``shape``, exported under the symbol ``name``."""
    return schedule(shape, isa).mod["main"].with_attr("global_symbol", name)


def build(shape: GemmShape, host: HostTarget | None = None):
    """Compile one kernel; returns the TVM executable (``lib["main"](A, B, C)``)."""
    host = host or detect()
    return tvm.compile(schedule(shape, host.isa).mod, target=host.target())
