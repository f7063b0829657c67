"""The backward of a ReLU that kept a byte mask (:class:`fraccompile.ops.functions.MaskedReLU`) in
one pass: ``out[i] = dy[i] if mask[i] != 0 else 0``, for ``dy`` fp32 and ``mask`` uint8 (0/1) of
``N`` elements each, read in memory order (the callers pass the two in one layout).

The values are ``threshold_backward(dy, mask, 0)``'s bit for bit (a selection, no arithmetic:
``-0.0``, infinities and NaNs of ``dy`` pass where the mask is set, and ``+0.0`` is written where it
is not). torch has no fast form: its ``where``/``masked_fill``/``mul`` over a byte mask and an fp32
tensor run many times slower than over two fp32 tensors, so the torch route converts the mask to an
fp32 copy first, a pass that writes four times the mask's bytes. This reads ``dy`` and the mask
once and writes ``out`` once.

Blocks of ``BLOCK`` elements run over the cores, each in vectors of ``LANES``; the elements past
the last whole block run one at a time. (The index is written out in the vector loop: a
let-bound index vectorizes wrongly in TVM 0.27.)
"""

from __future__ import annotations

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T

LANES = 64  # four AVX-512 vectors of fp32 per step (16 measured slower)
BLOCK = 16384  # elements per parallel task


def definition(parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(dy, mask, out)``: ``dy`` fp32 ``(N,)``, ``mask`` uint8 ``(N,)``, ``out`` fp32 ``(N,)``."""
    L, B = T.int64(LANES), T.int64(BLOCK)
    loop = T.parallel if parallel else T.serial

    @T.prim_func(s_tir=True)
    def main(dy_h: T.handle, mask_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        N = T.int64()
        dy = T.match_buffer(dy_h, (N,), "float32")
        mask = T.match_buffer(mask_h, (N,), "uint8")
        out = T.match_buffer(out_h, (N,), "float32")
        for b in loop(N // B):
            for j in range(B // L):
                for v in T.vectorized(L):
                    out[b * B + j * L + v] = T.Select(
                        mask[b * B + j * L + v] != T.uint8(0), dy[b * B + j * L + v], T.float32(0)
                    )
        for i in range(N // B * B, N):
            out[i] = T.Select(mask[i] != T.uint8(0), dy[i], T.float32(0))

    return main


def schedule(parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(definition(parallel))
