"""The forward of a 2-D conv as an implicit GEMM: the VNNI GEMM of :mod:`.gemm` reading its A
operand straight from the padded channels-last activation codes, with no im2col matrix.

``C[b, y, x, o] = sum_{i, j, c} X[b, y·sh + i·dh, x·sw + j·dw, c] · B[o, (i, j, c)]`` with ``X``
u8 ``(N, Hp, Wp, C)`` (the codes, sign-flipped and padded by the caller), ``B`` the conv weights
as the GEMM's packed s8 operand ``(OCp/16, kh·kw·C/4, 16, 4)`` (reduction order taps, then
channels, as :func:`fraccompile.targets.backend._im2col`) and ``C`` s32 ``(N, OH, OW, OCp)``: the
rows of the GEMM ``C = patches · Bᵀ``, in the order the output is laid out channels-last.

The schedule is :func:`fraccompile.targets.gemm.schedule`'s: a register block of ``mb`` output
positions along a row times ``nb`` vectors of 16 output channels, the reduction innermost in
steps of 4 channels, each step one ``vpdpbusd`` per accumulator through the same tensor
intrinsic. Four consecutive channels of one tap at one position are 4 contiguous bytes of ``X``,
which is what the intrinsic broadcasts, so the patches never exist in memory: a stage-1 ResNet-20
conv reads 2.3 MB of codes instead of writing and reading an 18.9 MB patch matrix. The (batch,
output row, channel block) loop is parallel. Needs ``C % 4 == 0`` and ``mb`` dividing ``OW`` (the
backend takes the packed-A path otherwise) and an AVX-512 VNNI host.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm.s_tir as s_tir
from tvm import te

from . import intrin

MAX_ACCUMULATORS = 24  # of the 32 zmm registers, as the GEMM's 6x4 block


@dataclass(frozen=True)
class ConvShape:
    """A conv forward problem: the padded input ``(n, hp, wp, c)``, the kernel, strides and
    dilations, the output size and the output channels padded to ``16·nb``; ``mb`` × ``nb`` is the
    register block."""

    n: int
    hp: int
    wp: int
    c: int
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    oh: int
    ow: int
    ocp: int
    mb: int
    nb: int

    def __post_init__(self):
        if self.c % 4 or self.ow % self.mb or self.ocp % (16 * self.nb):
            raise ValueError(f"bad conv shape {self}")

    @property
    def args(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)


def block(ow: int, oc: int) -> tuple[int, int] | None:
    """``(mb, nb)`` for ``ow`` output columns and ``oc`` output channels: ``nb`` up to 4 vectors
    dividing the padded channels, ``mb`` the largest divisor of ``ow`` up to 16 that keeps
    ``mb·nb`` accumulators in registers; None when only 1 would (a scalar row loop)."""
    n16 = -(-oc // 16)
    nb = next(b for b in (4, 3, 2, 1) if n16 % b == 0)
    mb = next((m for m in range(min(16, MAX_ACCUMULATORS // nb), 1, -1) if ow % m == 0), None)
    return None if mb is None else (mb, nb)


def definition(s: ConvShape):
    X = te.placeholder((s.n, s.hp, s.wp, s.c), "uint8", name="X")
    B = te.placeholder((s.ocp // 16, s.kh * s.kw * s.c // 4, 16, 4), "int8", name="B")
    ri = te.reduce_axis((0, s.kh), name="ri")
    rj = te.reduce_axis((0, s.kw), name="rj")
    rc = te.reduce_axis((0, s.c), name="rc")
    c4 = s.c // 4
    C = te.compute(
        (s.n, s.oh, s.ow, s.ocp),
        lambda b, y, x, o: te.sum(
            X[b, y * s.sh + ri * s.dh, x * s.sw + rj * s.dw, rc].astype("int32")
            * B[o // 16, (ri * s.kw + rj) * c4 + rc // 4, o % 16, rc % 4].astype("int32"),
            axis=[ri, rj, rc]),
        name="C")
    return te.create_prim_func([X, B, C]).with_attr("global_symbol", "main")


def schedule(*args) -> s_tir.Schedule:
    """The scheduled conv for :class:`ConvShape` ``args`` (VNNI only)."""
    s = ConvShape(*args)
    sch = s_tir.Schedule(definition(s))
    blk = sch.get_sblock("C")
    b, y, x, o, ri, rj, rc = sch.get_loops(blk)
    xo, xi = sch.split(x, [None, s.mb])
    oo, on, ol = sch.split(o, [None, s.nb, 16])
    rco, rci = sch.split(rc, [None, 4])
    sch.reorder(b, y, oo, xo, ri, rj, rco, xi, on, ol, rci)
    inner = sch.blockize(ol)
    acc = sch.cache_write(inner, 0, "global")
    sch.reverse_compute_at(acc, xo)
    sch.parallel(sch.fuse(b, y, oo))
    sch.decompose_reduction(inner, ri)
    sch.tensorize(inner, intrin.register())
    sch.unroll(on)
    sch.unroll(xi)
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch
