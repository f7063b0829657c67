"""Exported kernels: the directory ``fraccompile export`` writes, and the provider that serves a
backend from it.

The directory holds::

    DIR/kernels-cpu.so        --target cpu: one shared library (tvm.runtime.load_module loads it)
                              with the GEMMs in every sign variant of each problem (a tensor's
                              codes are unsigned when a batch has no negative value, which adds a
                              ones row to the GEMM), the quantizers and the pack kernels
    DIR/kernels-cuda.fatbin   --target cuda: the tensor-core (mma) GEMMs (cubins for sm_80 and
                              sm_90, PTX of sm_90), and of those without a K split the variant
                              with the dequantize fused (the cuda section's ``epilogue`` entry);
                              the pip TVM has no CUDA runtime, so the CUDA driver loads it
                              (:mod:`.cuda_driver`)
    DIR/kernels-cuda-quantize.fatbin
                              --target cuda: the quantization kernels of CUDA tensors (range,
                              grids, codes; :mod:`..kernels.cuda_quantize`), the cuda section's
                              ``quantize`` entry; an export without it has them built on first use
    DIR/manifest.json         per target: the library's sha256, TVM version, kernel-source hash
                              (and CPU/instruction set, or archs); per kernel: function name,
                              kind, shapes, dtypes, precision, target, and the sites and roles
                              that call it. Exporting the other target into DIR adds its section.

The writer is :mod:`fraccompile.targets.tools.export`.

:class:`ExportedKernels` serves a backend from such a directory and builds nothing. It refuses, with
a :class:`KernelLibraryError` naming the mismatch, a manifest of another CPU, instruction set, TVM
version or kernel source, a missing or damaged library, a library whose bytes differ from the
manifest's hash, a CPU library that is not a whole ELF file (checked before ``dlopen``, which
would die of SIGBUS on a truncated one, even when the manifest's hash was edited to match), and
(at the call, naming the site and role) a GEMM the library does not hold or a target it was not
exported for — unless the user asked for the fallback, which builds what is
missing, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable

import tvm

from ... import fileio
from ...errors import FracCompileError
from ..kernels import gemm
from . import threads
from .host import HostTarget, detect
from .library import JitKernels, KernelRef, source_hash

log = logging.getLogger("fraccompile.targets")
MANIFEST = "manifest.json"
CUDA_LIBRARY = "kernels-cuda.fatbin"
CUDA_QUANTIZE_LIBRARY = "kernels-cuda-quantize.fatbin"
FORMAT = 1


class KernelLibraryError(FracCompileError):
    """An exported kernel library that cannot serve this model on this machine."""


def library_name(target: str) -> str:
    return f"kernels-{target}.so"


def problem_key(problem) -> str:
    """A GEMM problem ``(G, M, N, K)`` as the manifest's key."""
    return ",".join(map(str, problem))


def _refusal(directory) -> Callable[[str], KernelLibraryError]:
    return lambda what: KernelLibraryError(f"exported kernels in {directory}: {what}")


def _read_manifest(directory: pathlib.Path) -> dict:
    refuse = _refusal(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise refuse(f"no {MANIFEST} (write one with `fraccompile export`)")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest["targets"], dict) or not manifest["targets"]:
            raise ValueError("no targets")
    except (ValueError, KeyError, TypeError) as e:
        raise refuse(f"{MANIFEST} is damaged ({type(e).__name__}: {e})") from None
    if manifest.get("format") != FORMAT:
        raise refuse(f"manifest format {manifest.get('format')!r}, this fraccompile reads {FORMAT}")
    return manifest


def _check_library(directory: pathlib.Path, info: dict, expected: dict, elf: bool = False) -> pathlib.Path:
    """The library ``info`` names, checked: the manifest's fields against ``expected``, its
    sha256, and (``elf``: a shared library to ``dlopen``) its ELF structure."""
    refuse = _refusal(directory)
    for field, mine in expected.items():
        if info.get(field) != mine:
            raise refuse(
                f"built for {field} {info.get(field)!r}, this machine/install has {mine!r}; export again here"
            )
    lib = directory / str(info.get("library", ""))
    if not lib.is_file():
        raise refuse(f"the library {lib.name} is missing")
    if fileio.sha256_file(lib) != info.get("sha256"):
        raise refuse(
            f"{lib.name} does not match the sha256 in {MANIFEST} (modified or truncated "
            "after export); export again"
        )
    problem = fileio.elf_problem(lib) if elf else None
    if problem:
        raise refuse(f"{lib.name} is not a whole shared library ({problem}); export again")
    return lib


class CudaLibrary:
    """The CUDA kernels of an exported directory, for :class:`.cuda_driver.CudaGemm`. ``info``
    None: the directory has no CUDA target (refused at the first GPU GEMM unless ``fallback``).
    :attr:`kind` is the kernel kind the export holds (``"mma"``, or ``"dp4a"`` for exports
    that predate the mma kernel and name none), None without a CUDA target."""

    def __init__(self, directory: pathlib.Path, info: dict | None, fallback: bool = False):
        self.directory, self.info, self.fallback = directory, info, fallback
        self.image = self._quantize = None
        self.kind = None if info is None else info.get("kernel", "dp4a")
        if info is not None:
            if self.kind == "mma":
                from ..kernels import cuda_mma as kernels
            else:
                from ..kernels import cuda as kernels

            lib = _check_library(
                directory, info, {"tvm": tvm.__version__, "source_hash": kernels.source_hash()}
            )
            self.image = lib.read_bytes()

    def quantize_image(self, arch: str) -> bytes | None:
        """The fatbin of the quantization kernels (:mod:`..runtime.cuda_quant` loads it), or None
        where the export holds none for ``arch`` (an export that predates them, or no CUDA
        target): they are built on first use. A damaged or mismatched file is refused."""
        entry = (self.info or {}).get("quantize")
        if entry is None or arch not in entry.get("archs", ()):
            return None
        if self._quantize is None:
            from ..kernels import cuda_quantize

            expected = {"tvm": tvm.__version__, "source_hash": cuda_quantize.source_hash()}
            self._quantize = _check_library(self.directory, entry, expected).read_bytes()
        return self._quantize

    def has_kernel(self, shape, arch: str) -> bool:
        """Whether the export holds ``shape``'s kernel for ``arch``, without refusing or building:
        asked for the GEMMs with the dequantize fused (:mod:`..kernels.cuda_epilogue`), which are
        used only where an export wrote them (its ``epilogue`` entry, with the current source
        hash); elsewhere the plain kernel and a separate dequantize serve."""
        info = self.info
        if info is None or arch not in info["archs"] or shape.name not in info["kernels"]:
            return False
        if getattr(shape, "kind", None) != "mma_epilogue":
            return True
        from ..kernels import cuda_epilogue

        return (info.get("epilogue") or {}).get("source_hash") == cuda_epilogue.source_hash()

    def kernel(self, shape, arch: str):
        """``(image, name, params, grid, block)`` of ``shape``'s kernel, or None: build it. A
        kernel that adds into C (split-K mma) needs C zeroed: ``shape.zero`` says so."""
        refuse = _refusal(self.directory)
        if self.info is None:
            if self.fallback:
                return None
            raise refuse("no cuda target (export with --target cuda), and kernels_fallback is not set")
        entry = self.info["kernels"].get(shape.name)
        if entry is None or arch not in self.info["archs"]:
            kind = getattr(shape, "kind", "dp4a")
            what = (
                f"no CUDA kernel for {shape.name}"
                + (
                    f" (the export holds {self.kind} kernels, this is a {kind} one)"
                    if kind != self.kind
                    else ""
                )
                if entry is None
                else f"no code for {arch} (has {', '.join(self.info['archs'])})"
            )
            if self.fallback:
                log.warning("exported kernels: %s; building it", what)
                return None
            raise refuse(f"{what}; export again for these shapes, or set kernels_fallback=True")
        return (
            self.image,
            entry["function"],
            tuple(entry["params"]),
            tuple(entry["grid"]),
            tuple(entry["block"]),
        )


class ExportedKernels:
    """A kernel provider over an exported directory (see the module docstring). The CPU library
    serves CPU tensors; :attr:`cuda_library` the CUDA GEMM of GPU tensors."""

    def __init__(
        self,
        directory: str | os.PathLike,
        fallback: bool = False,
        tuning=None,
        host: HostTarget | None = None,
    ):
        self.directory = pathlib.Path(directory)
        self.host = host or detect()
        self.fallback = fallback
        self._jit = JitKernels(tuning=tuning, host=self.host)
        self._fns: dict[str, object] = {}
        self.manifest, self.module, self.problems = None, None, {}
        self.cuda_library = CudaLibrary(self.directory, None, fallback)
        try:
            self.manifest = _read_manifest(self.directory)
            targets = self.manifest["targets"]
            if "cpu" in targets:
                self.module = self._open_cpu(targets["cpu"])
                self.problems = targets["cpu"].get("problems", {})
            if "cuda" in targets:
                self.cuda_library = CudaLibrary(self.directory, targets["cuda"], fallback)
        except KernelLibraryError as e:
            if not fallback:
                raise
            log.warning("%s; kernels_fallback is set: building kernels instead", e)
            self.manifest, self.module, self.problems = None, None, {}
            self.cuda_library = CudaLibrary(self.directory, None, fallback)

    @property
    def cache(self):
        return self._jit.cache

    def _refuse(self, what: str) -> KernelLibraryError:
        return _refusal(self.directory)(what)

    def _open_cpu(self, info: dict):
        lib = _check_library(
            self.directory,
            info,
            {
                "tvm": tvm.__version__,
                "mcpu": self.host.mcpu,
                "isa": self.host.isa,
                "source_hash": source_hash(),
            },
            elf=True,
        )
        try:
            module = tvm.runtime.load_module(str(lib))
        except Exception as e:
            raise self._refuse(f"cannot load {lib.name}: {str(e).splitlines()[0]}") from None
        threads.adopt(lib)  # its parallel loops on torch's OpenMP threads
        return module

    def _missing(self, what: str, where) -> KernelLibraryError:
        site = f" (site {where[0]!r}, role {where[1]})" if where else ""
        if self.module is None:
            return self._refuse(f"no cpu target (export with --target cpu) for {what}{site}")
        shapes = (self.manifest or {}).get("input_shapes")
        return self._refuse(
            f"no kernel for {what}{site}; the library was exported for input "
            f"shape(s) {shapes}: export again for these shapes, or set "
            "kernels_fallback=True to build what is missing"
        )

    def gemm_shape(self, G: int, M: int, N: int, K: int, where=None) -> gemm.GemmShape:
        name = self.problems.get(problem_key((G, M, N, K)))
        if name is None:
            if self.manifest is not None and not self.fallback:
                raise self._missing(f"the GEMM problem G={G} M={M} N={N} K={K}", where)
            if self.manifest is not None:
                log.warning("exported kernels: building the missing GEMM %s", (G, M, N, K))
            return self._jit.gemm_shape(G, M, N, K)
        return KernelRef("gemm", _gemm_args(name)).gemm_shape

    def get(self, ref: KernelRef, where=None):
        fn = self._fns.get(ref.name)
        if fn is not None:
            return fn
        if self.module is not None and _has(self.module, ref.name):
            fn = self.module.get_function(ref.name, query_imports=True)
        else:
            if self.manifest is not None and not self.fallback:
                raise self._missing(f"{_KIND_NAMES.get(ref.kind, 'kernel')} {ref.name}", where)
            fn = self._jit.get(ref)
        self._fns[ref.name] = fn
        return fn


_KIND_NAMES = {
    "gemm_dq": "the GEMM with its dequantize epilogue",
    "conv": "the implicit-GEMM conv forward",
    "conv_dq": "the implicit-GEMM conv forward with its dequantize epilogue",
    "conv_dqz": "the implicit-GEMM conv forward with its dequantize epilogue and a weight zero point's term",
    "gc": "the implicit-GEMM conv weight gradient",
}


def _has(module, name: str) -> bool:
    try:
        return module.implements_function(name, query_imports=True)
    except Exception:
        try:
            module.get_function(name, query_imports=True)
            return True
        except Exception:
            return False


def _gemm_args(name: str) -> tuple:
    """The KernelRef args of a GEMM function name (``gemm_g1_m8_n16_k32_t6x4x32``)."""
    parts = dict((p[0], p[1:]) for p in name.split("_")[1:5])
    t = name.rsplit("_t", 1)[1].split("x")
    return (int(parts["g"]), int(parts["m"]), int(parts["n"]), int(parts["k"]), *map(int, t))
