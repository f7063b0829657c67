"""Exact sums of byte codes in one pass: column sums into int32, ``out[k] = Σ_r q[r, k]``, and
row sums into fp32, ``out[r] = Σ_k q[r, k]``, for ``q`` ``(R, K)`` int8 or uint8 (the zero-point
terms of docs/contract.md, "Integer lowering": a weight gradient's batch sums of its input codes,
the gradient's sums over positions, the sign-flip corrections; the channel sums of channels-last
codes that a conv's window sums start from).

torch has no fast form of this: its integer reductions are many times slower than a pass over the
bytes, and its fp32 path (convert, then a matrix-vector product against ones) writes and reads an
fp32 copy four times the codes' size. Here the columns run in blocks of ``LANES`` (int32 vector
registers) over the cores; each block streams down the rows. Columns past the last whole block
are summed one at a time.

int32 holds the exact sum of up to ``MAX_ROWS`` codes; callers split longer sums
(:func:`fraccompile.targets.backend.affine._exact_sums`).

Row sums are short (a conv's channels: 3 to a few hundred; a linear's features: up to a few
thousand), so the row length ``K`` is a constant of the kernel: an unrolled sum of consecutive
bytes is what LLVM turns into vector code (with ``K`` a runtime value the loop stays scalar,
several times slower). A row runs in unrolled chunks of ``ROW_CHUNK`` codes and an unrolled rest.
Rows up to ``MAX_ROW_LENGTH`` codes (longer ones take torch's route); the sum is written as fp32,
exact for any row that long (``16384 * 255 < 2**24``).
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T

from ..runtime.host import detect

DTYPES = ("int8", "uint8")
LANES = 64  # int32 accumulators per block: 4 AVX-512 registers
MAX_ROWS = (2**31 - 1) // 255  # |code| <= 255 (uint8) or 128 (int8): the int32 sum stays exact
MAX_ROW_LENGTH = 16384  # a row's sum stays below 2**24: exact in fp32
ROW_CHUNK = 1024  # the unrolled body: a row in whole chunks of this many codes, then the rest
ROW_BLOCK = 64  # rows per parallel task


def definition(dtype: str, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(q, out)``: ``q`` ``dtype`` ``(R, K)``, ``out`` int32 ``(K,)``, ``R <= MAX_ROWS``."""
    if dtype not in DTYPES:
        raise ValueError(f"code sums take one of {DTYPES}, not {dtype!r}")
    L = T.int64(LANES)
    loop = T.parallel if parallel else T.serial

    @T.prim_func(s_tir=True)
    def main(q_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        R, K = T.int64(), T.int64()
        q = T.match_buffer(q_h, (R, K), dtype)
        out = T.match_buffer(out_h, (K,), "int32")
        for b in loop(K // L):
            acc = T.alloc_buffer((LANES,), "int32", scope="local")
            for v in T.vectorized(L):
                acc[v] = T.int32(0)
            for r in range(R):
                for v in T.vectorized(L):
                    acc[v] = acc[v] + T.Cast("int32", q[r, b * L + v])
            for v in T.vectorized(L):
                out[b * L + v] = acc[v]
        for k in range(K // L * L, K):
            out[k] = T.int32(0)
            for r in range(R):
                out[k] = out[k] + T.Cast("int32", q[r, k])

    return main


def row_definition(dtype: str, K: int, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(q, out)``: ``q`` ``dtype`` ``(R, K)`` (``K`` fixed), ``out`` fp32 ``(R,)``."""
    if dtype not in DTYPES:
        raise ValueError(f"code sums take one of {DTYPES}, not {dtype!r}")
    if not 1 <= K <= MAX_ROW_LENGTH:
        raise ValueError(f"row sums take rows of 1 to {MAX_ROW_LENGTH} codes, not {K}")
    chunk = min(K, ROW_CHUNK)
    KK, RB, C, tail = T.int64(K), T.int64(ROW_BLOCK), T.int64(chunk), T.int64(K % chunk)
    loop = T.parallel if parallel else T.serial

    @T.prim_func(s_tir=True)
    def main(q_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        R = T.int64()
        q = T.match_buffer(q_h, (R, KK), dtype)
        out = T.match_buffer(out_h, (R,), "float32")
        for b in loop((R + RB - 1) // RB):
            for i in range(T.min(RB, R - b * RB)):
                acc = T.alloc_buffer((1,), "int32", scope="local")
                acc[0] = T.int32(0)
                for c in range(KK // C):  # whole chunks, each unrolled
                    for k in T.unroll(C):
                        acc[0] = acc[0] + T.Cast("int32", q[b * RB + i, c * C + k])
                for k in T.unroll(tail):
                    acc[0] = acc[0] + T.Cast("int32", q[b * RB + i, KK - tail + k])
                out[b * RB + i] = T.Cast("float32", acc[0])

    return main


def row_schedule(dtype: str, K: int, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(row_definition(dtype, K, parallel))


def schedule(dtype: str, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(definition(dtype, parallel))


@functools.lru_cache(maxsize=None)
def kernel(dtype: str, parallel: bool = True):
    return tvm.compile(schedule(dtype, parallel).mod, target=detect().target())["main"]
