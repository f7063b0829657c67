"""The quantize step as one TVM kernel: ``codes = clamp(round(x / scale), qmin, qmax)`` (or
``floor(x / scale + u)`` for stochastic rounding with the caller's uniform draws ``u``), read once
in fp32 and written once as int8/uint8 — the torch form takes five passes over fp32 temporaries.

The arithmetic is the reference quantizer's, operation for operation (an IEEE fp32 division, then
round-half-to-even ``nearbyint`` or ``floor``), so the codes are bit-identical. The length is a
symbolic variable: one kernel per output dtype and rounding mode serves every tensor.

The loops are written out (TVMScript) rather than scheduled from a TE compute: blocks of
:data:`BLOCK` elements run in parallel as whole 64-lane vectors and the tail runs scalar. A split
of the symbolic length by 64 leaves a bounds predicate in the vector loop, which TVM lowers to
scalar code: that kernel ran 4-8x slower (4M elements, round to nearest: 2.49 against 0.32 ms
on 2 cores, ``bench/packing.py``).
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T

from .host import detect

BLOCK = 4096  # elements per parallel task: 64 vectors of 64 lanes


def definition(out_dtype: str, stochastic: bool) -> tvm.tirx.PrimFunc:
    """``main(x, scale, bounds[, u], q)``: ``bounds`` = (qmin, qmax) as fp32."""
    L, B = T.int64(64), T.int64(BLOCK)

    if stochastic:
        @T.prim_func(s_tir=True)
        def main(x_h: T.handle, scale: T.Buffer((1,), "float32"),
                 bounds: T.Buffer((2,), "float32"), u_h: T.handle, q_h: T.handle):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n,), "float32")
            u = T.match_buffer(u_h, (n,), "float32")
            q = T.match_buffer(q_h, (n,), out_dtype)
            for b in T.parallel(n // B):
                for j in range(B // L):
                    for v in T.vectorized(L):
                        q[b * B + j * L + v] = T.Cast(out_dtype, T.max(T.min(
                            T.floor(x[b * B + j * L + v] / scale[0] + u[b * B + j * L + v]),
                            bounds[1]), bounds[0]))
            for i in range(n // B * B, n):
                q[i] = T.Cast(out_dtype, T.max(T.min(T.floor(x[i] / scale[0] + u[i]), bounds[1]),
                                               bounds[0]))
        return main

    @T.prim_func(s_tir=True)
    def main(x_h: T.handle, scale: T.Buffer((1,), "float32"), bounds: T.Buffer((2,), "float32"),
             q_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n,), "float32")
        q = T.match_buffer(q_h, (n,), out_dtype)
        for b in T.parallel(n // B):
            for j in range(B // L):
                for v in T.vectorized(L):
                    q[b * B + j * L + v] = T.Cast(out_dtype, T.max(T.min(
                        T.nearbyint(x[b * B + j * L + v] / scale[0]), bounds[1]), bounds[0]))
        for i in range(n // B * B, n):
            q[i] = T.Cast(out_dtype, T.max(T.min(T.nearbyint(x[i] / scale[0]), bounds[1]),
                                           bounds[0]))
    return main


def schedule(out_dtype: str, stochastic: bool) -> s_tir.Schedule:
    """The kernel as a schedule (its loops are already final), for export."""
    return s_tir.Schedule(definition(out_dtype, stochastic))


@functools.lru_cache(maxsize=None)
def kernel(out_dtype: str, stochastic: bool):
    """The compiled quantizer ``main(x, scale, bounds[, u], q)``, built once per process."""
    return tvm.compile(schedule(out_dtype, stochastic).mod, target=detect().target())["main"]
