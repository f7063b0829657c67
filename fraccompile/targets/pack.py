"""Operand packing as TVM kernels: the layouts the GEMM reads, built in one parallel pass.

* :func:`pack_a` — ``A (G, Mp, Kp)`` u8 from codes laid out ``(G, M, K)`` (``"mk"``) or
  ``(G, K, M)`` (``"km"``, a transpose: the weight-gradient GEMM reads activations and gradients
  along the batch axis), zero-padded, with the sign bit flipped for signed codes (int8 ``x`` ->
  uint8 ``x + 128``).
* :func:`pack_b` — ``B (G, Np/16, Kp/4, 16, 4)`` s8 from ``(G, N, K)`` or ``(G, K, N)``,
  zero-padded, sign bit flipped for unsigned codes (uint8 ``x`` -> int8 ``x - 128``); row ``N``
  is ones when there is room, so the GEMM also returns A's row sums.

torch does the same with strided byte copies, several times slower (a 131072×144 uint8 transpose:
~40 ms in torch, ~8 ms here on 2 cores). Shapes are symbolic: one kernel per layout.
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm import te, tirx

from .host import detect


def _vars(*names):
    return [te.var(n, "int64") for n in names]


def _a_definition(layout: str):
    G, M, K, Mp, Kp = _vars("G", "M", "K", "Mp", "Kp")
    shape = (G, M, K) if layout == "mk" else (G, K, M)
    src = te.placeholder(shape, "uint8", name="src")
    flip = te.placeholder((1,), "uint8", name="flip")

    def value(g, m, k):  # row M (when Mp > M) is ones: the GEMM then also yields B's row sums
        v = src[g, m, k] if layout == "mk" else src[g, k, m]
        zero, one = tirx.const(0, "uint8"), tirx.const(1, "uint8")
        pad = tirx.if_then_else(tirx.all(m == M, k < K), one, zero)
        return tirx.if_then_else(tirx.all(m < M, k < K), tirx.bitwise_xor(v, flip[0]), pad)

    out = te.compute((G, Mp, Kp), value, name="out")
    return te.create_prim_func([src, flip, out]).with_attr("global_symbol", "main")


def _b_definition(layout: str):
    G, N, K, NB, KB = _vars("G", "N", "K", "NB", "KB")
    shape = (G, N, K) if layout == "nk" else (G, K, N)
    src = te.placeholder(shape, "uint8", name="src")
    flip = te.placeholder((1,), "uint8", name="flip")

    def value(g, nb, kb, ni, ki):  # row N (when there is room) is ones: A's row sums
        n, k = nb * 16 + ni, kb * 4 + ki
        v = src[g, n, k] if layout == "nk" else src[g, k, n]
        zero, one = tirx.const(0, "uint8"), tirx.const(1, "uint8")
        pad = tirx.if_then_else(tirx.all(n == N, k < K), one, zero)
        return tirx.if_then_else(tirx.all(n < N, k < K), tirx.bitwise_xor(v, flip[0]), pad)

    out = te.compute((G, NB, KB, 16, 4), value, name="out")
    return te.create_prim_func([src, flip, out]).with_attr("global_symbol", "main")


def _compile(sch):
    return tvm.compile(sch.mod, target=detect().target())["main"]


@functools.lru_cache(maxsize=None)
def a_kernel(layout: str):
    return _compile(a_schedule(layout))


@functools.lru_cache(maxsize=None)
def b_kernel(layout: str):
    return _compile(b_schedule(layout))


@functools.lru_cache(maxsize=None)
def conv_b_kernel(*shape_args):
    """B of a 2-D conv's weight gradient straight from channels-last activation codes: the im2col
    patches of output positions ``k0 .. k0+kc`` packed in the 16x4 layout (row N of ones), one
    pass instead of an im2col copy and a pack (a 131072x144 chunk: ~3 ms against ~30 ms).
    ``shape_args``: N, H, W, C, kh, kw, stride, padding, dilation (per axis), OH, OW, k0, kc and
    the packed extents; static, so built once per conv and chunk (~0.3 s)."""
    return _compile(conv_b_schedule(*shape_args))


def a_schedule(layout: str) -> s_tir.Schedule:
    sch = s_tir.Schedule(_a_definition(layout))
    g, m, k = sch.get_loops(sch.get_sblock("out"))
    if layout == "mk":
        ko, ki = sch.split(k, [None, 64])
        sch.parallel(sch.fuse(g, m))
        sch.vectorize(ki)
    else:  # a tiled transpose: 32x32 blocks, both sides stay in cache
        mo, mi = sch.split(m, [None, 32])
        ko, ki = sch.split(k, [None, 32])
        sch.reorder(g, mo, ko, mi, ki)
        sch.parallel(sch.fuse(g, mo, ko))
        sch.vectorize(ki)
    return sch


def b_schedule(layout: str) -> s_tir.Schedule:
    sch = s_tir.Schedule(_b_definition(layout))
    g, nb, kb, ni, ki = sch.get_loops(sch.get_sblock("out"))
    if layout == "kn":  # whole source rows per step: 4 rows x 16 bytes per store
        sch.reorder(g, kb, nb, ki, ni)
        sch.parallel(sch.fuse(g, kb))
    else:
        sch.parallel(sch.fuse(g, nb))
    sch.vectorize(ni)
    sch.unroll(ki)
    return sch


def _conv_b_definition(n, h, w, c, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, k0, kc, nb_, kb_):
    x = te.placeholder((n, h, w, c), "uint8", name="x")
    flip = te.placeholder((1,), "uint8", name="flip")
    ck = kh * kw * c

    def value(g, nb, kb, ni, ki):
        row, col = nb * 16 + ni, kb * 4 + ki          # row: (i, j, channel); col: output position
        m = col + k0
        b, r = m // (oh * ow), m % (oh * ow)
        ij, ch = row // c, row % c
        y = (r // ow) * sh + (ij // kw) * dh - ph
        z = (r % ow) * sw + (ij % kw) * dw - pw
        inside = tirx.all(y >= 0, y < h, z >= 0, z < w)
        yc, zc = tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(z, w - 1), 0)
        zero, one = tirx.const(0, "uint8"), tirx.const(1, "uint8")
        v = tirx.bitwise_xor(tirx.if_then_else(inside, x[b, yc, zc, ch], zero), flip[0])
        pad = tirx.if_then_else(tirx.all(row == ck, col < kc), one, zero)
        return tirx.if_then_else(tirx.all(row < ck, col < kc), v, pad)

    out = te.compute((1, nb_, kb_, 16, 4), value, name="out")
    return te.create_prim_func([x, flip, out]).with_attr("global_symbol", "main")


def conv_b_schedule(*shape_args) -> s_tir.Schedule:
    sch = s_tir.Schedule(_conv_b_definition(*shape_args))
    g, nb, kb, ni, ki = sch.get_loops(sch.get_sblock("out"))
    sch.reorder(g, kb, nb, ki, ni)
    sch.parallel(sch.fuse(g, kb))
    sch.vectorize(ni)
    sch.unroll(ki)
    return sch
