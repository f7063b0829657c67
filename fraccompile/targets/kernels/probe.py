"""The gate gradient of a DFQ-routed site in one pass (:class:`fraccompile.ops.functions.GateProbe`):
per sample ``n`` and candidate precision ``k``,

    out[n, k] = Σ_s g[n, s] · (q_k(x[n, s]) - q_n(x[n, s]))

where ``q_k`` rounds to nearest on candidate ``k``'s grid and ``q_n`` on the grid of the precision
sample ``n`` was routed to (its site input), both ``clamp(round((x - zero) / scale), qmin, qmax)
· scale + zero``: the reference's arithmetic. The torch form quantizes the whole input once per
candidate, each in several passes over fp32 temporaries; this reads ``x`` and ``g`` once.

``x``/``g`` are ``(N, S)`` in memory order (the same layout), ``grids`` ``(K, 4)`` and ``rows``
``(N, 4)`` hold ``(scale, zero, qmin, qmax)``. Samples run in parallel; within one, ``LANES``
partial sums per candidate accumulate in vector registers and are added at the end (fp32: the
order differs from torch's sum, within its rounding).
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T

from ..runtime.host import detect

LANES = 16  # one AVX-512 vector of fp32


def _value(v, scale, zero, qmin, qmax):
    return T.max(T.min(T.nearbyint((v - zero) / scale), qmax), qmin) * scale + zero


def definition(K: int) -> tvm.tirx.PrimFunc:
    """``main(x, g, grids, rows, out)`` for ``K`` candidates (``out`` fp32 ``(N, K)``)."""
    if K < 1:
        raise ValueError(f"a gate probe needs at least one candidate, not {K}")
    L = T.int64(LANES)

    def term(x, g, grids, rows, n, k, s):
        v = x[n, s]
        return g[n, s] * (
            _value(v, grids[k, 0], grids[k, 1], grids[k, 2], grids[k, 3])
            - _value(v, rows[n, 0], rows[n, 1], rows[n, 2], rows[n, 3])
        )

    @T.prim_func(s_tir=True)
    def main(
        x_h: T.handle, g_h: T.handle, grids: T.Buffer((K, 4), "float32"), rows_h: T.handle, out_h: T.handle
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        N, S = T.int64(), T.int64()
        x = T.match_buffer(x_h, (N, S), "float32")
        g = T.match_buffer(g_h, (N, S), "float32")
        rows = T.match_buffer(rows_h, (N, 4), "float32")
        out = T.match_buffer(out_h, (N, K), "float32")
        for n in T.parallel(N):
            acc = T.alloc_buffer((K, LANES), "float32", scope="local")
            for k in range(K):
                for v in T.vectorized(L):
                    acc[k, v] = T.float32(0)
            for j in range(S // L):
                for k in range(K):
                    for v in T.vectorized(L):
                        acc[k, v] = acc[k, v] + term(x, g, grids, rows, n, k, j * L + v)
            for s in range(S // L * L, S):
                for k in range(K):
                    acc[k, 0] = acc[k, 0] + term(x, g, grids, rows, n, k, s)
            for k in range(K):
                out[n, k] = T.float32(0)
                for v in range(L):
                    out[n, k] = out[n, k] + acc[k, v]

    return main


def schedule(K: int) -> s_tir.Schedule:
    return s_tir.Schedule(definition(K))


@functools.lru_cache(maxsize=None)
def kernel(K: int):
    return tvm.compile(schedule(K).mod, target=detect().target())["main"]
