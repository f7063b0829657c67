"""Sub-byte storage of integer codes: ``8 / width`` codes per byte (``width`` 1, 2 or 4 bits), for
the codes a site keeps for backward (docs/backends.md, "Memory held for backward").

Both kernels work on bytes (``uint8``: an ``int8`` tensor is passed as its ``uint8`` view) and on a
flat length in memory order, so any layout round-trips:

* ``pack_codes(width)``: ``out[i] = Σ_t ((q[i·per + t] + add) & mask) << (t·width)`` with
  ``per = 8 / width``; ``add`` (mod 256) moves the codes' range to ``0 .. 2**width - 1`` (e.g.
  ``+8`` for centered 4-bit codes ``-8 .. 7``);
* ``unpack_codes(width)``: ``q[i] = ((p[i / per] >> ((i % per)·width)) & mask) - add``.

Codes outside the ``width``-bit window after ``+ add`` do not round-trip: the caller packs only
codes whose grid fits (:func:`fraccompile.targets.backend.codes.pack_saved`). Written out like
:mod:`.quantize`: blocks of whole vectors in parallel, a scalar tail.
"""

from __future__ import annotations

import functools

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T

from ..runtime.host import detect

WIDTHS = (1, 2, 4)
BLOCK = 4096  # packed bytes per parallel task
LANES = 64


def _check(width: int) -> int:
    if width not in WIDTHS:
        raise ValueError(f"sub-byte width must be one of {WIDTHS}, not {width}")
    return 8 // width


def pack_definition(width: int, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(q, add, out)``: ``q`` uint8 ``(n,)``, ``add`` uint8 ``(1,)``, ``out`` uint8
    ``(ceil(n / per),)``; the last byte's missing codes are 0."""
    per = _check(width)
    mask = (1 << width) - 1
    L, B = T.int64(LANES), T.int64(BLOCK)
    loop = T.parallel if parallel else T.serial

    def byte(q, add, i):
        value = None
        for t in range(per):
            term = T.bitwise_and(q[i * per + t] + add[0], T.uint8(mask))
            term = T.shift_left(term, T.uint8(t * width)) if t else term
            value = term if value is None else T.bitwise_or(value, term)
        return value

    def tail_byte(q, add, i, n):
        value = None
        for t in range(per):
            term = T.if_then_else(
                i * per + t < n,
                T.bitwise_and(q[T.min(i * per + t, n - 1)] + add[0], T.uint8(mask)),
                T.uint8(0),
            )
            term = T.shift_left(term, T.uint8(t * width)) if t else term
            value = term if value is None else T.bitwise_or(value, term)
        return value

    @T.prim_func(s_tir=True)
    def main(q_h: T.handle, add: T.Buffer((1,), "uint8"), out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        n, m = T.int64(), T.int64()
        q = T.match_buffer(q_h, (n,), "uint8")
        out = T.match_buffer(out_h, (m,), "uint8")
        full = n // per  # bytes with all their codes present
        for b in loop(full // B):
            for j in range(B // L):
                for v in T.vectorized(L):
                    out[b * B + j * L + v] = byte(q, add, b * B + j * L + v)
        for i in range(full // B * B, full):
            out[i] = byte(q, add, i)
        for i in range(full, m):
            out[i] = tail_byte(q, add, i, n)

    return main


def unpack_definition(width: int, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """``main(p, add, out)``: ``p`` uint8 ``(ceil(n / per),)``, ``add`` uint8 ``(1,)``, ``out``
    uint8 ``(n,)``."""
    per = _check(width)
    mask = (1 << width) - 1
    L, B = T.int64(LANES), T.int64(BLOCK * per)
    loop = T.parallel if parallel else T.serial

    def code(p, add, i):
        shifted = T.shift_right(p[i // per], T.Cast("uint8", (i % per) * width))
        return T.bitwise_and(shifted, T.uint8(mask)) - add[0]

    @T.prim_func(s_tir=True)
    def main(p_h: T.handle, add: T.Buffer((1,), "uint8"), out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        n, m = T.int64(), T.int64()
        p = T.match_buffer(p_h, (m,), "uint8")
        out = T.match_buffer(out_h, (n,), "uint8")
        for b in loop(n // B):
            for j in range(B // L):
                for v in T.vectorized(L):
                    out[b * B + j * L + v] = code(p, add, b * B + j * L + v)
        for i in range(n // B * B, n):
            out[i] = code(p, add, i)

    return main


def pack_schedule(width: int, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(pack_definition(width, parallel))


def unpack_schedule(width: int, parallel: bool = True) -> s_tir.Schedule:
    return s_tir.Schedule(unpack_definition(width, parallel))


@functools.lru_cache(maxsize=None)
def pack_kernel(width: int, parallel: bool = True):
    return tvm.compile(pack_schedule(width, parallel).mod, target=detect().target())["main"]


@functools.lru_cache(maxsize=None)
def unpack_kernel(width: int, parallel: bool = True):
    return tvm.compile(unpack_schedule(width, parallel).mod, target=detect().target())["main"]
