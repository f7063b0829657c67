"""The dequantized GEMM of CUDA codes in one kernel (:func:`gemm_f32`): the tensor-core GEMM with
the dequantize fused in its write-back (:mod:`..kernels.cuda_epilogue`), where it applies; the
caller (:meth:`..backend.gemm_runtime.IntegerGemms.gemm_f32`) otherwise runs
:meth:`.cuda_driver.CudaGemm.gemm` and the dequantize as torch ops.

The exact product of codes ``a (G, M, K)`` and ``b (G, N, K)`` stored as ``a' + α`` and
``b' + β`` (``a'``, ``b'`` the kernel's s8 operands; ``α`` = 128 for a uint8 operand, which is
shifted into s8, plus its per-row code offset, likewise ``β``) is::

    C' + α·Σ_k b' + β·Σ_k a' + K·α·β

With ``α`` and ``β`` the same for every row of a group (one offset per tensor or per group, not
per row), the last three terms are one int32 per row, ``rc = β·Σ_k a' + K·α·β``, plus one per
column, ``cc = α·Σ_k b'``: two small integer reductions on the device before the launch (no host
read), and the kernel adds them to its accumulators before the one int-to-float conversion.

It applies where: the tensors are on a GPU and the GEMM is the mma kind; one kernel call covers
K (``K <= max_k``) with no K split (split-K blocks add into C with ``atomicAdd``: their
dequantize stays a separate pass); the exact result fits in int32; the code offsets are per
tensor or per group (per-row offsets, a routed site's per-sample grids, make ``α·Σ_k b'`` a
rank-one term: the separate pass); and the grid and indices fit one launch. With an exported
library, only where the export holds the fused kernel (else the plain kernel and the separate
pass: nothing is built). This module does not import tvm (the kernels module is imported on first
use).
"""

from __future__ import annotations

import torch

from .cuda_driver import _BOUND, _INT32_LIMIT, _MAX_GRID_YZ, _pad, _to_s8, arch_for


def runs_kernels(t: torch.Tensor) -> bool:
    """Whether the fused kernel can run on ``t``'s device (tests replace it to run stand-ins on
    CPU tensors)."""
    return t.is_cuda


def gemm_f32(
    gemm,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    offsets: tuple | None = None,
    operands: tuple | None = None,
    row_term: tuple | None = None,
) -> torch.Tensor | None:
    """``(a·bᵀ + offsets' terms) * scale (+ p·t) + bias`` in fp32 ``(G, M, N)`` with one fused
    kernel of ``gemm`` (a :class:`.cuda_driver.CudaGemm`), or None where it does not apply (see
    the module docstring). The arguments are
    :meth:`..backend.gemm_runtime.IntegerGemms.gemm_f32`'s."""
    a_off, b_off = offsets or (None, None)
    shape = _fused_shape(gemm, a, b, a_off, b_off, row_term is not None)
    if shape is None:
        return None
    G, M, K = a.shape
    N = b.shape[1]
    A, B = operands if operands is not None else (None, None)
    fits = A is not None and B is not None and tuple(A.shape) == (G, shape.m, shape.k)
    if not (fits and tuple(B.shape) == (G, shape.n, shape.k) and A.dtype == B.dtype == torch.int8):
        A, B = None, None
    a8, b8 = _to_s8(a), _to_s8(b)
    if A is None:
        A, B = _pad(a8, shape.m, shape.k), _pad(b8, shape.n, shape.k)
    alpha, beta = _shift(a.dtype, a_off), _shift(b.dtype, b_off)
    # in int64, then int32: int32 sums wrap, so the kernel's total is exact wherever it fits
    rc = cc = None
    if beta is not None:  # β·Σ_k a' (+ K·α·β)
        rc = a8.sum(-1, dtype=torch.int64) * beta + (0 if alpha is None else alpha * beta * K)
    if alpha is not None:  # α·Σ_k b'
        cc = b8.sum(-1, dtype=torch.int64) * alpha
    i32 = dict(dtype=torch.int32, device=a.device)
    f32 = dict(dtype=torch.float32, device=a.device)
    bias = torch.zeros(N, **f32) if bias is None else bias
    buffers = {
        "A": A,
        "B": B,
        "rc": torch.zeros((G, M), **i32) if rc is None else rc.to(torch.int32).expand(G, M).contiguous(),
        "cc": torch.zeros((G, N), **i32) if cc is None else cc.to(torch.int32).expand(G, N).contiguous(),
        "scale": scale.reshape(-1).to(**f32).expand(N).contiguous(),
        "bias": bias.reshape(-1).to(**f32).expand(N).contiguous(),
    }
    if row_term is not None:
        p, t = row_term
        buffers["p"] = p.to(**f32).reshape(-1, M).expand(G, M).contiguous()
        buffers["t"] = t.reshape(-1).to(**f32).expand(N).contiguous()
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
    direct = direct and tuple(out.shape) == (G, M, N) and out.device == a.device
    buffers["out"] = out if direct else torch.empty((G, M, N), **f32)
    gemm._launch(shape, buffers)
    return out.copy_(buffers["out"]) if out is not None and not direct else buffers["out"]


def _fused_shape(gemm, a, b, a_off, b_off, rank1: bool):
    """The :class:`..kernels.cuda_epilogue.MmaEpilogueShape` of this call, or None where the fused
    kernel does not apply."""
    if not runs_kernels(a) or a.dim() != 3 or b.dim() != 3 or a.device != b.device:
        return None
    if a.dtype not in _BOUND or b.dtype not in _BOUND or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return None
    G, M, K = a.shape
    N = b.shape[1]
    if min(G, M, N, K) == 0 or K > gemm.max_k or gemm.kind_for(a.device) != "mma":
        return None
    if not (_per_group(a_off) and _per_group(b_off)):
        return None
    bound_a = _BOUND[torch.uint8 if a_off is not None else a.dtype]
    if bound_a * _BOUND[torch.uint8 if b_off is not None else b.dtype] * K >= _INT32_LIMIT:
        return None  # the exact result may not fit in int32 (gemm returns int64 there)
    plain = gemm.padded_shape(G, M, N, K, "mma")
    if plain.split_k != 1 or G > _MAX_GRID_YZ:
        return None
    if G * max(plain.m * plain.k, plain.n * plain.k, plain.m * plain.n) >= _INT32_LIMIT:
        return None
    from ..kernels.cuda_epilogue import MmaEpilogueShape

    shape = MmaEpilogueShape(plain, M, N, rank1)
    library = gemm.library
    if library is not None:
        index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        has = getattr(library, "has_kernel", None)
        if has is None or not has(shape, arch_for(torch.cuda.get_device_capability(index))[0]):
            return None  # an export without the fused kernel: the plain one, nothing built
    return shape


def _per_group(offset: torch.Tensor | None) -> bool:
    """Whether a code offset is one value per tensor or per group (broadcasting to ``(G, 1)``)."""
    return offset is None or offset.dim() == 0 or offset.shape[-1] == 1


def _shift(dtype: torch.dtype, offset: torch.Tensor | None) -> torch.Tensor | int | None:
    """``α`` of an operand: 128 for uint8 codes (shifted into s8) plus its code offset, as an
    int64 ``(G or 1, 1)`` tensor (an int without an offset); None where it is 0."""
    shift = 128 if dtype == torch.uint8 else 0
    if offset is None:
        return shift or None
    return offset.to(torch.int64).reshape(-1, 1) + shift
