"""2-D int8 convs as implicit GEMMs on NVIDIA tensor cores: the forward and the weight gradient of
a conv (groups 1, any stride and dilation) on channels-last codes, scheduled exactly as the
tensor-core GEMM of :mod:`.cuda_mma` (its tile, tensor intrinsics, split-K and code generation),
except that the operand holding the taps is gathered from the input as it is copied into shared
memory: no im2col matrix exists.

Forward contract (all s8, C s32; one kernel per :class:`MmaConvShape`)::

    C[m, o] = sum_{i, j, c} X[b, y·sh + i·dh, x·sw + j·dw, c] · B[o, (i·kw + j)·Cp + c]

for output row ``m = (b·OH + y)·OW + x`` (the output pixels in channels-last order) and output
channel ``o``:

* ``X`` ``(N, Hp, Wp, Cp)``: the input codes, channels-last, **padded by the caller**: the conv's
  zero padding is part of ``X`` (``Hp = H + 2·ph``), and the channels are padded to ``Cp``, a
  multiple of 16 (any value in the pad channels: their weights are 0). An out-of-image tap
  therefore reads whatever the caller put there: the code of the value 0 (code 0 for signed
  codes; -128 for unsigned codes the caller shifted into s8, so that the shift's correction
  ``128·Σ w`` is the same for every output position). Zero points are the caller's, as on
  the CPU (:meth:`..backend.roles.SiteRoles.fw`): the kernel computes the code product only;
* ``B`` ``(1, Np, Kp)``: the weight codes ``(OC, kh, kw, C)`` with C padded to ``Cp`` (zeros),
  flattened to rows of ``kh·kw·Cp`` and zero-padded to ``Np × Kp`` (the GEMM's B);
* ``C`` ``(1, Mp, Np)``: rows past ``M = N·OH·OW`` and columns past ``OC`` are padding (the
  caller discards them); with split-K (``shape.zero``) the kernel adds into C, zeroed first.

Exact while ``128·128·kh·kw·Cp < 2**31`` (the caller keeps ``kh·kw·C`` within the GEMM's K
limit). How the gather works: the GEMM's ``A[m, k]`` is a TE stage
``X[b, y·sh + i·dh, x·sw + j·dw, c]`` with ``(b, y, x)`` from ``m`` and ``(i, j, c)`` from
``k`` (tap ``k // Cp``, channel ``k % Cp``), inlined into the cooperative copy of the A tile
into shared memory (:func:`schedule`). Since ``Cp`` is a multiple of 16, each 16-byte piece of a
shared row is 16 consecutive channels of one tap of one pixel, so the copy stays one 16-byte
``cp.async`` per piece (checked on the generated source). Rows past ``M`` and taps past
``kh·kw`` (the K padding) are clamped to the last row and tap: they read valid memory, and the
padding's weights are 0 or its rows are discarded. Everything after the shared-memory copy
(``ldmatrix``, ``mma.sync``, the write-back) is :func:`.cuda_mma.schedule`'s.

Weight gradient (``role`` ``"gc"``, :func:`padded_gc`): ``C[o, (i·kw + j)·Cp + c] = sum_m
A[o, m] · X[pixel m + tap (i, j), c]``, the GEMM ``(OC, kh·kw·Cp, N·OH·OW)`` with ``A`` the output
gradient's codes transposed, ``(1, Mp, Kp)`` (OC rows, pixels zero-padded), and ``B`` the same
gather from the same padded ``X`` with the roles of its indices swapped: row = tap and channel,
column = pixel. Its long K (the pixels) is split as :func:`.cuda_mma.split_k_for` chooses, the
blocks adding into C. 16 consecutive pixels of one tap are not contiguous in ``X``, so this copy
is 16 byte loads per 16-byte piece (each with its own index arithmetic, synchronous in the
two-stage pipeline), not one ``cp.async``.
Exact while ``128·128·N·OH·OW < 2**31``: the caller sums batch chunks.

The error backprop of a stride-1 conv is the forward on the output gradient, padded by
``d·(k - 1) - p``, with the weights flipped in space and their channel axes swapped. The kernels
have not been run on a GPU: the tests run them in the CPU emulator of CUDA threads.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import re
from dataclasses import dataclass

import tvm
import tvm.s_tir as s_tir
from tvm import te

from . import cuda, cuda_mma
from .cuda_mma import ARCHS, MmaTile

ROLES = ("fw", "gc")  # the forward; the weight gradient
_GATHER = re.compile(r"cp_async\w*_16\w*\(A_shared_ptr, [^;]*, X_ptr, ")  # 16-byte cp.async from X
CHANNEL_ALIGN = 16  # channels padded to a multiple of this: one 16-byte copy per piece of a row
_INDEX_LIMIT = 2**31  # the kernels index their buffers in int32


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class ConvGeometry:
    """The padded input ``(n, hp, wp, c)`` (``c`` a multiple of :data:`CHANNEL_ALIGN`), the kernel
    size, strides and dilations of a 2-D conv (its padding is in ``hp``, ``wp``)."""

    n: int
    hp: int
    wp: int
    c: int
    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    dh: int = 1
    dw: int = 1

    def __post_init__(self):
        if min(self.n, self.hp, self.wp, self.c, self.kh, self.kw) < 1:
            raise ValueError(f"bad conv geometry {self}: sizes must be positive")
        if min(self.sh, self.sw, self.dh, self.dw) < 1:
            raise ValueError(f"bad conv geometry {self}: strides and dilations must be at least 1")
        if self.c % CHANNEL_ALIGN:
            raise ValueError(
                f"bad conv geometry {self}: the channels must be padded to a multiple of {CHANNEL_ALIGN}"
            )
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"bad conv geometry {self}: the kernel does not fit in the padded input")
        if self.n * self.hp * self.wp * self.c >= _INDEX_LIMIT:
            raise ValueError(f"conv geometry {self}: the input is too large for int32 indexing")

    @property
    def oh(self) -> int:
        return (self.hp - self.dh * (self.kh - 1) - 1) // self.sh + 1

    @property
    def ow(self) -> int:
        return (self.wp - self.dw * (self.kw - 1) - 1) // self.sw + 1

    @property
    def rows(self) -> int:
        """``M``: output pixels, the GEMM's rows."""
        return self.n * self.oh * self.ow

    @property
    def depth(self) -> int:
        """``K``: the reduction length ``kh·kw·c`` before padding."""
        return self.kh * self.kw * self.c

    @property
    def name(self) -> str:
        return (
            f"n{self.n}_h{self.hp}_w{self.wp}_c{self.c}_k{self.kh}x{self.kw}"
            f"_s{self.sh}x{self.sw}_d{self.dh}x{self.dw}"
        )


@dataclass(frozen=True)
class MmaConvShape:
    """A conv's GEMM padded to its tile, rounded up as :func:`.cuda_mma.padded` rounds a GEMM's:
    for the forward (``role`` ``"fw"``, :func:`padded`) ``m`` output pixels, ``n`` output
    channels, ``k`` the taps ``kh·kw·c``; for the weight gradient (``"gc"``, :func:`padded_gc`)
    ``m`` output channels, ``n`` taps, ``k`` output pixels."""

    geometry: ConvGeometry
    m: int
    n: int
    k: int
    tile: MmaTile
    split_k: int = 1
    role: str = "fw"

    groups = 1  # one GEMM (what cuda_mma.schedule reads)

    def __post_init__(self):
        g, t = self.geometry, self.tile
        if min(self.m, self.n, self.k) < 1 or self.split_k < 1 or self.role not in ROLES:
            raise ValueError(f"bad conv shape {self}")
        pixels, taps = (self.m, self.k) if self.role == "fw" else (self.k, self.n)
        if pixels < g.rows or taps < g.depth:
            raise ValueError(f"conv shape {self}: smaller than the conv's {g.rows} pixels x {g.depth} taps")
        if self.m % t.bm or self.n % t.bn or self.k % (t.bk * self.split_k):
            raise ValueError(f"conv shape {self} is not padded to its tile and K split (use padded())")
        if max(self.m * self.k, self.n * self.k, self.split_k * self.m * self.n) >= _INDEX_LIMIT:
            raise ValueError(f"conv shape {self}: too large for int32 indexing")

    @property
    def kind(self) -> str:
        return "mma_conv" if self.role == "fw" else "mma_conv_gc"

    @property
    def name(self) -> str:
        t = self.tile
        return (
            f"cuda_{'conv' if self.role == 'fw' else 'convgc'}_{self.geometry.name}"
            f"_m{self.m}_n{self.n}_k{self.k}_s{self.split_k}"
            f"_t{t.bm}x{t.bn}x{t.bk}_w{t.wm}x{t.wn}"
        )

    @property
    def zero(self) -> tuple[str, ...]:
        """The buffers the caller zeroes before each launch: C when the kernel adds into it."""
        return ("C",) if self.split_k > 1 else ()


def padded(geometry: ConvGeometry, oc: int, tile: MmaTile | None = None, split_k: int | None = None):
    """The :class:`MmaConvShape` of a conv with ``oc`` output channels: the GEMM ``(M, OC, K)`` =
    ``(N·OH·OW, oc, kh·kw·c)`` padded with :func:`.cuda_mma.padded`'s tile and K split choice."""
    if oc < 1:
        raise ValueError(f"oc={oc}: must be positive")
    gemm = cuda_mma.padded(1, geometry.rows, oc, geometry.depth, tile, split_k)
    return MmaConvShape(geometry, gemm.m, gemm.n, gemm.k, gemm.tile, gemm.split_k)


def padded_gc(geometry: ConvGeometry, oc: int, tile: MmaTile | None = None, split_k: int | None = None):
    """The :class:`MmaConvShape` of the weight gradient of a conv with ``oc`` output channels: the
    GEMM ``(oc, kh·kw·c, N·OH·OW)``, usually split along its long K (the pixels)."""
    if oc < 1:
        raise ValueError(f"oc={oc}: must be positive")
    gemm = cuda_mma.padded(1, oc, geometry.depth, geometry.rows, tile, split_k)
    return MmaConvShape(geometry, gemm.m, gemm.n, gemm.k, gemm.tile, gemm.split_k, "gc")


def source_hash() -> str:
    """Hash of the code that defines the kernel (this module, :mod:`.cuda_mma` whose schedule it
    uses, and :mod:`.cuda`): part of every cubin cache key."""
    h = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    h.update(cuda_mma.source_hash().encode())
    return h.hexdigest()[:16]


# -- the definition and schedule -------------------------------------------------------------------
def definition(shape: MmaConvShape):
    """``C[s, 0, i, j]``: the partial sums over the ``split_k`` pieces of K (as
    :func:`.cuda_mma.definition`) of ``A[0, i, k]·B[0, j, k]``, where the operand that holds the
    taps is a gather stage from ``X`` (``A`` for the forward, ``main(X, B, C)``; ``B`` for the
    weight gradient, ``main(A, X, C)`` with ``A`` the output gradient, transposed)."""
    g, s = shape.geometry, shape.split_k
    X = te.placeholder((g.n, g.hp, g.wp, g.c), "int8", name="X")
    lo = tvm.tirx.min
    taps, per_image = g.kh * g.kw, g.oh * g.ow

    def gather(pixel, k):
        pixel = lo(pixel, g.rows - 1)  # padding pixels read the last one (see the module docstring)
        b, y, x = pixel // per_image, pixel // g.ow % g.oh, pixel % g.ow
        tap = lo(k // g.c, taps - 1)  # padding taps read the last one
        return X[b, y * g.sh + tap // g.kw * g.dh, x * g.sw + tap % g.kw * g.dw, k % g.c]

    if shape.role == "fw":
        A = te.compute((1, shape.m, shape.k), lambda _, m, k: gather(m, k), name="A")
        B = te.placeholder((1, shape.n, shape.k), "int8", name="B")
        args = [X, B]
    else:
        A = te.placeholder((1, shape.m, shape.k), "int8", name="A")
        B = te.compute((1, shape.n, shape.k), lambda _, j, k: gather(k, j), name="B")
        args = [A, X]
    kc = shape.k // s
    r = te.reduce_axis((0, kc), name="k")
    C = te.compute(
        (s, 1, shape.m, shape.n),
        lambda p, b, i, j: te.sum(
            A[b, i, p * kc + r].astype("int32") * B[b, j, p * kc + r].astype("int32"), axis=r
        ),
        name="C",
    )
    return te.create_prim_func([*args, C]).with_attr("global_symbol", shape.name)


def schedule(shape: MmaConvShape) -> s_tir.Schedule:
    """:func:`.cuda_mma.schedule` of :func:`definition`, with the gather stage inlined into the
    shared-memory copy of its tile."""
    sch = cuda_mma.schedule(shape, definition(shape))
    sch.compute_inline(sch.get_sblock("A" if shape.role == "fw" else "B"))
    if shape.role == "gc":  # 16 pixels of a tap are 16 bytes apart: 16 loads, not one vector
        sch.unroll(sch.get_loops(sch.get_sblock("B_shared"))[-1])
    return sch


# -- code generation -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def lower(shape: MmaConvShape, arch: str = ARCHS[-1]) -> cuda.Kernel:
    """Schedule ``shape`` and generate its CUDA C with TVM (through :func:`.cuda_mma.tirx_source`),
    with the launch geometry read from the schedule and checked against the tile, and the A
    tile's gather checked to be 16-byte ``cp.async`` copies from ``X``."""
    sch = schedule(shape)
    source = cuda_mma.tirx_source(sch.mod, arch)
    kernels = list(cuda._SIGNATURE.finditer(source))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the generated source, found {len(kernels)}")
    bounds, name, params = kernels[0].groups()
    names = tuple(p.split()[-1].removesuffix("_ptr") for p in params.split(","))
    if sorted(names) != sorted(["X", "C", "B" if shape.role == "fw" else "A"]):
        raise RuntimeError(f"unexpected kernel parameters {params!r}")
    ext = cuda._launch_extents(sch)
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
    t = shape.tile
    expected = ((shape.m // t.bm, shape.n // t.bn, shape.split_k), (32, t.warps, 1))
    if (grid, block) != expected or (bounds and int(bounds) != t.threads):
        raise RuntimeError(
            f"{shape.name}: launch {grid} x {block} (__launch_bounds__ {bounds}) does not match the "
            f"tile: expected {expected[0]} x {expected[1]}"
        )
    if "mma.sync.aligned.m16n8k32" not in source:
        raise RuntimeError(f"{shape.name}: the generated source has no mma.sync")
    if shape.role == "fw" and (not _GATHER.search(source) or "X_ptr[" in source):
        raise RuntimeError(f"{shape.name}: the gather from X is not made of 16-byte copies (cp.async)")
    return cuda.Kernel(source, name, names, grid, block)


def generate_source(shape: MmaConvShape, arch: str = ARCHS[-1]) -> str:
    """The CUDA C of the kernel for ``shape`` (TVM's codegen, no nvcc involved)."""
    return lower(shape, arch).source


def launch_config(shape: MmaConvShape, arch: str = ARCHS[-1]):
    """``(grid, block, kernel_name, param_order, zero)`` of the kernel for ``shape``: the caller
    zeroes the buffers named in ``zero`` before the launch (C, for split-K)."""
    k = lower(shape, arch)
    return k.grid, k.block, k.name, k.params, shape.zero


def compile_cubin(shape: MmaConvShape, arch: str) -> bytes:
    """The kernel for ``shape`` as a cubin (ELF) for ``arch`` (sm_80 or newer)."""
    return cuda.compile_source(generate_source(shape, arch), arch, "cubin")
