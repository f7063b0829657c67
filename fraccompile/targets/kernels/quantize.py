"""The quantize step as one TVM kernel: ``codes = clamp(round((x - zero) / scale), qmin, qmax)``
(or ``floor((x - zero) / scale + u)`` for stochastic rounding with the caller's uniform draws
``u``), stored minus an ``offset`` (0, or the middle of an ``sbm`` grid, which centers its codes
into int8), read once in fp32 and written once as int8/uint8 — the torch form takes five passes
over fp32 temporaries.

The arithmetic is the reference quantizer's, operation for operation (an IEEE fp32 division, then
round-half-to-even ``nearbyint`` or ``floor``), so the codes are bit-identical. The length is a
symbolic variable: one kernel per output dtype and rounding mode serves every tensor.

The loops are written out (TVMScript) rather than scheduled from a TE compute: blocks of
:data:`BLOCK` elements run in parallel as whole 64-lane vectors and the tail runs scalar. A split
of the symbolic length by 64 leaves a bounds predicate in the vector loop, which TVM lowers to
scalar code: that kernel ran several times slower (``bench/packing.py``).

With ``noise="counter"`` the stochastic kernel draws nothing: it computes the reference's
:func:`~fraccompile.ops.quantizers.counter_noise` of each element in registers, from the element's
logical index and a seed. It takes ``x`` as an ``(N, S, C)`` view in memory order whose logical
index is ``n·C·S + c·S + s`` — a row-major tensor is ``(rows, 1, last dim)``, a channels-last one
``(N, spatial, C)`` — so the noise does not depend on the layout.
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T

from ...ops.quantizers import NOISE_BITS, NOISE_MUL1, NOISE_MUL2, NOISE_STEP
from ..runtime.host import detect

BLOCK = 4096  # elements per parallel task: 64 vectors of 64 lanes


def _let(value, body):
    """``body(v)`` with ``v`` bound to the uint32 ``value`` once (a Let: each hash round reads its
    input twice, so plain expressions would grow 2**rounds times)."""
    var = tvm.tirx.Var("h", "uint32")
    return tvm.tirx.Let(var, value, body(var))


def _counter_noise(index):
    """:func:`~fraccompile.ops.quantizers.counter_noise` of the uint32 ``index * NOISE_STEP ^
    seed``."""

    def xorshift(k, then):
        return lambda h: _let(h ^ (h >> T.uint32(k)), then)

    def finish(h):
        return T.Cast("float32", h >> T.uint32(32 - NOISE_BITS)) * T.float32(2.0**-NOISE_BITS)

    rounds = xorshift(
        16,
        lambda h: _let(
            h * T.uint32(NOISE_MUL1),
            xorshift(15, lambda h: _let(h * T.uint32(NOISE_MUL2), xorshift(16, finish))),
        ),
    )
    return _let(index, rounds)


def counter_definition(out_dtype: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(x, scale, bounds, seed, q)``: stochastic rounding with counter noise; ``x``/``q`` are
    ``(N, S, C)`` in memory order, ``seed`` one int32."""
    L = T.int64(16)  # one AVX-512 vector of fp32 (a channels-last conv gradient has 16 channels)
    loop = T.parallel if parallel else T.serial

    def code(x, scale, bounds, seed, n, s, c, N, S, C):
        index = T.Cast("uint32", n * C * S + c * S + s) * T.uint32(NOISE_STEP) ^ T.Cast(
            "uint32", seed[0]
        )  # the index is below 2**31 (_to_codes checks)
        return T.Cast(
            out_dtype,
            T.max(
                T.min(T.floor((x[n, s, c] - bounds[2]) / scale[0] + _counter_noise(index)), bounds[1]),
                bounds[0],
            )
            - bounds[3],
        )

    @T.prim_func(s_tir=True)
    def main(
        x_h: T.handle,
        scale: T.Buffer((1,), "float32"),
        bounds: T.Buffer((4,), "float32"),
        seed: T.Buffer((1,), "int32"),
        q_h: T.handle,
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        N, S, C = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (N, S, C), "float32")
        q = T.match_buffer(q_h, (N, S, C), out_dtype)
        for n in loop(N):
            for s in range(S):
                for j in range(C // L):
                    for v in T.vectorized(L):
                        q[n, s, j * L + v] = code(x, scale, bounds, seed, n, s, j * L + v, N, S, C)
                for c in range(C // L * L, C):
                    q[n, s, c] = code(x, scale, bounds, seed, n, s, c, N, S, C)

    return main


def definition(out_dtype: str, stochastic: bool, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(x, scale, bounds[, u], q)``: ``bounds`` = (qmin, qmax, zero, offset) as fp32: the
    code of ``x`` on the grid ``clamp(round((x - zero) / scale), qmin, qmax)``, the reference's
    arithmetic, stored minus ``offset`` (0, or the grid's middle: ``sbm`` codes centered into
    int8)."""
    L, B = T.int64(64), T.int64(BLOCK)
    loop = T.parallel if parallel else T.serial

    if stochastic:

        @T.prim_func(s_tir=True)
        def main(
            x_h: T.handle,
            scale: T.Buffer((1,), "float32"),
            bounds: T.Buffer((4,), "float32"),
            u_h: T.handle,
            q_h: T.handle,
        ):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n,), "float32")
            u = T.match_buffer(u_h, (n,), "float32")
            q = T.match_buffer(q_h, (n,), out_dtype)
            for b in loop(n // B):
                for j in range(B // L):
                    for v in T.vectorized(L):
                        q[b * B + j * L + v] = T.Cast(
                            out_dtype,
                            T.max(
                                T.min(
                                    T.floor(
                                        (x[b * B + j * L + v] - bounds[2]) / scale[0] + u[b * B + j * L + v]
                                    ),
                                    bounds[1],
                                ),
                                bounds[0],
                            )
                            - bounds[3],
                        )
            for i in range(n // B * B, n):
                q[i] = T.Cast(
                    out_dtype,
                    T.max(T.min(T.floor((x[i] - bounds[2]) / scale[0] + u[i]), bounds[1]), bounds[0])
                    - bounds[3],
                )

        return main

    @T.prim_func(s_tir=True)
    def main(
        x_h: T.handle, scale: T.Buffer((1,), "float32"), bounds: T.Buffer((4,), "float32"), q_h: T.handle
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n,), "float32")
        q = T.match_buffer(q_h, (n,), out_dtype)
        for b in loop(n // B):
            for j in range(B // L):
                for v in T.vectorized(L):
                    q[b * B + j * L + v] = T.Cast(
                        out_dtype,
                        T.max(
                            T.min(T.nearbyint((x[b * B + j * L + v] - bounds[2]) / scale[0]), bounds[1]),
                            bounds[0],
                        )
                        - bounds[3],
                    )
        for i in range(n // B * B, n):
            q[i] = T.Cast(
                out_dtype,
                T.max(T.min(T.nearbyint((x[i] - bounds[2]) / scale[0]), bounds[1]), bounds[0]) - bounds[3],
            )

    return main


def rows_definition(out_dtype: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(x, rows, q)``: round to nearest with one grid per sample, ``x``/``q`` ``(N, S)`` in
    memory order, ``rows`` ``(N, 4)`` = (scale, zero, qmin, qmax) of each sample: the codes of a
    DFQ-routed site's input in one pass (the reference quantizes group by group, gathering and
    scattering the samples of each precision; the arithmetic per element is the same)."""
    return _grid_definition(out_dtype, parallel, per_column=False)


def cols_definition(out_dtype: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(x, cols, q)``: round to nearest with one grid per column, ``x``/``q`` ``(R, C)`` in
    memory order, ``cols`` ``(4, C)`` = the (scale, zero, qmin, qmax) rows of the columns: a linear
    weight's codes with one grid per input channel (``weight_scale="gemm"``'s error backprop) in
    one pass, the arithmetic per element :func:`rows_definition`'s."""
    return _grid_definition(out_dtype, parallel, per_column=True)


def _grid_definition(out_dtype: str, parallel: bool, per_column: bool) -> tvm.tirx.PrimFunc:
    """:func:`rows_definition` (a grid per row of ``x``, ``g`` ``(N, 4)``) or, ``per_column``,
    :func:`cols_definition` (a grid per column, ``g`` ``(4, S)``, read as vectors along the row)."""
    L = T.int64(64)
    loop = T.parallel if parallel else T.serial

    def grid(g, k, n, s):  # parameter k (scale, zero, qmin, qmax) of element (n, s)'s grid
        return g[k, s] if per_column else g[n, k]

    def grid_shape(N, S):
        return (4, S) if per_column else (N, 4)

    def code(x, g, n, s):
        value = T.nearbyint((x[n, s] - grid(g, 1, n, s)) / grid(g, 0, n, s))
        return T.Cast(out_dtype, T.max(T.min(value, grid(g, 3, n, s)), grid(g, 2, n, s)))

    @T.prim_func(s_tir=True)
    def main(x_h: T.handle, g_h: T.handle, q_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        N, S = T.int64(), T.int64()
        x = T.match_buffer(x_h, (N, S), "float32")
        g = T.match_buffer(g_h, grid_shape(N, S), "float32")
        q = T.match_buffer(q_h, (N, S), out_dtype)
        for n in loop(N):
            for j in range(S // L):
                for v in T.vectorized(L):
                    q[n, j * L + v] = code(x, g, n, j * L + v)
            for s in range(S // L * L, S):
                q[n, s] = code(x, g, n, s)

    return main


def rows_counter_definition(out_dtype: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(x, rows, rank, seed, q)``: stochastic rounding with counter noise and one grid per
    sample (:func:`rows_definition`'s ``rows``), ``x``/``q`` ``(N, S, C)`` in memory order as
    :func:`counter_definition` takes them. The reference quantizes each precision's samples as
    one gathered tensor with its own seed: sample ``n`` is row ``rank[n]`` of its group's tensor
    and draws from ``seed[n]``, so its noise is that tensor's, element for element."""
    L = T.int64(16)
    loop = T.parallel if parallel else T.serial

    def code(x, rows, rank, seed, n, s, c, S, C):
        index = T.Cast("uint32", T.Cast("int64", rank[n]) * C * S + c * S + s) * T.uint32(
            NOISE_STEP
        ) ^ T.Cast("uint32", seed[n])
        return T.Cast(
            out_dtype,
            T.max(
                T.min(T.floor((x[n, s, c] - rows[n, 1]) / rows[n, 0] + _counter_noise(index)), rows[n, 3]),
                rows[n, 2],
            ),
        )

    @T.prim_func(s_tir=True)
    def main(x_h: T.handle, rows_h: T.handle, rank_h: T.handle, seed_h: T.handle, q_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        N, S, C = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (N, S, C), "float32")
        rows = T.match_buffer(rows_h, (N, 4), "float32")
        rank = T.match_buffer(rank_h, (N,), "int32")
        seed = T.match_buffer(seed_h, (N,), "int32")
        q = T.match_buffer(q_h, (N, S, C), out_dtype)
        for n in loop(N):
            for s in range(S):
                for j in range(C // L):
                    for v in T.vectorized(L):
                        q[n, s, j * L + v] = code(x, rows, rank, seed, n, s, j * L + v, S, C)
                for c in range(C // L * L, C):
                    q[n, s, c] = code(x, rows, rank, seed, n, s, c, S, C)

    return main


def rows_counter_schedule(out_dtype: str, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(rows_counter_definition(out_dtype, parallel))


def rows_schedule(out_dtype: str, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(rows_definition(out_dtype, parallel))


def cols_schedule(out_dtype: str, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(cols_definition(out_dtype, parallel))


def schedule(out_dtype: str, stochastic: bool, noise: str = "torch", parallel: bool = True) -> s_tir.Schedule:
    """The kernel as a schedule (its loops are already final), for export; ``noise="counter"``
    (stochastic only): :func:`counter_definition`; ``parallel=False``: on the calling thread."""
    if stochastic and noise == "counter":
        return s_tir.Schedule(counter_definition(out_dtype, parallel))
    return s_tir.Schedule(definition(out_dtype, stochastic, parallel))


@functools.lru_cache(maxsize=None)
def kernel(out_dtype: str, stochastic: bool, noise: str = "torch", parallel: bool = True):
    """The compiled quantizer ``main(x, scale, bounds[, u | seed], q)``, built once per process."""
    return tvm.compile(schedule(out_dtype, stochastic, noise, parallel).mod, target=detect().target())["main"]


def dequant_definition(variant: str = "", parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(c, rc, cc, scale, bias, out)``: the GEMM's epilogue in one pass,
    ``out[g, m, n] = float(c[g, m, n] + rc[g, m] + cc[g, n]) * scale[n] + bias[n]``.

    ``c`` is the kernel's padded int32 output ``(G, Mp, Np)``; ``rc``/``cc`` the int32 sign
    corrections of each row and column (int32 sums wrap, so their order does not matter: the true
    sum fits), ``scale`` and ``bias`` per output column, ``out`` fp32 ``(G, M, N)``. It replaces
    four torch passes over the output (correction, int-to-float copy, scale, bias).

    ``variant`` ``"rank1"``: ``main(c, rc, cc, scale, bias, p, t, out)`` adds a rank-one term
    ``p[g, m]·t[n]`` (fp32) before the bias: an ``sbm`` weight's zero point times the row sums of
    the other operand's codes, which otherwise takes two more passes over the output.
    ``"affine"``: the same arguments per group, ``scale[g]``, ``t[g]`` and ``bias[g, n]``: a
    product of two affine operands with its scales and zero points per batch entry, the terms
    ``p·t`` per row and ``bias`` per column of each group
    (:meth:`..backend.gemm_runtime.IntegerGemms.affine_gemm`)."""
    if variant not in ("", "rank1", "affine"):
        raise ValueError(f"dequantize variant {variant!r}: choose '', 'rank1' or 'affine'")
    L = T.int64(16)
    loop = T.parallel if parallel else T.serial
    per_group = variant == "affine"

    def col(v, g, n):  # a per-column value (scale, t), or per group ("affine")
        return v[g] if per_group else v[n]

    def value(c, rc, cc, scale, bias, g, m, n, p=None, t=None):
        y = T.Cast("float32", c[g, m, n] + rc[g, m] + cc[g, n]) * col(scale, g, n)
        if p is not None:
            y = y + p[g, m] * col(t, g, n)
        return y + (bias[g, n] if per_group else bias[n])

    if variant:

        @T.prim_func(s_tir=True)
        def main(
            c_h: T.handle,
            rc_h: T.handle,
            cc_h: T.handle,
            s_h: T.handle,
            b_h: T.handle,
            p_h: T.handle,
            t_h: T.handle,
            out_h: T.handle,
        ):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            G, Mp, Np, M, N = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            c = T.match_buffer(c_h, (G, Mp, Np), "int32")
            rc = T.match_buffer(rc_h, (G, M), "int32")
            cc = T.match_buffer(cc_h, (G, N), "int32")
            scale = T.match_buffer(s_h, (G,) if per_group else (N,), "float32")
            bias = T.match_buffer(b_h, (G, N) if per_group else (N,), "float32")
            p = T.match_buffer(p_h, (G, M), "float32")
            t = T.match_buffer(t_h, (G,) if per_group else (N,), "float32")
            out = T.match_buffer(out_h, (G, M, N), "float32")
            for r in loop(G * M):
                for j in range(N // L):
                    for v in T.vectorized(L):
                        out[r // M, r % M, j * L + v] = value(
                            c, rc, cc, scale, bias, r // M, r % M, j * L + v, p, t
                        )
                for n in range(N // L * L, N):
                    out[r // M, r % M, n] = value(c, rc, cc, scale, bias, r // M, r % M, n, p, t)

        return main

    @T.prim_func(s_tir=True)
    def main(c_h: T.handle, rc_h: T.handle, cc_h: T.handle, s_h: T.handle, b_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        G, Mp, Np, M, N = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        c = T.match_buffer(c_h, (G, Mp, Np), "int32")
        rc = T.match_buffer(rc_h, (G, M), "int32")
        cc = T.match_buffer(cc_h, (G, N), "int32")
        scale = T.match_buffer(s_h, (N,), "float32")
        bias = T.match_buffer(b_h, (N,), "float32")
        out = T.match_buffer(out_h, (G, M, N), "float32")
        for r in loop(G * M):
            for j in range(N // L):
                for v in T.vectorized(L):
                    out[r // M, r % M, j * L + v] = value(c, rc, cc, scale, bias, r // M, r % M, j * L + v)
            for n in range(N // L * L, N):
                out[r // M, r % M, n] = value(c, rc, cc, scale, bias, r // M, r % M, n)

    return main


def codes_definition(in_dtype: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(q, grid, out)``: ``out = (float(q) + grid[2]) * grid[0] + grid[1]`` over a flat
    length, the codes of one tensor back in fp32 (``grid`` = scale, zero point, code offset; with
    the zero point and offset 0, ``float(q) * scale``: the reference's fake-quantized values, bit
    for bit, one exact int-to-float conversion and one multiply). One pass; torch takes two (a
    conversion, then the multiply), three with a zero point, or a slow mixed-dtype loop
    (``torch.mul(int8, fp32)``)."""
    L, B = T.int64(64), T.int64(BLOCK)
    loop = T.parallel if parallel else T.serial

    @T.prim_func(s_tir=True)
    def main(q_h: T.handle, grid: T.Buffer((3,), "float32"), out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        n = T.int64()
        q = T.match_buffer(q_h, (n,), in_dtype)
        out = T.match_buffer(out_h, (n,), "float32")
        for b in loop(n // B):
            for j in range(B // L):
                for v in T.vectorized(L):
                    out[b * B + j * L + v] = (T.Cast("float32", q[b * B + j * L + v]) + grid[2]) * grid[
                        0
                    ] + grid[1]
        for i in range(n // B * B, n):
            out[i] = (T.Cast("float32", q[i]) + grid[2]) * grid[0] + grid[1]

    return main


def rows_codes_definition(in_dtype: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(q, rows, out)``: :func:`codes_definition` with one grid per row, ``q``/``out``
    ``(N, S)`` in memory order and ``rows (N, 3)`` = (scale, zero point, code offset) of each row:
    the fp32 values of codes whose scale is per output channel (a weight, for an fp32 error
    backprop) or per sample (a DFQ-routed gradient) in one pass; torch takes a conversion and
    one or two arithmetic passes."""
    L = T.int64(64)
    loop = T.parallel if parallel else T.serial

    def value(q, rows, n, s):
        return (T.Cast("float32", q[n, s]) + rows[n, 2]) * rows[n, 0] + rows[n, 1]

    @T.prim_func(s_tir=True)
    def main(q_h: T.handle, rows_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        N, S = T.int64(), T.int64()
        q = T.match_buffer(q_h, (N, S), in_dtype)
        rows = T.match_buffer(rows_h, (N, 3), "float32")
        out = T.match_buffer(out_h, (N, S), "float32")
        for n in loop(N):
            for j in range(S // L):
                for v in T.vectorized(L):
                    out[n, j * L + v] = value(q, rows, n, j * L + v)
            for s in range(S // L * L, S):
                out[n, s] = value(q, rows, n, s)

    return main


def rows_codes_schedule(in_dtype: str, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(rows_codes_definition(in_dtype, parallel))


def codes_schedule(in_dtype: str, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(codes_definition(in_dtype, parallel))


def dequant_schedule(*variant: str, parallel: bool = True) -> s_tir.Schedule:
    """``variant``: ``()``, ``("rank1",)`` or ``("affine",)`` (:func:`dequant_definition`)."""
    return s_tir.Schedule(dequant_definition(variant[0] if variant else "", parallel))


@functools.lru_cache(maxsize=None)
def dequant_kernel(parallel: bool = True):
    """The compiled :func:`dequant_definition`, built once per process."""
    return tvm.compile(dequant_schedule(parallel=parallel).mod, target=detect().target())["main"]
