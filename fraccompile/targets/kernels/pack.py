"""Operand packing as TVM kernels: the layouts the GEMM reads, built in one parallel pass.

* :func:`pack_a` — ``A (G, Mp, Kp)`` u8 from codes laid out ``(G, M, K)`` (``"mk"``) or
  ``(G, K, M)`` (``"km"``, a transpose: the weight-gradient GEMM reads activations and gradients
  along the batch axis), zero-padded, with the sign bit flipped for signed codes (int8 ``x`` ->
  uint8 ``x + 128``).
* :func:`pack_b` — ``B (G, Np/16, Kp/4, 16, 4)`` s8 from ``(G, N, K)`` or ``(G, K, N)``,
  zero-padded, sign bit flipped for unsigned codes (uint8 ``x`` -> int8 ``x - 128``); row ``N``
  is ones when there is room, so the GEMM also returns A's row sums.

torch does the same with strided byte copies, several times slower (``bench/packing.py``).
Shapes are symbolic: one kernel per layout.
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm import te, tirx
from tvm.script import tirx as T

from ..runtime.host import detect


def _vars(*names):
    return [te.var(n, "int64") for n in names]


TILE_M, TILE_K = 16, 64  # the transposing pack moves 16x64 tiles (16 rows: conv GC has 16 channels)
# The transposing packs' parallel loops run over chunks of this many tiles or blocks: the local
# buffer of each is allocated once per chunk (a TVMBackendAllocWorkspace call inside a parallel
# loop), not once per tile.
CHUNK = 64


def _a_definition(layout: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(src, flip, out)``: ``out (G, Mp, Kp)`` from ``src`` (G, M, K) (``"mk"``) or
    (G, K, M) (``"km"``). Row ``M`` (when ``Mp > M``) is ones, so the GEMM also yields B's row
    sums; the rest of the padding is zeros.

    Written out in TVMScript: whole rows (``"mk"``) or whole 16x64 tiles (``"km"``) run as vector
    code, the edges as scalar code. The TE form (one compute, its symbolic extent split by 64)
    kept a bounds predicate in the vector loop, which TVM lowers to scalar code, many times
    slower for the ``"mk"`` pack and a conv gradient's ``"km"`` transpose (``bench/packing.py``).
    The tiles are 16 rows high because a conv gradient has as few as 16 channels: with 32-row
    tiles every one of its tiles was an edge."""
    L, tm, tk = T.int64(64), T.int64(TILE_M), T.int64(TILE_K)
    loop = T.parallel if parallel else T.serial

    # Per-iteration values go in as macro arguments (inlined expressions): a variable bound inside
    # a parallel loop costs a TVMBackendAllocWorkspace/FreeWorkspace pair per iteration in TVM
    # 0.27's CPU code generation.
    @T.macro
    def mk_row(src, flip, out, g, m, M, K, Kp):
        if m < M:
            for k0 in range(K // L):
                for k1 in T.vectorized(L):
                    out[g, m, k0 * L + k1] = T.bitwise_xor(src[g, m, k0 * L + k1], flip[0])
            for k in range(K // L * L, K):
                out[g, m, k] = T.bitwise_xor(src[g, m, k], flip[0])
            for k in range(K, Kp):
                out[g, m, k] = T.uint8(0)
        else:
            for k in range(Kp):
                out[g, m, k] = T.Select(m == M and k < K, T.uint8(1), T.uint8(0))

    if layout == "mk":

        @T.prim_func(s_tir=True)
        def main(src_h: T.handle, flip: T.Buffer((1,), "uint8"), out_h: T.handle):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            G, M, K, Mp, Kp = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            src = T.match_buffer(src_h, (G, M, K), "uint8")
            out = T.match_buffer(out_h, (G, Mp, Kp), "uint8")
            for gm in loop(G * Mp):
                mk_row(src, flip, out, gm // Mp, gm % Mp, M, K, Kp)

        return main

    @T.macro
    def km_edge(src, flip, out, g, m, k, M, K):
        out[g, m, k] = T.Select(
            m < M and k < K,
            T.bitwise_xor(src[g, T.min(k, K - 1), T.min(m, M - 1)], flip[0]),
            T.Select(m == M and k < K, T.uint8(1), T.uint8(0)),
        )

    @T.macro
    def km_tile(src, flip, out, tile, g, m0, k0, M, K, Mp, Kp):
        if m0 + tm <= M and k0 + tk <= K:  # an inner tile: through a local buffer
            for ki in range(T.int64(TILE_K)):
                for mi in T.vectorized(T.int64(TILE_M)):
                    tile[ki, mi] = src[g, k0 + ki, m0 + mi]
            for mi in range(T.int64(TILE_M)):
                for ki in T.vectorized(T.int64(TILE_K)):
                    out[g, m0 + mi, k0 + ki] = T.bitwise_xor(tile[ki, mi], flip[0])
        else:  # an edge tile: the padding
            for mi in range(T.min(tm, Mp - m0)):
                for ki in range(T.min(tk, Kp - k0)):
                    km_edge(src, flip, out, g, m0 + mi, k0 + ki, M, K)

    @T.prim_func(s_tir=True)
    def main(src_h: T.handle, flip: T.Buffer((1,), "uint8"), out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        G, M, K, Mp, Kp = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        src = T.match_buffer(src_h, (G, K, M), "uint8")
        out = T.match_buffer(out_h, (G, Mp, Kp), "uint8")
        MT, KT = (Mp + tm - 1) // tm, (Kp + tk - 1) // tk
        for t in loop((G * MT * KT + CHUNK - 1) // CHUNK):
            tile = T.alloc_buffer((TILE_K, TILE_M), "uint8", scope="local")
            for u in range(CHUNK):
                if t * CHUNK + u < G * MT * KT:
                    km_tile(
                        src,
                        flip,
                        out,
                        tile,
                        (t * CHUNK + u) // (MT * KT),
                        (t * CHUNK + u) // KT % MT * tm,
                        (t * CHUNK + u) % KT * tk,
                        M,
                        K,
                        Mp,
                        Kp,
                    )

    return main


def _b_definition(layout: str, parallel: bool = True):
    """``main(src, flip, out)``: ``out (G, NB, KB, 16, 4)`` from ``src`` (G, N, K) (``"nk"``) or
    (G, K, N) (``"kn"``); row ``N`` (when there is room) is ones, so the GEMM also yields A's row
    sums. ``"nk"`` is a TE compute (its vector loop has a static extent of 16, so no bounds
    predicate). ``"kn"`` is written out: each inner 16x4 block loads four 16-byte rows into a local
    buffer and stores them interleaved, and edge blocks run scalar. The TE form of ``"kn"`` was
    about twice as slow (``bench/packing.py``)."""
    if layout == "kn":
        return _b_kn_definition(parallel)
    G, N, K, NB, KB = _vars("G", "N", "K", "NB", "KB")
    src = te.placeholder((G, N, K), "uint8", name="src")
    flip = te.placeholder((1,), "uint8", name="flip")

    def value(g, nb, kb, ni, ki):  # row N (when there is room) is ones: A's row sums
        n, k = nb * 16 + ni, kb * 4 + ki
        v = src[g, n, k]
        zero, one = tirx.const(0, "uint8"), tirx.const(1, "uint8")
        pad = tirx.if_then_else(tirx.all(n == N, k < K), one, zero)
        return tirx.if_then_else(tirx.all(n < N, k < K), tirx.bitwise_xor(v, flip[0]), pad)

    out = te.compute((G, NB, KB, 16, 4), value, name="out")
    return te.create_prim_func([src, flip, out]).with_attr("global_symbol", "main")


def _b_kn_definition(parallel: bool = True) -> tvm.tirx.PrimFunc:
    loop = T.parallel if parallel else T.serial

    @T.macro  # per-iteration values as macro arguments: see _a_definition
    def kn_edge(src, flip, out, g, nb, kb, ni, ki, n, k, N, K):
        out[g, nb, kb, ni, ki] = T.Select(
            n < N and k < K,
            T.bitwise_xor(src[g, T.min(k, K - 1), T.min(n, N - 1)], flip[0]),
            T.Select(n == N and k < K, T.uint8(1), T.uint8(0)),
        )

    @T.macro
    def kn_row(src, flip, out, rows, g, kb, N, K, NB):
        for nb in range(NB):
            if nb * 16 + 16 <= N and kb * 4 + 4 <= K:  # an inner block
                for ki in range(T.int64(4)):
                    for ni in T.vectorized(T.int64(16)):
                        rows[ki, ni] = src[g, kb * 4 + ki, nb * 16 + ni]
                for ni in range(T.int64(16)):
                    for ki in T.vectorized(T.int64(4)):
                        out[g, nb, kb, ni, ki] = T.bitwise_xor(rows[ki, ni], flip[0])
            else:  # an edge block: the padding, and the ones row
                for ni in range(T.int64(16)):
                    for ki in range(T.int64(4)):
                        kn_edge(src, flip, out, g, nb, kb, ni, ki, nb * 16 + ni, kb * 4 + ki, N, K)

    @T.prim_func(s_tir=True)
    def main(src_h: T.handle, flip: T.Buffer((1,), "uint8"), out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        G, N, K, NB, KB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        src = T.match_buffer(src_h, (G, K, N), "uint8")
        out = T.match_buffer(out_h, (G, NB, KB, 16, 4), "uint8")
        for t in loop((G * KB + CHUNK - 1) // CHUNK):
            rows = T.alloc_buffer((4, 16), "uint8", scope="local")
            for u in range(CHUNK):
                if t * CHUNK + u < G * KB:
                    kn_row(src, flip, out, rows, (t * CHUNK + u) // KB, (t * CHUNK + u) % KB, N, K, NB)

    return main


def _compile(sch):
    return tvm.compile(sch.mod, target=detect().target())["main"]


@functools.lru_cache(maxsize=None)
def a_kernel(layout: str, parallel: bool = True):
    return _compile(a_schedule(layout, parallel))


@functools.lru_cache(maxsize=None)
def b_kernel(layout: str, parallel: bool = True):
    return _compile(b_schedule(layout, parallel))


def a_schedule(layout: str, parallel: bool = True) -> s_tir.Schedule:
    """The A pack as a schedule (its loops are already final), for export; ``parallel=False``:
    every loop on the calling thread (see :data:`fraccompile.targets.backend.codes.PARALLEL_MIN_BYTES`)."""
    return s_tir.Schedule(_a_definition(layout, parallel))


def b_schedule(layout: str, parallel: bool = True) -> s_tir.Schedule:
    sch = s_tir.Schedule(_b_definition(layout, parallel))
    if layout == "kn":  # written out: its loops are final
        return sch
    g, nb, kb, ni, ki = sch.get_loops(sch.get_sblock("out"))
    fused = sch.fuse(g, nb)
    if parallel:
        sch.parallel(fused)
    sch.vectorize(ni)
    sch.unroll(ki)
    return sch


def _conv_b_definition(n, h, w, c, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, k0, kc, nb_, kb_):
    x = te.placeholder((n, h, w, c), "uint8", name="x")
    flip = te.placeholder((1,), "uint8", name="flip")
    ck = kh * kw * c

    def value(g, nb, kb, ni, ki):
        row, col = nb * 16 + ni, kb * 4 + ki  # row: (i, j, channel); col: output position
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
    """B of a 2-D conv's weight gradient straight from channels-last activation codes: the im2col
    patches of output positions ``k0 .. k0+kc`` packed in the 16x4 layout (row N of ones), one
    pass instead of an im2col copy and a pack. ``shape_args``: N, H, W, C, kh, kw, stride,
    padding, dilation (per axis), OH, OW, k0, kc and the packed extents; static, so built once per
    conv and chunk (and kept in the kernel cache)."""
    sch = s_tir.Schedule(_conv_b_definition(*shape_args))
    g, nb, kb, ni, ki = sch.get_loops(sch.get_sblock("out"))
    sch.reorder(g, kb, nb, ki, ni)
    sch.parallel(sch.fuse(g, kb))
    sch.vectorize(ni)
    sch.unroll(ki)
    return sch


def _conv_a_definition(n, h, w, c, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, mp, kp):
    """``main(x, flip, out)``: the forward GEMM's A ``(1, mp, kp)`` of a 2-D conv straight from
    channels-last codes ``x (N, H, W, C)``: row ``m`` is output position ``m``'s patch, taps
    ``(i, j)`` in order with their ``C`` channels innermost (the im2col of ``roles._im2col``),
    sign-flipped by ``flip``; a tap outside the image is code 0 (so ``flip`` after the flip), the
    columns past ``K = kh·kw·C`` are zeros and row ``M`` (when ``mp > M``) is ones (B's row sums).
    One pass instead of a padding copy, an im2col copy and a pack; each tap is one vector copy of
    ``C`` bytes."""
    K, M = kh * kw * c, n * oh * ow

    @T.macro
    def tap(x, flip, out, m, i, j, b, y, z):
        if y >= 0 and y < h and z >= 0 and z < w:
            for ch in T.vectorized(c):
                out[m * kp + (i * kw + j) * c + ch] = T.bitwise_xor(
                    x[((b * h + y) * w + z) * c + ch], flip[0]
                )
        else:
            for ch in T.vectorized(c):
                out[m * kp + (i * kw + j) * c + ch] = flip[0]

    @T.macro
    def patch_row(x, flip, out, m, i, b, y, z0):
        if y >= 0 and y < h:
            for t in T.vectorized(kw * c):
                out[m * kp + i * kw * c + t] = T.bitwise_xor(x[((b * h + y) * w + z0) * c + t], flip[0])
        else:
            for t in T.vectorized(kw * c):
                out[m * kp + i * kw * c + t] = flip[0]

    @T.macro  # per-row values as macro arguments: see _a_definition
    def row(x, flip, out, m, b, y0, z0):
        if dw == 1 and z0 >= 0 and z0 + kw - 1 < w:  # each patch row's taps are one run
            for i in range(kh):
                patch_row(x, flip, out, m, i, b, y0 + i * dh, z0)
        else:  # tap by tap: a patch at the left or right edge, or a dilated one
            for i in range(kh):
                for j in range(kw):
                    tap(x, flip, out, m, i, j, b, y0 + i * dh, z0 + j * dw)
        for k in range(K, kp):
            out[m * kp + k] = T.uint8(0)

    @T.prim_func(s_tir=True)
    def main(
        x: T.Buffer((n * h * w * c,), "uint8"),
        flip: T.Buffer((1,), "uint8"),
        out: T.Buffer((mp * kp,), "uint8"),
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for m in T.parallel(mp):
            if m < M:
                row(x, flip, out, m, m // (oh * ow), m % (oh * ow) // ow * sh - ph, m % ow * sw - pw)
            else:
                for k in range(kp):
                    out[m * kp + k] = T.Select(m == M and k < K, T.uint8(1), T.uint8(0))

    return main


def conv_a_schedule(*shape_args) -> s_tir.Schedule:
    """The conv A pack (its loops are final). ``shape_args``: N, H, W, C, kh, kw, stride, padding,
    dilation (per axis), OH, OW and the padded extents ``mp``, ``kp``."""
    return s_tir.Schedule(_conv_a_definition(*shape_args))


def _planes_definition(h: int, w: int, c: int, ph: int, pw: int) -> tvm.tirx.PrimFunc:
    """``main(src, out, flip)``: the interior of ``out (N, C, H + 2·ph, W + 2·pw)`` u8 from the
    channels-last codes ``src (N, H, W, C)``, XORed with ``flip``: the padded planes an
    implicit-GEMM weight gradient reads (:func:`fraccompile.targets.kernels.conv.gc_definition`).
    The border is the caller's (written once per geometry). Each (sample, row) writes its ``C``
    plane rows, ``W`` codes each, in vectors; torch's transposing byte copy and XOR take several
    times longer."""
    hp, wp = h + 2 * ph, w + 2 * pw

    @T.prim_func(s_tir=True)
    def main(src_h: T.handle, out_h: T.handle, flip: T.uint8):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        N = T.int64()
        src = T.match_buffer(src_h, (N, h, w, c), "uint8")
        out = T.match_buffer(out_h, (N, c, hp, wp), "uint8")
        for ny in T.parallel(N * h):
            for ch in range(c):
                for x in T.vectorized(w):
                    out[ny // h, ch, ny % h + ph, x + pw] = src[ny // h, ny % h, x, ch] ^ flip

    return main


def planes_schedule(h: int, w: int, c: int, ph: int, pw: int) -> s_tir.Schedule:
    """The padded-planes kernel of one geometry (kind ``pad_planes``)."""
    return s_tir.Schedule(_planes_definition(h, w, c, ph, pw))
