"""The on-disk kernel cache.

A kernel is stored as ``<dir>/<name>-<key hash>.so``. For a GEMM (named by its padded shape and
tile) the hash covers the target (CPU name, instruction set, TVM version), the shape and tile, the
dtypes and the hash of the GEMM source (:func:`fraccompile.targets.kernels.gemm.source_hash`); for the
quantize, dequantize and pack kernels, the target, the kernel's name and the hash of every kernel
source (:func:`fraccompile.targets.runtime.library.source_hash`). The directory is
``$FRACCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fraccompile/kernels``, else
``~/.cache/fraccompile/kernels``.

Concurrency: a builder takes an exclusive ``flock`` on ``<file>.lock``, re-checks the file, builds
into a temporary file in the same directory and renames it into place
(:func:`fraccompile.fileio.atomic_path`), so a reader sees either no file or a complete one, and
two processes never build the same kernel at once. Linking a shared library needs a C compiler
(TVM calls ``cc``); without one kernels are built in memory for the process and a warning says so
once.

Damage: next to each library its size and sha256 are recorded (``<file>.sha256``); a library that
does not match them, or is not a whole ELF file, is never loaded (``dlopen`` of a truncated one
dies of SIGBUS) but rebuilt, with a warning. A library without the record (an older cache) is
adopted when its ELF structure is whole. The first kernel a process asks for removes what killed
builds left in the directory (temporary files, build directories).

Loading a library also points its parallel loops at torch's OpenMP threads
(:mod:`fraccompile.targets.runtime.threads`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import time
from dataclasses import dataclass, field

import tvm

from ... import fileio
from ..kernels import gemm
from . import cache_dir, threads
from .host import HostTarget, detect

log = logging.getLogger("fraccompile.targets")
DTYPES = "u8s8s32"
_SWEPT: set[pathlib.Path] = set()  # cache directories this process has cleaned


def kernel_key(shape: gemm.GemmShape, host: HostTarget) -> str:
    text = "|".join([host.key, shape.name, DTYPES, gemm.source_hash()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class BuildStats:
    """What the cache did in this process (the benchmarks and tests read it)."""

    built: int = 0
    loaded: int = 0
    adopted: int = 0  # loaded libraries whose parallel loops run on torch's OpenMP threads
    build_seconds: list[float] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)


class KernelCache:
    """Compiled kernels by name: in memory for the process, on disk for every process.

    :meth:`get` serves a GEMM shape; :meth:`get_named` any kernel, given its name, the key of what
    it was built from and how to build it (the pack and quantize kernels, see
    :class:`fraccompile.targets.runtime.library.JitKernels`). Each library loaded from disk has its parallel
    loops pointed at torch's OpenMP threads (:func:`fraccompile.targets.runtime.threads.adopt`)."""

    def __init__(self, directory: str | os.PathLike | None = None, host: HostTarget | None = None):
        self.host = host or detect()
        self.directory = pathlib.Path(directory) if directory else cache_dir()
        self._mem: dict[str, object] = {}
        self._modules: list = []  # keep loaded libraries alive as long as their functions
        self.stats = BuildStats()
        self._warned = False

    def path(self, shape: gemm.GemmShape) -> pathlib.Path:
        return self._path(shape.name, kernel_key(shape, self.host))

    def _path(self, name: str, key: str) -> pathlib.Path:
        return self.directory / f"{name}-{key}.so"

    def get(self, shape: gemm.GemmShape):
        """The packed function ``main(A, B, C)`` for ``shape``: from memory, disk, or built."""
        return self.get_named(shape.name, kernel_key(shape, self.host), lambda: gemm.build(shape, self.host))

    def get_named(self, name: str, key: str, build):
        """The function ``main`` of the kernel ``name`` whose inputs hash to ``key``; ``build()``
        compiles it (a TVM executable) when neither memory nor disk has it."""
        path = self._path(name, key)
        fn = self._mem.get(path.name)
        if fn is None:
            fn = self._mem[path.name] = self._load_or_build(path, build)
        return fn

    def _load(self, path: pathlib.Path):
        t0 = time.perf_counter()
        mod = tvm.runtime.load_module(str(path))
        fn = mod["main"]
        self._modules.append(mod)
        if threads.adopt(path):
            self.stats.adopted += 1
        self.stats.loaded += 1
        self.stats.load_seconds.append(time.perf_counter() - t0)
        return fn

    def _load_or_build(self, path: pathlib.Path, build):
        self._sweep()
        if path.exists() and fileio.checksum_problem(path) is None and fileio.elf_problem(path) is None:
            try:
                return self._load(path)
            except Exception as e:  # a foreign file: rebuilt below, under the lock
                log.warning("kernel cache: cannot load %s (%s); rebuilding", path, str(e).splitlines()[0])
        with contextlib.ExitStack() as stack:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                stack.enter_context(fileio.locked(path))
            except OSError as e:
                return self._build_in_memory(build, f"cache directory not writable: {e}")
            if path.exists():  # another process built it while we waited, or it is damaged
                fn = self._load_checked(path)
                if fn is not None:
                    return fn
            t0 = time.perf_counter()
            lib = build()
            try:
                with fileio.atomic_path(path, suffix=".so") as tmp:
                    lib.export_library(str(tmp))
                fileio.write_checksum(path)
            except Exception as e:
                self._warn(
                    f"cannot write a shared library ({e}); kernels are built in memory "
                    "for this process only (and run on TVM's thread pool)"
                )
                self._record_build(t0)
                self._modules.append(lib)
                return lib["main"]
            self._record_build(t0)
            return self._load(path)

    def _load_checked(self, path: pathlib.Path):
        """Under the lock: the kernel at ``path`` when it is whole (recording the checksum of a
        whole library an older cache wrote without one), else None, its files removed."""
        problem = fileio.checksum_problem(path)
        structure = fileio.elf_problem(path)
        if problem == fileio.NO_CHECKSUM and structure is None:
            fileio.write_checksum(path)
            problem = None
        problem = problem or structure
        if problem is None:
            try:
                return self._load(path)
            except Exception as e:
                problem = str(e).splitlines()[0]
        log.warning("kernel cache: %s is damaged (%s); rebuilding it", path, problem)
        path.unlink(missing_ok=True)
        fileio.checksum_path(path).unlink(missing_ok=True)
        return None

    def _sweep(self) -> None:
        """Once per process and directory: remove what killed builds left behind."""
        if self.directory not in _SWEPT:
            _SWEPT.add(self.directory)
            removed = fileio.remove_stale_temps(self.directory)
            if removed:
                log.info("kernel cache: removed %d leftovers of interrupted builds", len(removed))

    def _record_build(self, t0: float) -> None:
        self.stats.built += 1
        self.stats.build_seconds.append(time.perf_counter() - t0)

    def _build_in_memory(self, build, why: str):
        self._warn(why)
        t0 = time.perf_counter()
        lib = build()
        self._record_build(t0)
        self._modules.append(lib)
        return lib["main"]

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("kernel cache: %s", message)
            self._warned = True
