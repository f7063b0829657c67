"""The quantize step as one TVM kernel: ``codes = clamp(round(x / scale), qmin, qmax)`` (or
``floor(x / scale + u)`` for stochastic rounding with the caller's uniform draws ``u``), read once
in fp32 and written once as int8/uint8 — the torch form takes five passes over fp32 temporaries.

The arithmetic is the reference quantizer's, operation for operation (an IEEE fp32 division, then
round-half-to-even ``nearbyint`` or ``floor``), so the codes are bit-identical. The length is a
symbolic variable: one kernel per output dtype and rounding mode serves every tensor.
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm import te, tirx

from .host import detect


def definition(out_dtype: str, stochastic: bool):
    n = te.var("n", "int64")
    x = te.placeholder((n,), "float32", name="x")
    scale = te.placeholder((1,), "float32", name="scale")
    bounds = te.placeholder((2,), "float32", name="bounds")  # qmin, qmax
    args = [x, scale, bounds]
    if stochastic:
        u = te.placeholder((n,), "float32", name="u")
        args.append(u)

        def code(i):
            return tirx.floor(x[i] / scale[0] + u[i])
    else:
        def code(i):
            return tirx.nearbyint(x[i] / scale[0])
    q = te.compute((n,), lambda i: te.max(te.min(code(i), bounds[1]), bounds[0]).astype(out_dtype),
                   name="q")
    return te.create_prim_func(args + [q]).with_attr("global_symbol", "main")


def schedule(out_dtype: str, stochastic: bool) -> s_tir.Schedule:
    sch = s_tir.Schedule(definition(out_dtype, stochastic))
    (i,) = sch.get_loops(sch.get_sblock("q"))
    outer, inner = sch.split(i, [None, 64])
    sch.parallel(outer)
    sch.vectorize(inner)
    return sch


@functools.lru_cache(maxsize=None)
def kernel(out_dtype: str, stochastic: bool):
    """The compiled quantizer ``main(x, scale, bounds[, u], q)`` (built once per process: ~0.1 s)."""
    return tvm.compile(schedule(out_dtype, stochastic).mod, target=detect().target())["main"]
