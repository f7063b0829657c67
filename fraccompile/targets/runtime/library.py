"""Every kernel the ``tvm`` backend calls, by name, and where the compiled code comes from.

A :class:`KernelRef` names one distinct kernel: an integer GEMM of one padded shape and tile (with
or without its dequantize in the write-back), the
quantizer of one dtype and rounding mode (per tensor, or per sample), the dequantize epilogue (of
a GEMM's int32 product, or of a tensor's codes), an operand pack kernel of one layout, the
sub-byte (un)packer of saved codes of one width, the exact column sums of byte codes, the gate
probe of a routed site with K candidates, the exact row sums of byte codes of one row length, or
the conv patch packer of one conv geometry. Its
:attr:`~KernelRef.name` is the symbol it has in an exported library. Providers turn references into callables:

* :class:`JitKernels` builds on first use, through the on-disk cache (GEMMs with the tile a tuning
  database chose for the problem when one is given);
* :class:`fraccompile.targets.runtime.exported.ExportedKernels` reads an exported library and builds nothing.

A :class:`Recorder` attached to the backend notes each GEMM problem and conv patch packer a run
asks for, with the site and role that asked: ``fraccompile tune`` and ``fraccompile export``
enumerate a model's kernels by running one training step with it.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from dataclasses import dataclass, replace

from ..kernels import conv, gemm, masks, pack, probe, quantize, subbyte, sums
from .cache import KernelCache
from .host import HostTarget, detect

KINDS = (
    "gemm",
    "gemm_dq",
    "conv",
    "conv_dq",
    "conv_dqz",
    "gc",
    "quantize",
    "dequant",
    "dequant_codes",
    "dequant_rows",
    "pack_a",
    "pack_b",
    "pack_conv_a",
    "pack_conv_b",
    "pack_codes",
    "unpack_codes",
    "gate_probe",
    "quantize_rows",
    "quantize_rows_counter",
    "quantize_cols",
    "code_sums",
    "row_sums",
    "mask_grad",
    "pad_planes",
)
# The sources of every CPU kernel, relative to fraccompile/targets/: the definitions in kernels/
# (all but cuda.py, whose cubins have their own hash, kernels.cuda.source_hash) and the host
# target they are built for.
KERNEL_FILES = (
    "kernels/gemm.py",
    "kernels/conv.py",
    "kernels/intrin.py",
    "runtime/host.py",
    "kernels/pack.py",
    "kernels/quantize.py",
    "kernels/subbyte.py",
    "kernels/probe.py",
    "kernels/sums.py",
    "kernels/masks.py",
)


@functools.lru_cache(maxsize=None)  # read once per process, as gemm.source_hash
def source_hash() -> str:
    """Hash of the code of every CPU kernel (the GEMMs, packers and quantizers)."""
    h = hashlib.sha256()
    targets = pathlib.Path(__file__).parent.parent
    for name in KERNEL_FILES:
        h.update((targets / name).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class KernelRef:
    """``serial``: the same kernel with its parallel loop run on the calling thread (the
    memory-bound kernels below a size, see :data:`fraccompile.targets.backend.codes.PARALLEL_MIN_BYTES`;
    not for GEMMs)."""

    kind: str
    args: tuple
    serial: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kernel kind {self.kind!r}")
        if self.serial and self.kind not in SERIAL_KINDS:
            raise ValueError(f"{self.kind} kernels have no serial form")

    @classmethod
    def gemm(cls, shape: gemm.GemmShape) -> KernelRef:
        t = shape.tile
        return cls("gemm", (shape.groups, shape.m, shape.n, shape.k, t.mb, t.nb, t.kb))

    @classmethod
    def gemm_dq(cls, shape: gemm.GemmShape, row_term: bool = False) -> KernelRef:
        """The GEMM of ``shape`` writing its dequantized fp32 product (:func:`..kernels.gemm.definition`'s
        ``"dq"`` epilogue, ``"dqz"`` with a ``row_term``)."""
        return cls("gemm_dq", (*cls.gemm(shape).args, "dqz" if row_term else "dq"))

    @classmethod
    def quantize(cls, dtype: str, stochastic: bool, noise: str = "torch", serial: bool = False) -> KernelRef:
        """The quantizer to ``dtype``; stochastic rounding reads drawn noise (``"torch"``) or
        computes it (``"counter"``)."""
        if stochastic and noise == "counter":
            return cls("quantize", (dtype, True, "counter"), serial)
        return cls("quantize", (dtype, bool(stochastic)), serial)

    @property
    def gemm_shape(self) -> gemm.GemmShape:
        g, m, n, k, mb, nb, kb = self.args[:7]
        return gemm.GemmShape(g, m, n, k, gemm.Tile(mb, nb, kb))

    @property
    def name(self) -> str:
        if self.kind == "gemm":
            return self.gemm_shape.name
        if self.kind == "gemm_dq":
            return f"{self.gemm_shape.name}_{self.args[7]}"
        serial = ["serial"] if self.serial else []
        if self.kind == "quantize":
            dtype, stochastic, *noise = self.args
            return "_".join([f"quantize_{dtype}_{'sr' if stochastic else 'rn'}", *noise, *serial])
        return "_".join([self.kind, *map(str, self.args), *serial])

    def schedule(self, isa: str):
        if self.kind == "gemm":
            return gemm.schedule(self.gemm_shape, isa)
        if self.kind == "gemm_dq":
            return gemm.schedule(self.gemm_shape, isa, self.args[7])
        return _BUILDERS[self.kind](*self.args, **self._parallel)

    @property
    def _parallel(self) -> dict:
        return {"parallel": False} if self.serial else {}

    def primfunc(self, isa: str):
        """The scheduled PrimFunc under the symbol :attr:`name` (for a library of many)."""
        return self.schedule(isa).mod["main"].with_attr("global_symbol", self.name)


# kind -> its schedule, for the non-GEMM kernels
_BUILDERS = {
    "conv": conv.schedule,
    "conv_dq": conv.dq_schedule,
    "conv_dqz": conv.dqz_schedule,
    "gc": conv.gc_schedule,
    "quantize": quantize.schedule,
    "dequant": quantize.dequant_schedule,
    "dequant_codes": quantize.codes_schedule,
    "dequant_rows": quantize.rows_codes_schedule,
    "pack_a": pack.a_schedule,
    "pack_b": pack.b_schedule,
    "pack_conv_a": pack.conv_a_schedule,
    "pack_conv_b": pack.conv_b_schedule,
    "pack_codes": subbyte.pack_schedule,
    "unpack_codes": subbyte.unpack_schedule,
    "gate_probe": probe.schedule,
    "quantize_rows": quantize.rows_schedule,
    "quantize_rows_counter": quantize.rows_counter_schedule,
    "quantize_cols": quantize.cols_schedule,
    "code_sums": sums.schedule,
    "row_sums": sums.row_schedule,
    "mask_grad": masks.schedule,
    "pad_planes": pack.planes_schedule,
}

# The kinds with a serial form (memory-bound passes).
SERIAL_KINDS = (
    "quantize",
    "dequant",
    "dequant_codes",
    "dequant_rows",
    "pack_a",
    "pack_b",
    "pack_codes",
    "unpack_codes",
    "quantize_rows",
    "quantize_rows_counter",
    "quantize_cols",
    "code_sums",
    "row_sums",
    "mask_grad",
)
# The kernels of one shape that the backend's kernel getter records by name for export, with the
# site and role that asked: implicit convs, weight-gradient convs and their padded planes, row
# sums, and the GEMMs with a dequantize epilogue (noted with their problem's own sizes: export
# picks the tile for each sign of A). The plain GEMMs and conv packers are recorded as problems
# and geometries, whose kernels export re-derives per tile and sign variant.
RECORDED_KINDS = ("gemm_dq", "conv", "conv_dq", "conv_dqz", "gc", "row_sums", "pad_planes")
# The symbolic-shape kernels every model may call, whatever its shapes, in both forms.
_PARALLEL = (
    [KernelRef.quantize(d, s) for d in ("int8", "uint8") for s in (False, True)]
    + [KernelRef.quantize(d, True, "counter") for d in ("int8", "uint8")]
    + [KernelRef("dequant", v) for v in ((), ("rank1",), ("affine",))]
    + [KernelRef(kind, (d,)) for kind in ("dequant_codes", "dequant_rows") for d in ("int8", "uint8")]
    + [KernelRef("pack_a", (layout,)) for layout in ("mk", "km")]
    + [KernelRef("pack_b", (layout,)) for layout in ("nk", "kn")]
    + [KernelRef(kind, (width,)) for kind in ("pack_codes", "unpack_codes") for width in subbyte.WIDTHS]
    + [
        KernelRef(kind, (d,))
        for kind in ("quantize_rows", "quantize_rows_counter")
        for d in ("int8", "uint8", "int32")
    ]
    + [KernelRef("quantize_cols", (d,)) for d in ("int8", "uint8")]
    + [KernelRef("code_sums", (d,)) for d in sums.DTYPES]
    + [KernelRef("mask_grad", ())]
)
GENERIC = tuple(_PARALLEL + [replace(r, serial=True) for r in _PARALLEL])


class Recorder:
    """Collects what a run asks of the backend, with the ``(site, role)`` pairs that asked:

    * ``problems``: GEMM problems ``(G, M, N, K)`` (ones rows included), and per problem its
      ``variants`` — the same GEMM with the other signs of its operands, which other batches may
      produce;
    * ``conv_packs``: the conv patch packers, as ``(side, geometry, k0, kc, variants)``: side
      ``"a"`` packs a forward GEMM's A, ``"b"`` a weight gradient's B (their packed extents depend
      on the GEMM tile, so they are re-derived per variant when exporting);
    * ``kernels``: the other kernels asked for by name (:class:`KernelRef`), e.g. the
      implicit-GEMM conv forwards;
    * ``gpu_problems``: GEMM problems ``(G, M, N, K)`` that CUDA tensors run where this run took a
      CPU kernel with no GEMM of its own (a conv's forward and weight gradient run as im2col +
      GEMM on an exported CUDA library); only ``export --target cuda`` builds them.
    """

    def __init__(self):
        self.problems: dict[tuple, set] = {}
        self.variants: dict[tuple, tuple] = {}
        self.conv_packs: dict[tuple, set] = {}
        self.kernels: dict = {}
        self.gpu_problems: dict[tuple, set] = {}

    def problem(self, key, variants, where) -> None:
        self.problems.setdefault(key, set()).add(where)
        self.variants[key] = tuple(sorted(set(variants) | set(self.variants.get(key, ())) | {key}))

    def gpu_problem(self, key, where) -> None:
        self.gpu_problems.setdefault(tuple(key), set()).add(where)

    def kernel(self, ref, where) -> None:
        """A kernel whose arguments do not depend on a GEMM tile (the implicit-GEMM convs, the
        row sums, a routed site's gate probe)."""
        self.kernels.setdefault(ref, set()).add(where)

    def conv_pack(self, geometry, k0, kc, variants, where, side: str = "b") -> None:
        key = (side, tuple(geometry), k0, kc, tuple(variants))
        self.conv_packs.setdefault(key, set()).add(where)


class JitKernels:
    """Builds kernels on first use. GEMM problems take the tile of ``tuning`` (a
    :class:`~fraccompile.targets.runtime.tuning_db.TuningDB`) when it has one for this host, else the default
    tile."""

    def __init__(self, cache: KernelCache | None = None, tuning=None, host: HostTarget | None = None):
        self.host = host or detect()
        self._cache = cache
        self.tuning = tuning
        self._fns: dict[KernelRef, object] = {}

    @property
    def cache(self) -> KernelCache:
        if self._cache is None:
            self._cache = KernelCache(host=self.host)
        return self._cache

    def gemm_shape(self, G: int, M: int, N: int, K: int, where=None) -> gemm.GemmShape:
        tile = self.tuning.tile(self.host, (G, M, N, K)) if self.tuning is not None else None
        return gemm.padded(G, M, N, K, tile)

    def get(self, ref: KernelRef, where=None):
        fn = self._fns.get(ref)  # per call: no hashing of the kernel sources
        if fn is None:
            if ref.kind == "gemm":
                fn = self.cache.get(ref.gemm_shape)
            else:
                key = hashlib.sha256("|".join([self.host.key, ref.name, source_hash()]).encode())
                fn = self.cache.get_named(ref.name, key.hexdigest()[:20], lambda: self._build(ref))
            self._fns[ref] = fn
        return fn

    def _build(self, ref: KernelRef):
        import tvm

        return tvm.compile(ref.schedule(self.host.isa).mod, target=self.host.target())
