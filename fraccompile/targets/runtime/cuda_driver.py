"""Running the TVM-generated CUDA GEMMs from PyTorch, through the CUDA driver API: the tensor-core
kernel (:mod:`..kernels.cuda_mma`, ``mma.sync``, the default on compute capability 8.0 and newer)
and the ``dp4a`` kernel (:mod:`..kernels.cuda`, ``CudaGemm(kernel="dp4a")``).

TVM 0.27's pip wheel has no CUDA runtime, so it cannot load its own CUDA modules. This module is
the launcher: ``libcuda.so.1`` through ctypes (no other dependency), ``cuModuleLoadData`` of the
cubin that ``nvcc`` built from TVM's source, ``cuModuleGetFunction``, and ``cuLaunchKernel`` on
torch's current stream with the ``data_ptr()`` of torch CUDA tensors. Modules are loaded once per
(device, kernel) into the device's primary context, the one torch uses.

:class:`CudaGemm` turns int8/uint8 codes into the s8 × s8 kernel's operands:

* a uint8 operand is shifted by -128 into int8 (an XOR of the top bit), and
  ``a·bᵀ = a'·b'ᵀ + sb·Σ_k a'[m] + sa·Σ_k b[n]`` undoes it, where ``a = a' + sa`` and
  ``b = b' + sb`` (``sa``, ``sb`` = 128 for a uint8 operand, else 0); the row sums are torch
  reductions on the GPU;
* K is split into chunks of at most ``max_k`` (65536: ``|a'·b'ᵀ| <= 128·128·65536 = 2**30``),
  each chunk padded with zeros to the tile;
* the result is int32 when ``K <= max_k`` and it provably fits (``|a|max · |b|max · K < 2**31``:
  always for int8 × int8 and uint8 × int8, uint8 × uint8 only up to K = 33025), else int64;
* codes stored minus per-row offsets (the GPU quantizer's, :mod:`..kernels.cuda_quantize`: int8
  with the offset as device data) are corrected exactly on the device
  (``a_offset``/``b_offset`` of :meth:`CudaGemm.gemm`, :func:`offset_terms`), and operands the
  quantize kernel wrote already padded are taken as they are (:meth:`CudaGemm.gemm_padded`);
* the mma kernel splits K across thread blocks for problems with few output tiles and a long
  reduction (:func:`..kernels.cuda_mma.split_k_for`); its blocks add their int32 partial sums
  into C with ``atomicAdd``, so C is zeroed (``torch.zeros``, on the current stream) before such
  a launch. Integer addition is exact in any order;
* :mod:`.cuda_epilogue` launches, through :meth:`CudaGemm._launch`, the mma kernel with the
  dequantize fused in its write-back (:mod:`..kernels.cuda_epilogue`), cached and loaded alike.

Kernels are compiled for the device's architecture (sm_80 for compute capability 8.x, sm_90 for
9.x; on a newer GPU the sm_90 PTX, which the driver JIT-compiles) and cached on disk under
``$FRACCOMPILE_CACHE_DIR`` (else ``$XDG_CACHE_HOME/fraccompile/kernels`` or
``~/.cache/fraccompile/kernels``) as ``<shape name>-<arch>-<key>.cubin``, the key hashing the
kernel kind, shape, arch, format, TVM version and the source hash of the kind's module (shape
names differ between the kinds too: ``cuda_gemm_…`` and ``cuda_mma_…``); files are written to a
temporary file and renamed (:func:`fraccompile.fileio.atomic_write`), so a reader sees no file or
a whole one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import threading

import torch

from ... import fileio
from . import cache_dir

MAX_K = 65_536  # |sum of K s8·s8 products| <= 128·128·65536 = 2**30
_INT32_LIMIT = 2**31
_BOUND = {torch.int8: 128, torch.uint8: 255}  # largest |code|
_MAX_GRID_YZ = 65_535
KERNELS = ("auto", "mma", "dp4a")  # CudaGemm(kernel=...): auto is mma on compute capability >= 8.0


class CUDAError(RuntimeError):
    """A CUDA driver API call failed; ``.code`` is the CUresult, ``.name`` its name."""

    def __init__(self, call: str, code: int, name: str, detail: str = ""):
        self.call, self.code, self.name = call, code, name
        super().__init__(f"{call} failed: {name} ({code}){': ' + detail if detail else ''}")


# -- the driver API --------------------------------------------------------------------------------
class _Driver:
    """The few driver API functions used, with their ctypes signatures."""

    _SIGNATURES = {
        "cuInit": [ctypes.c_uint],
        "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
        "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
        "cuCtxPushCurrent_v2": [ctypes.c_void_p],
        "cuCtxPopCurrent_v2": [ctypes.POINTER(ctypes.c_void_p)],
        "cuModuleLoadData": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p],
        "cuModuleGetFunction": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p],
        "cuLaunchKernel": [
            ctypes.c_void_p,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_void_p),
        ],
    }

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        for name, argtypes in self._SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self.check("cuInit", self.lib.cuInit(0))

    def error_name(self, code: int) -> tuple[str, str]:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(name)) != 0 or not name.value:
            return f"CUresult {code}", ""
        self.lib.cuGetErrorString(code, ctypes.byref(text))
        return name.value.decode(), (text.value or b"").decode()

    def check(self, call: str, code: int) -> None:
        if code != 0:
            raise CUDAError(call, code, *self.error_name(code))

    def __call__(self, name: str, *args) -> None:
        self.check(name, getattr(self.lib, name)(*args))


_driver_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _driver() -> _Driver:
    return _Driver(ctypes.CDLL("libcuda.so.1"))


def driver() -> _Driver:
    with _driver_lock:
        return _driver()


def gpu_unavailable_reason() -> str | None:
    """None when torch sees a CUDA GPU of compute capability 8.0 or newer and ``libcuda.so.1``
    loads and initializes, else a one-line reason."""
    try:
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)"
    except Exception as e:  # a broken driver install can raise here
        return f"torch.cuda: {type(e).__name__}: {e}"
    try:
        driver()
    except OSError as e:
        return f"cannot load libcuda.so.1: {e}"
    except CUDAError as e:
        return str(e)
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.{minor}: the kernels are built for 8.0 and newer"
    return None


def arch_for(capability: tuple[int, int]) -> tuple[str, str]:
    """``(arch, format)`` to build for a device of compute capability ``(major, minor)``: the
    cubin of its own major version (a cubin runs on later minor versions), else the PTX of the
    newest older arch, which the driver JIT-compiles."""
    from ..kernels.cuda import ARCHS

    major = capability[0]
    for arch in ARCHS:
        if int(arch[3:]) // 10 == major:
            return arch, "cubin"
    older = [a for a in ARCHS if int(a[3:]) // 10 < major]
    if not older:
        raise ValueError(f"compute capability {capability[0]}.{capability[1]} is older than {ARCHS[0]}")
    return older[-1], "ptx"


# -- the on-disk cache -----------------------------------------------------------------------------
def _tvm_version() -> str:
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        import tvm

        return tvm.__version__


def kernels_module(shape):
    """The module that generates ``shape``'s kernel: :mod:`..kernels.cuda_mma` for an mma shape,
    :mod:`..kernels.cuda_epilogue` for one with the dequantize fused, else :mod:`..kernels.cuda`
    (dp4a)."""
    if kind_of(shape) == "mma":
        from ..kernels import cuda_mma as module
    elif kind_of(shape) == "mma_epilogue":
        from ..kernels import cuda_epilogue as module
    else:
        from ..kernels import cuda as module
    return module


def kind_of(shape) -> str:
    """``"mma"`` or ``"dp4a"``: the kernel kind of a padded shape."""
    return getattr(shape, "kind", "dp4a")


def kernel_path(shape, arch: str, fmt: str, directory: pathlib.Path | None = None) -> pathlib.Path:
    kind = kind_of(shape)
    text = "|".join(
        [kind, shape.name, arch, fmt, f"tvm{_tvm_version()}", kernels_module(shape).source_hash()]
    )
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return (directory or cache_dir()) / f"{shape.name}-{arch}-{key}.{fmt}"


def load_or_build(shape, arch: str, fmt: str = "cubin", directory: pathlib.Path | None = None) -> bytes:
    """The compiled kernel for ``shape`` (either kind): from the disk cache, or built with nvcc
    and stored (when the directory is writable; else only returned)."""
    from ..kernels import cuda

    return fileio.cached_bytes(
        kernel_path(shape, arch, fmt, directory),
        lambda: cuda.compile_source(kernels_module(shape).generate_source(shape, arch), arch, fmt),
    )


# -- loaded kernels --------------------------------------------------------------------------------
class _LoadedKernel:
    """One kernel loaded into one device's primary context."""

    def __init__(self, device: int, image: bytes, name: str, params: tuple[str, ...], grid, block):
        drv = driver()
        self.device, self.name, self.params = device, name, params
        self.grid, self.block = tuple(grid), tuple(block)
        self.context = _primary_context(device)
        self._image = ctypes.create_string_buffer(image, len(image) + 1)  # PTX: NUL-terminated
        self.module, self.function = ctypes.c_void_p(), ctypes.c_void_p()
        with _current(self.context):
            drv("cuModuleLoadData", ctypes.byref(self.module), self._image)
            drv("cuModuleGetFunction", ctypes.byref(self.function), self.module, name.encode())

    def launch(self, buffers: dict[str, torch.Tensor], stream: int) -> None:
        ptrs = [ctypes.c_void_p(buffers[p].data_ptr()) for p in self.params]
        args = (ctypes.c_void_p * len(ptrs))(*[ctypes.addressof(p) for p in ptrs])
        with _current(self.context):
            driver()(
                "cuLaunchKernel",
                self.function,
                *self.grid,
                *self.block,
                0,
                ctypes.c_void_p(stream),
                args,
                None,
            )


@functools.lru_cache(maxsize=None)
def _primary_context(device: int) -> ctypes.c_void_p:
    drv = driver()
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    drv("cuDeviceGet", ctypes.byref(dev), device)
    drv("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)  # torch's context; never released
    return ctx


class _current:
    """Make ``context`` current on this thread for the block (push/pop)."""

    def __init__(self, context: ctypes.c_void_p):
        self.context = context

    def __enter__(self):
        driver()("cuCtxPushCurrent_v2", self.context)

    def __exit__(self, *exc):
        driver()("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))


class KernelsPerDevice:
    """Loaded kernels per (device, shape), each loaded once under a lock by the subclass's
    ``_load(device_index, shape)`` (:class:`CudaGemm`, :class:`.cuda_conv.CudaConv`)."""

    def __init__(self):
        self._kernels: dict[tuple, _LoadedKernel] = {}
        self._lock = threading.Lock()

    def _kernel(self, device: torch.device, shape) -> _LoadedKernel:
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, shape)
        kernel = self._kernels.get(key)
        if kernel is None:
            with self._lock:
                kernel = self._kernels.get(key)
                if kernel is None:
                    kernel = self._kernels[key] = self._load(index, shape)
        return kernel

    def _load(self, index: int, shape) -> _LoadedKernel:
        raise NotImplementedError


# -- the GEMM --------------------------------------------------------------------------------------
class CudaGemm(KernelsPerDevice):
    """Exact integer GEMMs ``a @ bᵀ`` per group on a CUDA GPU, with a TVM kernel.

    ``kernel``: ``"mma"`` (tensor cores, :mod:`..kernels.cuda_mma`), ``"dp4a"``
    (:mod:`..kernels.cuda`) or ``"auto"``: the kind of the exported ``library`` if one is given,
    else mma on compute capability 8.0 and newer, dp4a below;
    ``tile``: force one tile (a :class:`..kernels.cuda_mma.MmaTile` or
    :class:`..kernels.cuda.CudaTile`, which also fixes the kind; default: the module's
    ``default_tile`` per problem); ``split_k``: force the mma kernel's K split (default:
    :func:`..kernels.cuda_mma.split_k_for` per problem; 1: never);
    ``max_k``: the K chunk length (at most :data:`MAX_K`); ``cache_dir``: where cubins are kept.
    """

    def __init__(
        self,
        tile=None,
        max_k: int = MAX_K,
        cache_dir: str | os.PathLike | None = None,
        library=None,
        kernel: str = "auto",
        split_k: int | None = None,
    ):
        """``library``: an exported CUDA library (:class:`.exported.CudaLibrary`) to take kernels
        from instead of building them."""
        if not 1 <= max_k <= MAX_K:
            raise ValueError(f"max_k={max_k}: must be in 1..{MAX_K}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: expected one of {', '.join(KERNELS)}")
        if tile is not None:
            tile_kind = "mma" if hasattr(tile, "wm") else "dp4a"
            if kernel not in ("auto", tile_kind):
                raise ValueError(f"kernel={kernel!r} with a {tile_kind} tile {tile}")
            kernel = tile_kind
        if split_k is not None and (kernel == "dp4a" or split_k < 1):
            raise ValueError(f"split_k={split_k}: only the mma kernel splits K, into at least 1 piece")
        self.tile, self.max_k, self.library, self.kernel, self.split_k = tile, max_k, library, kernel, split_k
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
        super().__init__()

    def kind_for(self, device: torch.device) -> str:
        """The kernel kind for operands on ``device`` (see the class docstring; a non-CUDA device,
        as in tests with a stand-in kernel, gets mma)."""
        if self.kernel != "auto":
            return self.kernel
        library_kind = getattr(self.library, "kind", None)
        if library_kind is not None:
            return library_kind
        if device.type != "cuda":
            return "mma"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "mma" if torch.cuda.get_device_capability(index) >= (8, 0) else "dp4a"

    # the padded shape of one kernel call (pure Python, imports tvm via the kernels module)
    def padded_shape(self, groups: int, m: int, n: int, k: int, kind: str | None = None):
        """The padded shape of a ``(G, M, N, K)`` call of the ``kind`` kernel (default: this
        GEMM's kind, mma for auto)."""
        kind = kind or (self.kernel if self.kernel != "auto" else "mma")
        if kind == "mma":
            from ..kernels.cuda_mma import padded

            return padded(groups, m, n, k, self.tile, self.split_k)
        from ..kernels.cuda import padded

        return padded(groups, m, n, k, self.tile)

    def out_dtype(self, a_dtype: torch.dtype, b_dtype: torch.dtype, k: int) -> torch.dtype:
        """int32 when one kernel call covers K and the exact result fits, else int64."""
        fits = _BOUND[a_dtype] * _BOUND[b_dtype] * k < _INT32_LIMIT
        return torch.int32 if k <= self.max_k and fits else torch.int64

    def gemm(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        a_offset: torch.Tensor | None = None,
        b_offset: torch.Tensor | None = None,
        padded: tuple | None = None,
    ) -> torch.Tensor:
        """``a (G, M, K)`` and ``b (G, N, K)`` int8/uint8 codes on one device -> ``(G, M, N)``
        ``a @ bᵀ`` per group, exact (int32 or int64, see :meth:`out_dtype`). ``a_offset`` /
        ``b_offset``: device int tensors broadcasting to ``(G, M)`` / ``(G, N)`` (codes stored
        minus a per-row offset, :mod:`..kernels.cuda_quantize`): the product of ``a + a_offset``
        and ``b + b_offset``, corrected exactly on the device (:func:`offset_terms`).
        ``padded``: ``(A, B)``, the operands padded to this problem's kernel shape that ``a`` and
        ``b`` are views of (zeros around them; the quantize kernel writes them so): taken as
        they are (:meth:`gemm_padded`) when both are given and the shape matches."""
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
            raise ValueError(
                f"expected a (G, M, K) and b (G, N, K), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        for name, x in (("a", a), ("b", b)):
            if x.dtype not in _BOUND:
                raise TypeError(f"{name}: dtype {x.dtype}, expected torch.int8 or torch.uint8")
        if a.device != b.device:
            raise ValueError(f"a on {a.device}, b on {b.device}")
        G, M, K = a.shape
        N = b.shape[1]
        out_dtype = self.out_dtype(
            torch.uint8 if a_offset is not None else a.dtype,
            torch.uint8 if b_offset is not None else b.dtype,
            K,
        )
        if min(G, M, N) == 0 or K == 0:
            return torch.zeros((G, M, N), dtype=out_dtype, device=a.device)
        if padded is not None and None not in padded and K <= self.max_k:
            shape = self.padded_shape(G, M, N, K, self.kind_for(a.device))
            A, B = padded
            if tuple(A.shape) == (G, shape.m, shape.k) and tuple(B.shape) == (G, shape.n, shape.k):
                return self.gemm_padded(A, B, shape, M, N, K, a_offset, b_offset).to(out_dtype)
        if a_offset is not None or b_offset is not None:
            out = self.gemm(a, b).to(out_dtype)
            return add_offset_terms(out, a, b, a_offset, b_offset)
        sa = 128 if a.dtype == torch.uint8 else 0
        sb = 128 if b.dtype == torch.uint8 else 0
        out = None
        for k0 in range(0, K, self.max_k):
            kc = min(self.max_k, K - k0)
            a_s, b_s = _to_s8(a[..., k0 : k0 + kc]), _to_s8(b[..., k0 : k0 + kc])
            part = self._chunk(a_s, b_s).to(out_dtype)
            if sb:  # a' · (b' + sb) = a'·b'ᵀ + sb · Σ_k a'
                part += sb * a_s.sum(-1, dtype=out_dtype).unsqueeze(-1)
            if sa:  # (a' + sa) · b = a'·bᵀ + sa · Σ_k b
                part += sa * b[..., k0 : k0 + kc].sum(-1, dtype=out_dtype).unsqueeze(-2)
            out = part if out is None else out.add_(part)
        return out

    def gemm_padded(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        shape,
        m: int,
        n: int,
        k: int,
        a_offset: torch.Tensor | None = None,
        b_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`gemm` of operands already in the kernel's layout: ``a (G, Mp, Kp)`` and ``b (G,
        Np, Kp)`` contiguous int8 padded with zeros to ``shape`` (:meth:`padded_shape` of the
        problem ``(G, m, n, k)``, one kernel call: ``k <= max_k``), as the quantize kernel writes
        them; no shift, pad or copy. ``(G, m, n)``, offsets corrected as in :meth:`gemm` (the
        padding's zeros add nothing to the sums; the offsets' ``K`` term counts ``k`` only)."""
        G, Mp, Kp = a.shape
        if (
            a.dtype != torch.int8
            or b.dtype != torch.int8
            or not (a.is_contiguous() and b.is_contiguous())
            or (G, Mp, Kp) != (shape.groups, shape.m, shape.k)
            or tuple(b.shape) != (shape.groups, shape.n, shape.k)
        ):
            raise ValueError(
                f"expected contiguous int8 operands padded to {shape}, got {tuple(a.shape)} "
                f"{a.dtype} and {tuple(b.shape)} {b.dtype}"
            )
        if k > self.max_k:
            raise ValueError(f"K = {k}: one kernel call takes at most max_k = {self.max_k}")
        c = self._s8_gemm(a, b, shape)[:, :m, :n]
        if a_offset is None and b_offset is None:
            return c
        out_dtype = self.out_dtype(torch.uint8, torch.uint8, k)
        return add_offset_terms(c.to(out_dtype), a[:, :m], b[:, :n], a_offset, b_offset, k)

    def _chunk(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a'·b'ᵀ`` (int32) of int8 operands with ``K <= max_k``: padded to the tile (and K
        split) of the whole problem, run by :meth:`_s8_gemm` in group slices that keep every
        buffer index under 2**31 (the kernels index in int32; the mma kernel's split-K indexes
        ``split_k`` partial outputs) and the grid within 65535 groups (times the K split)."""
        G, M, K = a.shape
        N = b.shape[1]
        shape = self.padded_shape(G, M, N, K, self.kind_for(a.device))
        split = getattr(shape, "split_k", 1)
        per_group = max(shape.m * shape.k, shape.n * shape.k, split * shape.m * shape.n)
        if per_group >= _INT32_LIMIT:
            raise ValueError(f"one group of {M}x{N}x{K} is too large for the kernels")
        step = min(_MAX_GRID_YZ // split, (_INT32_LIMIT - 1) // per_group)
        parts = []
        for g0 in range(0, G, step):
            gc = min(step, G - g0)
            A = _pad(a[g0 : g0 + gc], shape.m, shape.k)
            B = _pad(b[g0 : g0 + gc], shape.n, shape.k)
            call = shape if gc == G else dataclasses.replace(shape, groups=gc)
            parts.append(self._s8_gemm(A, B, call)[:, :M, :N])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _s8_gemm(self, a: torch.Tensor, b: torch.Tensor, shape) -> torch.Tensor:
        """The raw kernel call: ``a (G, Mp, Kp)`` and ``b (G, Np, Kp)`` contiguous int8 padded to
        ``shape`` (:meth:`padded_shape`) -> int32 ``(G, Mp, Np)``; C is zeroed first when the
        kernel adds into it (``shape.zero``: split-K). Tests replace this method to check the
        rest of :meth:`gemm` without a GPU."""
        c = (torch.zeros if "C" in getattr(shape, "zero", ()) else torch.empty)(
            (shape.groups, shape.m, shape.n), dtype=torch.int32, device=a.device
        )
        self._launch(shape, {"A": a, "B": b, "C": c})
        return c

    def _launch(self, shape, buffers: dict[str, torch.Tensor]) -> None:
        """Launch ``shape``'s kernel on ``buffers`` (by parameter name) on the current stream
        (also :func:`.cuda_epilogue.gemm_f32`'s; tests replace it)."""
        device = buffers["A"].device
        self._kernel(device, shape).launch(buffers, torch.cuda.current_stream(device).cuda_stream)

    def _load(self, index: int, shape) -> _LoadedKernel:
        arch, fmt = arch_for(torch.cuda.get_device_capability(index))
        if self.library is not None:
            found = self.library.kernel(shape, arch)
            if found is not None:
                image, name, params, grid, block = found
                return _LoadedKernel(index, image, name, params, grid, block)
        image = load_or_build(shape, arch, fmt, self.cache_dir)
        grid, block, name, params = kernels_module(shape).launch_config(shape, arch)[:4]
        return _LoadedKernel(index, image, name, params, grid, block)


def offset_terms(
    a: torch.Tensor,
    b: torch.Tensor,
    a_offset: torch.Tensor | None,
    b_offset: torch.Tensor | None,
    dtype: torch.dtype,
    k: int | None = None,
) -> torch.Tensor:
    """What codes stored minus per-row offsets lack of the exact product:
    ``(a + oa)·(b + ob)ᵀ - a·bᵀ = oa·Σ_k b + ob·Σ_k a + K·oa·ob`` per group, ``(G, M, N)`` in
    ``dtype`` (:func:`add_offset_terms` into zeros)."""
    out = torch.zeros((a.shape[0], a.shape[1], b.shape[1]), dtype=dtype, device=a.device)
    return add_offset_terms(out, a, b, a_offset, b_offset, k)


def add_offset_terms(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_offset: torch.Tensor | None,
    b_offset: torch.Tensor | None,
    k: int | None = None,
) -> torch.Tensor:
    """``out += oa·(Σ_k b + K·ob) + ob·Σ_k a`` in place (:func:`offset_terms`' terms), in
    ``out``'s integer dtype, all on the device (integer sums and products, no host read): at
    most two passes over ``out``. ``oa`` broadcasts to ``(G, M)``, ``ob`` to ``(G, N)``; ``k``:
    the problem's reduction length (default ``a``'s)."""
    G, M, K = a.shape
    N = b.shape[1]
    k = K if k is None else k
    dtype = out.dtype
    oa = None if a_offset is None else a_offset.to(dtype).expand(G, M)
    ob = None if b_offset is None else b_offset.to(dtype).expand(G, N)
    if oa is not None:
        b_sums = b.sum(-1, dtype=dtype)
        if ob is not None:
            b_sums.add_(ob * k)
        out.addcmul_(oa.unsqueeze(-1), b_sums.unsqueeze(-2))
    if ob is not None:
        out.addcmul_(a.sum(-1, dtype=dtype).unsqueeze(-1), ob.unsqueeze(-2))
    return out


def _to_s8(x: torch.Tensor) -> torch.Tensor:
    """int8 codes as they are; uint8 codes shifted by -128 (flip the top bit, reinterpret)."""
    if x.dtype == torch.int8:
        return x
    return torch.bitwise_xor(x, 128).view(torch.int8)


def _pad(x: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """``x (G, R, K)`` int8 as a contiguous, 16-byte aligned ``(G, rows, k)`` with zeros added."""
    G, R, K = x.shape
    if (R, K) == (rows, k) and x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    out = torch.zeros((G, rows, k), dtype=torch.int8, device=x.device)
    out[:, :R, :K] = x
    return out
