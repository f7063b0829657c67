"""The quantization kernels of :mod:`..kernels.cuda_quantize` (range, grids, codes) loaded and
launched on a CUDA device, for the backend's GPU quantizer.

One module holds every kernel variant: it is built once per (arch, format) by ``nvcc`` and cached
on disk next to the GEMM cubins (:func:`kernel_path`: ``cuda_quantize-<arch>-<key>.<fmt>``, the key
hashing the arch, format, TVM version and :func:`..kernels.cuda_quantize.source_hash`), or taken
from an exported library that holds it (``library.quantize_image(arch)``; an export without it is
built on demand like the JIT path). :class:`CudaQuant` loads the module once per device into the
device's primary context and returns a ``Launcher`` (``launch(name, grid, block, args)``, the
calling convention of :func:`..kernels.cuda_quantize.tensor_minmax` and friends) that runs
``cuLaunchKernel`` on torch's current stream: a tensor argument as its ``data_ptr()``, an int as a
C ``int``. Launching reads nothing back: no host sync.

Like :mod:`.cuda_driver` this module imports no tvm at import time; building the module imports
the kernel definitions (and so tvm) on first use.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import threading

import torch

from ... import fileio
from . import cache_dir
from .cuda_driver import _current, _primary_context, _tvm_version, arch_for, driver

NAME = "cuda_quantize"


def kernel_path(arch: str, fmt: str, directory: pathlib.Path | None = None) -> pathlib.Path:
    """Where the quantization module for ``arch`` / ``fmt`` is cached."""
    from ..kernels import cuda_quantize

    text = "|".join([NAME, arch, fmt, f"tvm{_tvm_version()}", cuda_quantize.source_hash()])
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return (directory or cache_dir()) / f"{NAME}-{arch}-{key}.{fmt}"


def load_or_build(arch: str, fmt: str = "cubin", directory: pathlib.Path | None = None) -> bytes:
    """Every quantization kernel in one cubin (or PTX) for ``arch``: from the disk cache, or built
    with nvcc and stored (when the directory is writable; else only returned)."""
    from ..kernels import cuda, cuda_quantize

    return fileio.cached_bytes(
        kernel_path(arch, fmt, directory),
        lambda: cuda.compile_source(cuda_quantize.generate_source(None, arch), arch, fmt),
    )


class _LoadedModule:
    """The quantization module loaded into one device's primary context; functions looked up on
    first launch."""

    def __init__(self, device: int, image: bytes):
        self.device, self.context = device, _primary_context(device)
        self._image = ctypes.create_string_buffer(image, len(image) + 1)  # PTX: NUL-terminated
        self.module, self.functions = ctypes.c_void_p(), {}
        self._lock = threading.Lock()
        with _current(self.context):
            driver()("cuModuleLoadData", ctypes.byref(self.module), self._image)

    def function(self, name: str) -> ctypes.c_void_p:
        fn = self.functions.get(name)
        if fn is None:
            with self._lock, _current(self.context):
                fn = self.functions.get(name)
                if fn is None:
                    fn = ctypes.c_void_p()
                    driver()("cuModuleGetFunction", ctypes.byref(fn), self.module, name.encode())
                    self.functions[name] = fn
        return fn

    def __call__(self, name: str, grid, block, args) -> None:
        """Launch ``name`` on torch's current stream of this device."""
        fn = self.function(name)
        values = [
            ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(int(a))
            for a in args
        ]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with _current(self.context):
            driver()("cuLaunchKernel", fn, *grid, *block, 0, ctypes.c_void_p(stream), params, None)


class CudaQuant:
    """The quantization kernels per device: :meth:`launcher` returns the ``Launcher`` of a
    device. ``library``: an exported CUDA library (:class:`.exported.CudaLibrary`) whose
    ``quantize_image(arch)`` may hold the module; ``cache_dir``: where built modules are kept."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, library=None):
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
        self.library = library
        self._modules: dict[int, _LoadedModule] = {}
        self._lock = threading.Lock()

    def image(self, arch: str, fmt: str) -> bytes:
        """The module for ``arch``: the export's, else the cached or built one."""
        found = getattr(self.library, "quantize_image", None)
        data = found(arch) if found is not None else None
        if data is not None:
            return data
        try:
            return load_or_build(arch, fmt, self.cache_dir)
        except RuntimeError as e:
            if self.library is None:
                raise
            raise RuntimeError(
                f"the CUDA quantization kernels are not in the exported library in "
                f"{getattr(self.library, 'directory', '?')} (exported before they were, or without "
                f"a cuda target) and building them failed: {e}; export again with --target cuda"
            ) from e

    def launcher(self, device: torch.device):
        """The ``Launcher`` of ``device`` (loads the module on first use)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        module = self._modules.get(index)
        if module is None:
            with self._lock:
                module = self._modules.get(index)
                if module is None:
                    arch, fmt = arch_for(torch.cuda.get_device_capability(index))
                    module = self._modules[index] = _LoadedModule(index, self.image(arch, fmt))
        return module
