"""2-D convs as implicit GEMMs: the VNNI GEMM of :mod:`.gemm` reading the activation codes where
they are, with no im2col matrix. The forward (:func:`definition`) is below; the weight gradient of
stride-1 convs (:func:`gc_definition`) reads the codes as padded planes instead.

Forward:

``C[b, y, x, o] = sum_{i, j, c} X[b, y·sh + i·dh, x·sw + j·dw, c] · B[o, (i, j, c)]`` with ``X``
u8 ``(N, Hp, Wp, C)`` (the codes, sign-flipped and padded by the caller), ``B`` the conv weights
as the GEMM's packed s8 operand ``(OCp/16, kh·kw·C/4, 16, 4)`` (reduction order taps, then
channels, as :func:`fraccompile.targets.backend.roles._im2col`) and ``C`` s32 ``(N, OH, OW, OCp)``: the
rows of the GEMM ``C = patches · Bᵀ``, in the order the output is laid out channels-last.

The schedule is :func:`fraccompile.targets.kernels.gemm.schedule`'s: a register block of ``mb`` output
positions along a row times ``nb`` vectors of 16 output channels, the reduction innermost in
steps of 4 channels, each step one ``vpdpbusd`` per accumulator through the same tensor
intrinsic. Four consecutive channels of one tap at one position are 4 contiguous bytes of ``X``,
which is what the intrinsic broadcasts, so the patches never exist in memory: a stage-1 ResNet-20
conv reads 2.3 MB of codes instead of writing and reading an 18.9 MB patch matrix. The (batch,
output row, channel block) loop is parallel. Needs ``C % 4 == 0`` and ``mb`` dividing ``OW`` (the
backend takes the packed-A path otherwise) and an AVX-512 VNNI host. ``bench/kernels.py`` times
these kernels on ResNet-20's convs, forward and weight gradient, against ``torch._int_mm`` on the
im2col GEMMs (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm.s_tir as s_tir
from tvm import te

from .gemm import vnni_block

MAX_ACCUMULATORS = 24  # of the 32 zmm registers, as the GEMM's 6x4 block


class _Args:
    @property
    def args(self) -> tuple:
        """The fields in order: a :class:`~fraccompile.targets.runtime.library.KernelRef`'s arguments."""
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)


def _channel_vectors(oc: int) -> int:
    """``nb``: up to 4 vectors of 16 output channels, dividing the padded channels."""
    n16 = -(-oc // 16)
    return next(b for b in (4, 3, 2, 1) if n16 % b == 0)


@dataclass(frozen=True)
class ConvShape(_Args):
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


def block(ow: int, oc: int) -> tuple[int, int] | None:
    """``(mb, nb)`` for ``ow`` output columns and ``oc`` output channels: ``nb`` up to 4 vectors
    dividing the padded channels, ``mb`` the largest divisor of ``ow`` up to 16 that keeps
    ``mb·nb`` accumulators in registers; None when only 1 would (a scalar row loop)."""
    nb = _channel_vectors(oc)
    mb = next((m for m in range(min(16, MAX_ACCUMULATORS // nb), 1, -1) if ow % m == 0), None)
    return None if mb is None else (mb, nb)


def forward_shape(x_shape, w_shape, stride, padding, dilation, out_sp, max_k: int) -> ConvShape | None:
    """The implicit-GEMM forward of a 2-D conv on channels-last codes ``x_shape (N, H, W, C)``,
    or None where it does not apply: ``C`` not a multiple of 4, no register block dividing the
    output width, or a reduction over ``max_k`` (the exact-sum limit)."""
    n, h, w, c = x_shape
    oc, k = w_shape[0], c * w_shape[2] * w_shape[3]
    blk = block(out_sp[1], oc)
    if c % 4 or blk is None or k > max_k:
        return None
    (ph, pw), (mb, nb) = padding, blk
    return ConvShape(
        n,
        h + 2 * ph,
        w + 2 * pw,
        c,
        *w_shape[2:],
        *stride,
        *dilation,
        *out_sp,
        -(-oc // (16 * nb)) * 16 * nb,
        mb,
        nb,
    )


def definition(s: ConvShape, dequantize: bool = False, row_term: bool = False):
    """The int32 product ``C`` (``main(X, B, C)``); with ``dequantize`` the output is fp32
    ``Y[b, y, x, o] = float(C[b, y, x, o] + cc[o]) · scale[o] + bias[o]`` instead
    (``main(X, B, cc, scale, bias, Y)``), the backend's dequantize epilogue
    (:func:`fraccompile.targets.kernels.quantize.dequant_definition` with no row term). ``row_term``
    adds a rank-one term ``r[b, y, x] · t[o]`` (``main(X, B, cc, scale, bias, r, t, Y)``): a
    weight zero point's, ``sx·Σ_window qx`` per output position times ``zw`` per channel."""
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
            axis=[ri, rj, rc],
        ),
        name="C",
    )
    if not dequantize:
        return te.create_prim_func([X, B, C]).with_attr("global_symbol", "main")
    cc = te.placeholder((s.ocp,), "int32", name="cc")
    scale = te.placeholder((s.ocp,), "float32", name="scale")
    bias = te.placeholder((s.ocp,), "float32", name="bias")
    if not row_term:
        Y = te.compute(
            (s.n, s.oh, s.ow, s.ocp),
            lambda b, y, x, o: (C[b, y, x, o] + cc[o]).astype("float32") * scale[o] + bias[o],
            name="Y",
        )
        return te.create_prim_func([X, B, cc, scale, bias, Y]).with_attr("global_symbol", "main")
    r = te.placeholder((s.n, s.oh, s.ow), "float32", name="r")
    t = te.placeholder((s.ocp,), "float32", name="t")
    Y = te.compute(
        (s.n, s.oh, s.ow, s.ocp),
        lambda b, y, x, o: (C[b, y, x, o] + cc[o]).astype("float32") * scale[o] + bias[o] + r[b, y, x] * t[o],
        name="Y",
    )
    return te.create_prim_func([X, B, cc, scale, bias, r, t, Y]).with_attr("global_symbol", "main")


def schedule(*args, dequantize: bool = False, row_term: bool = False) -> s_tir.Schedule:
    """The scheduled conv for :class:`ConvShape` ``args`` (VNNI only); ``dequantize``: the fp32
    form of :func:`definition`, its epilogue applied to the accumulators as they leave the
    registers (no int32 product in memory, no second pass over it)."""
    s = ConvShape(*args)
    sch = s_tir.Schedule(definition(s, dequantize or row_term, row_term))
    blk = sch.get_sblock("C")
    b, y, x, o, ri, rj, rc = sch.get_loops(blk)
    xo, xi = sch.split(x, [None, s.mb])
    oo, on, ol = sch.split(o, [None, s.nb, 16])
    rco, rci = sch.split(rc, [None, 4])
    sch.reorder(b, y, oo, xo, ri, rj, rco, xi, on, ol, rci)
    vnni_block(sch, ol, xo, (b, y, oo), ri, (on, xi), epilogue="Y" if dequantize or row_term else None)
    return sch


def dq_schedule(*args) -> s_tir.Schedule:
    """:func:`schedule` with ``dequantize`` (the kernel kind ``conv_dq``)."""
    return schedule(*args, dequantize=True)


def dqz_schedule(*args) -> s_tir.Schedule:
    """:func:`schedule` with ``dequantize`` and the rank-one ``row_term`` (kind ``conv_dqz``)."""
    return schedule(*args, dequantize=True, row_term=True)


@dataclass(frozen=True)
class GcShape(_Args):
    """A stride-1 conv's weight gradient as an implicit GEMM: the padded input planes
    ``(n, c, hp, wp)``, the kernel and dilations, the output size (``ow % 4 == 0``), the output
    channels padded to ``16·nb``; ``mb`` (input channels) × ``nb`` is the register block."""

    n: int
    c: int
    hp: int
    wp: int
    kh: int
    kw: int
    dh: int
    dw: int
    oh: int
    ow: int
    ocp: int
    mb: int
    nb: int

    def __post_init__(self):
        if self.ow % 4 or self.c % self.mb or self.ocp % (16 * self.nb):
            raise ValueError(f"bad weight-gradient shape {self}")


def gc_block(c: int, oc: int) -> tuple[int, int]:
    """``(mb, nb)`` for the weight gradient: ``nb`` as :func:`block`, ``mb`` the largest divisor of
    the input channels ``c`` that keeps ``mb·nb`` accumulators in registers."""
    nb = _channel_vectors(oc)
    return next(m for m in range(min(16, MAX_ACCUMULATORS // nb), 0, -1) if c % m == 0), nb


def gc_shapes(x_shape, w_shape, stride, padding, dilation, out_sp, max_k: int) -> list[GcShape] | None:
    """The implicit-GEMM weight gradient of a 2-D conv on channels-last codes ``x_shape (N, H,
    W, C)``: one :class:`GcShape` per batch chunk, each chunk's positions within ``max_k`` (the
    exact-sum limit); None where it does not apply (a stride, an output width not a multiple of
    4, or one image's positions over ``max_k``)."""
    n, h, w, c = x_shape
    per = out_sp[0] * out_sp[1]
    if tuple(stride) != (1, 1) or out_sp[1] % 4 or per > max_k:
        return None
    (ph, pw), oc = padding, w_shape[0]
    mb, nb = gc_block(c, oc)
    ocp = -(-oc // (16 * nb)) * 16 * nb
    chunk = min(n, max_k // per)
    return [
        GcShape(min(chunk, n - b0), c, h + 2 * ph, w + 2 * pw, *w_shape[2:], *dilation, *out_sp, ocp, mb, nb)
        for b0 in range(0, n, chunk)
    ]


def gc_definition(s: GcShape):
    """``C[i, j, c, o] = sum_{b, y, x} XT[b, c, y + i·dh, x + j·dw] · DY[b, y, x, o]``: ``XT`` u8
    the input codes as padded planes (sign-flipped; NCHW, so that a batch range is one block),
    ``DY`` the output-gradient codes as the GEMM's packed s8 B over (output channel, position):
    ``(OCp/16, N·OH·OW/4, 16, 4)``. Four consecutive output positions of a row read 4 contiguous
    bytes of a plane (stride 1), the word the VNNI intrinsic broadcasts."""
    XT = te.placeholder((s.n, s.c, s.hp, s.wp), "uint8", name="XT")
    B = te.placeholder((s.ocp // 16, s.n * s.oh * s.ow // 4, 16, 4), "int8", name="B")
    rb = te.reduce_axis((0, s.n), name="rb")
    ry = te.reduce_axis((0, s.oh), name="ry")
    rx = te.reduce_axis((0, s.ow), name="rx")
    ow4 = s.ow // 4
    C = te.compute(
        (s.kh, s.kw, s.c, s.ocp),
        lambda i, j, c, o: te.sum(
            XT[rb, c, ry + i * s.dh, rx + j * s.dw].astype("int32")
            * B[o // 16, (rb * s.oh + ry) * ow4 + rx // 4, o % 16, rx % 4].astype("int32"),
            axis=[rb, ry, rx],
        ),
        name="C",
    )
    return te.create_prim_func([XT, B, C]).with_attr("global_symbol", "main")


def gc_schedule(*args) -> s_tir.Schedule:
    """The scheduled weight gradient for :class:`GcShape` ``args`` (VNNI only): register blocks of
    ``mb`` input channels × ``nb`` vectors of output channels, the (tap, channel block, output
    block) loop parallel, the reduction over positions in steps of 4."""
    s = GcShape(*args)
    sch = s_tir.Schedule(gc_definition(s))
    blk = sch.get_sblock("C")
    i, j, c, o, rb, ry, rx = sch.get_loops(blk)
    co, ci = sch.split(c, [None, s.mb])
    oo, on, ol = sch.split(o, [None, s.nb, 16])
    rxo, rxi = sch.split(rx, [None, 4])
    sch.reorder(i, j, co, oo, rb, ry, rxo, ci, on, ol, rxi)
    vnni_block(sch, ol, oo, (i, j, co, oo), rb, (on, ci))
    return sch
