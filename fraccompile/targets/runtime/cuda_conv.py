"""Running the implicit-GEMM conv of :mod:`..kernels.cuda_conv` from PyTorch (:class:`CudaConv`),
with the loading, launching and on-disk caching of :mod:`.cuda_driver`'s :class:`.CudaGemm`.

:meth:`CudaConv.forward` takes channels-last int8/uint8 codes and int8 weight codes and returns
the exact int32 conv of the codes, the same integers as im2col (zero padding = code 0) followed by
:meth:`.CudaGemm.gemm`:

* the input is copied once into the kernel's operand (:func:`padded_input`): the conv's padding
  and the channels up to a multiple of 16 filled with the code of 0, uint8 codes shifted by -128
  into int8 (an XOR of the top bit), so the pad holds -128 for them; no copy at all for int8
  codes, channels a multiple of 16, no padding, contiguous and 16-byte aligned;
* the weights ``(OC, kh, kw, C)`` become the kernel's B (channels padded, rows padded to the
  tile, zeros);
* for uint8 codes, ``Σ x·w = Σ (x - 128)·w + 128·Σ w``: the kernel's sum plus ``128·Σ_k w[o]``
  per output channel, the same for every output position because the pad was shifted too;
* the reduction ``kh·kw·C`` must be at most :data:`.cuda_driver.MAX_K` (the caller takes the
  im2col path with a K split beyond), so the result is int32 (``255·128·K < 2**31``).

Cubins are cached on disk as :func:`.cuda_driver.load_or_build` caches the GEMM's (same
directory, ``<shape name>-<arch>-<key>.cubin``, the key over the kind, shape, arch, format, TVM
version and :func:`..kernels.cuda_conv.source_hash`), and loaded once per (device, shape). This
module does not import tvm (the kernels module is imported on first use).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import torch

from ... import fileio
from . import cache_dir
from .cuda_driver import MAX_K, KernelsPerDevice, _LoadedKernel, _tvm_version, arch_for

CHANNEL_ALIGN = 16  # :data:`..kernels.cuda_conv.CHANNEL_ALIGN` (kept here: no tvm import)


def kernel_path(shape, arch: str, fmt: str, directory: pathlib.Path | None = None) -> pathlib.Path:
    from ..kernels import cuda_conv

    text = "|".join([shape.kind, shape.name, arch, fmt, f"tvm{_tvm_version()}", cuda_conv.source_hash()])
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return (directory or cache_dir()) / f"{shape.name}-{arch}-{key}.{fmt}"


def load_or_build(shape, arch: str, fmt: str = "cubin", directory: pathlib.Path | None = None) -> bytes:
    """The compiled conv kernel for ``shape``: from the disk cache, or built with nvcc and stored
    (when the directory is writable; else only returned)."""
    from ..kernels import cuda, cuda_conv

    return fileio.cached_bytes(
        kernel_path(shape, arch, fmt, directory),
        lambda: cuda.compile_source(cuda_conv.generate_source(shape, arch), arch, fmt),
    )


def padded_input(x: torch.Tensor, padding, channels: int) -> torch.Tensor:
    """``x (N, H, W, C)`` int8/uint8 codes as the kernel's ``X``: int8 ``(N, H + 2·ph, W + 2·pw,
    channels)``, contiguous, the pad and the extra channels holding the code of 0 (0, or -128 for
    uint8 codes, which are shifted by -128). ``x`` itself (viewed as int8) when nothing changes."""
    N, H, W, C = x.shape
    ph, pw = padding
    flip = x.dtype == torch.uint8
    if not (flip or ph or pw or C != channels) and x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    out = torch.full(
        (N, H + 2 * ph, W + 2 * pw, channels), -128 if flip else 0, dtype=torch.int8, device=x.device
    )
    inner = out[:, ph : ph + H, pw : pw + W, :C]
    if flip:  # u8 code - 128, as int8: the top bit flipped on the way in
        torch.bitwise_xor(x.view(torch.int8), -128, out=inner)
    else:
        inner.copy_(x)
    return out


class CudaConv(KernelsPerDevice):
    """Exact integer 2-D convs of codes on a CUDA GPU (compute capability 8.0 and newer) with the
    implicit-GEMM tensor-core kernel. ``tile`` / ``split_k``: force the kernel's tile and K split
    (default: :func:`..kernels.cuda_mma.padded`'s choice per problem); ``cache_dir``: where cubins
    are kept."""

    def __init__(
        self,
        tile=None,
        split_k: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_k: int = MAX_K,
    ):
        if split_k is not None and split_k < 1:
            raise ValueError(f"split_k={split_k}: must be at least 1")
        if not 1 <= max_k <= MAX_K:
            raise ValueError(f"max_k={max_k}: must be in 1..{MAX_K}")
        self.tile, self.split_k, self.max_k = tile, split_k, max_k
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
        super().__init__()

    def shape(self, x_shape, w_shape, stride, padding, dilation, role: str = "fw"):
        """The padded kernel shape (:class:`..kernels.cuda_conv.MmaConvShape`) of a conv of codes
        ``x_shape (N, H, W, C)`` with weights ``w_shape (OC, kh, kw, C)``: its forward, or (``role``
        ``"gc"``) its weight gradient."""
        from ..kernels import cuda_conv

        N, H, W, C = x_shape
        (ph, pw), cp = padding, -(-C // CHANNEL_ALIGN) * CHANNEL_ALIGN
        geometry = cuda_conv.ConvGeometry(N, H + 2 * ph, W + 2 * pw, cp, *w_shape[1:3], *stride, *dilation)
        pad = cuda_conv.padded if role == "fw" else cuda_conv.padded_gc
        return pad(geometry, w_shape[0], self.tile, self.split_k)

    def forward(self, x: torch.Tensor, w: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
        """``x (N, H, W, C)`` int8/uint8 codes (channels-last, any strides) and ``w (OC, kh, kw,
        C)`` int8 codes on one device -> the exact conv of the codes, int32 ``(N·OH·OW, OC)``
        (rows: the output pixels in channels-last order; a view of a padded buffer), with the
        zero padding read as code 0."""
        self._check(x, w, stride, padding, dilation)
        shape = self.shape(x.shape, w.shape, stride, padding, dilation)
        g, (OC, kh, kw, C) = shape.geometry, w.shape
        X = padded_input(x, padding, g.c)
        B = torch.zeros((1, shape.n, shape.k), dtype=torch.int8, device=w.device)
        B[0, :OC, : g.depth].view(OC, kh * kw, g.c)[..., :C] = w.reshape(OC, kh * kw, C)
        out = self._s8_conv(X, B, shape)[0, : g.rows, :OC]
        if x.dtype == torch.uint8:  # the codes were shifted by -128: add 128·Σ w per channel
            out += 128 * w.reshape(OC, -1).sum(-1, dtype=torch.int32)
        return out

    def weight_grad(
        self, x: torch.Tensor, dy: torch.Tensor, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1)
    ) -> torch.Tensor:
        """``x (N, H, W, C)`` int8/uint8 codes and the output gradient's ``dy (N, OH, OW, OC)`` int8
        codes (channels-last, any strides) -> the exact weight gradient of the codes, ``Σ dy·x``
        over the batch and output pixels per ``(OC, kh, kw, C)``: int32 when the pixels are one
        kernel call (at most ``max_k``), else int64, summed over batch chunks of at most
        ``max_k`` pixels (each call split along the pixels as :func:`..kernels.cuda_mma.padded`
        chooses)."""
        if dy.dim() != 4 or dy.dtype != torch.int8 or dy.shape[0] != x.shape[0]:
            raise ValueError(f"dy: expected int8 (N, OH, OW, OC) codes, got {dy.dtype} {tuple(dy.shape)}")
        N, OC, (kh, kw) = x.shape[0], dy.shape[3], kernel_size
        w_shape = (OC, kh, kw, x.shape[3])
        self._check(x, torch.empty(w_shape, dtype=torch.int8, device="meta"), stride, padding, dilation, dy)
        g = self.shape((1, *x.shape[1:]), w_shape, stride, padding, dilation, "gc").geometry  # one image
        C = x.shape[3]
        if (g.oh, g.ow) != tuple(dy.shape[1:3]):
            raise ValueError(f"dy {tuple(dy.shape)}: the conv's output is {g.oh} x {g.ow}")
        per = g.oh * g.ow
        if per > self.max_k:
            raise ValueError(
                f"{per} output pixels per image is over {self.max_k}: split the reduction (im2col)"
            )
        X, chunk, total = padded_input(x, padding, g.c), self.max_k // per, None
        for b0 in range(0, N, chunk):
            nb = min(chunk, N - b0)
            part = self.shape((nb, *x.shape[1:]), w_shape, stride, padding, dilation, "gc")
            A = torch.zeros((1, part.m, part.k), dtype=torch.int8, device=dy.device)
            A[0, :OC, : nb * per] = dy[b0 : b0 + nb].reshape(nb * per, OC).t()
            c = self._s8_conv(X[b0 : b0 + nb], A, part)[0, :OC, : g.depth].view(OC, kh * kw, g.c)[..., :C]
            c = c.reshape(w_shape)
            total = c if nb == N else c.long() if total is None else total.add_(c)
        if x.dtype == torch.uint8:  # the codes were shifted by -128: add 128·Σ dy per channel
            total += 128 * dy.sum((0, 1, 2), dtype=total.dtype).reshape(OC, 1, 1, 1)
        return total

    @staticmethod
    def _check(x, w, stride, padding, dilation, dy=None) -> None:
        if x.dim() != 4 or w.dim() != 4 or x.shape[3] != w.shape[3]:
            raise ValueError(
                f"expected x (N, H, W, C) and w (OC, kh, kw, C), got {tuple(x.shape)} and {tuple(w.shape)}"
            )
        if x.dtype not in (torch.int8, torch.uint8):
            raise TypeError(f"x: dtype {x.dtype}, expected torch.int8 or torch.uint8")
        if w.dtype != torch.int8:
            raise TypeError(f"w: dtype {w.dtype}, expected torch.int8 (shift unsigned weights first)")
        if dy is None and x.device != w.device:
            raise ValueError(f"x on {x.device}, w on {w.device}")
        if dy is not None and x.device != dy.device:
            raise ValueError(f"x on {x.device}, dy on {dy.device}")
        for name, v, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
            if len(v) != 2 or min(v) < least:
                raise ValueError(f"{name}={tuple(v)}: expected two values of at least {least}")
        if min(x.shape) < 1 or min(w.shape) < 1:
            raise ValueError(f"empty conv: x {tuple(x.shape)}, w {tuple(w.shape)}")
        if dy is None and w[0].numel() > MAX_K:
            raise ValueError(f"kh·kw·C = {w[0].numel()} is over {MAX_K}: split the reduction (im2col)")

    def _s8_conv(self, x: torch.Tensor, operand: torch.Tensor, shape) -> torch.Tensor:
        """The raw kernel call: ``x`` and the other int8 operand (B, the weights, for the forward;
        A, the transposed output gradient, for the weight gradient) for ``shape`` -> int32
        ``(1, Mp, Np)``, zeroed first when the kernel adds into it (split-K). Tests replace this
        method to check the rest of :meth:`forward` and :meth:`weight_grad` without a GPU."""
        c = (torch.zeros if "C" in shape.zero else torch.empty)(
            (1, shape.m, shape.n), dtype=torch.int32, device=x.device
        )
        kernel = self._kernel(x.device, shape)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        kernel.launch({"X": x, "B" if shape.role == "fw" else "A": operand, "C": c}, stream)
        return c

    def _load(self, index: int, shape) -> _LoadedKernel:
        from ..kernels import cuda_conv

        arch, fmt = arch_for(torch.cuda.get_device_capability(index))
        image = load_or_build(shape, arch, fmt, self.cache_dir)
        grid, block, name, params = cuda_conv.launch_config(shape, arch)[:4]
        return _LoadedKernel(index, image, name, params, grid, block)
