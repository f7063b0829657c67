"""The AVX-512 VNNI dot-product tensor intrinsic: ``C[16] += A[4] (u8) · B[16, 4] (s8)`` in one
``vpdpbusd``.

TVM ships the same description as ``dot_16x4_vnni``, but its implementation no longer builds with
the bundled LLVM 22 (``llvm.x86.avx512.vpdpbusd.512`` takes ``int8x64`` operands now; see
docs/tvm.md, "TVM 0.27 facts"). This one reinterprets the broadcast A word and the B tile as
``int8x64``.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_16x4 = "fraccompile_vnni_16x4"


@T.prim_func(s_tir=True)
def _desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_word = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_bytes = T.reinterpret(T.broadcast(a_word, 16), dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            a_bytes,
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


def register() -> str:
    """Register the intrinsic once per process; returns its name."""
    try:
        TensorIntrin.get(VNNI_16x4)
    except Exception:  # not registered yet (TVM raises a ValueError/TVMError)
        TensorIntrin.register(VNNI_16x4, _desc, _vnni)
    return VNNI_16x4
