"""The terms an integer GEMM adds to its exact product when its operands have zero points
(``sbm``): row sums of one operand's codes, sums of the other's values, and for convs their
window, tap and border forms (docs/contract.md, "Integer lowering"). Exact integer sums of codes
over the batch or the positions come from the ``code_sums`` kernel (int32); the others are taken
as fp32 (exact below 2**24)."""

from __future__ import annotations

import functools
import itertools
import math

import torch

from ...ops.spec import CONV_FNS, SiteSpec
from ..kernels.sums import MAX_ROW_LENGTH
from ..kernels.sums import MAX_ROWS as MAX_SUM_ROWS  # rows of byte codes whose column sums int32 holds
from ..runtime.library import KernelRef
from .codes import IntCodes, _dense_perm, _serial


def _out_channel(spec: SiteSpec, v: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-output-channel vector (or one value) shaped to broadcast against an output of
    ``dims`` dims (channels at dim 1 for a conv, last otherwise)."""
    v = v.reshape(-1)
    if spec.kind == "conv":
        return v.reshape(1, -1, *([1] * (dims - 2)))
    return v


# the largest |code| of a dtype (wide codes: gradients of at most 16 bits)
_CODE_BOUND = {torch.uint8: 255, torch.int8: 128}
_EXACT = 2**24  # fp32 holds every integer below this
_BYTE_CODES = (torch.uint8, torch.int8)


def _exact_sums(codes: torch.Tensor, dims, dtype: torch.dtype = torch.float32, kernel=None) -> torch.Tensor:
    """Exact sums of integer codes over ``dims``, shaped as ``codes`` without them, in ``dtype``
    (fp32: exact below 2**24; float64 for larger sums).

    The codes are read in memory order as an ``(R, K)`` matrix whose rows or columns are the
    summed dims. Where the summed dims are outermost (column sums: a batch sum) and ``kernel``
    (the backend's kernel getter, None on the GPU) is given, byte codes go through the
    :mod:`..kernels.sums` kernel: one pass into int32; otherwise (row sums: a channels-last
    conv's channel sums), rows of up to ``MAX_ROW_LENGTH`` codes through its row-sums kernel of
    that row length. The rest are converted to fp32 and reduced by a matrix-vector product
    against ones, in chunks whose partial sums stay below 2**24 (exact in fp32 whatever the order
    of the additions), which are added in float64. torch's integer reductions run many times
    slower, worst over a small innermost dim (a conv's channels)."""
    n = codes.dim()
    dims = sorted({d % n for d in dims})
    keep = [d for d in range(n) if d not in dims]
    order = _dense_perm(codes)
    if order is None:
        order = list(range(n))
        codes = codes.contiguous()
    if set(order[: len(dims)]) == set(dims):  # summed dims outermost: column sums
        kept_order, rows = order[len(dims) :], True
    elif set(order[n - len(dims) :]) == set(dims):  # innermost: row sums
        kept_order, rows = order[: n - len(dims)], False
    else:  # neither: a byte copy with the summed dims last
        order, kept_order, rows = keep + dims, keep, False
        codes = codes.permute(*order).contiguous().permute(*sorted(range(n), key=order.__getitem__))
    R = math.prod(codes.shape[d] for d in (dims if rows else keep))
    K = math.prod(codes.shape[d] for d in (keep if rows else dims))
    mat = codes.permute(*order).reshape(R, K)
    fast = kernel is not None and codes.dtype in _BYTE_CODES and not mat.is_cuda
    if rows and fast:
        total = _column_sums(mat, kernel).to(dtype)
    elif fast and 0 < K <= MAX_ROW_LENGTH and mat.is_contiguous():
        total = torch.empty(R, dtype=torch.float32)
        ref = KernelRef("row_sums", (_byte_name(mat), K), serial=_serial(mat.numel()))
        kernel(ref)(mat, total)
        total = total.to(dtype)
    else:
        length = mat.shape[0] if rows else mat.shape[1]  # the summed extent
        step = max(1, (_EXACT - 1) // _CODE_BOUND.get(codes.dtype, 2**16))
        total = None
        for lo in range(0, max(length, 1), step):
            part = mat[lo : lo + step] if rows else mat[:, lo : lo + step]
            part = part.float()
            ones = part.new_ones(part.shape[0] if rows else part.shape[1])
            sums = ones @ part if rows else part @ ones
            if length <= step:
                total = sums
            else:
                total = sums.double() if total is None else total.add_(sums)
        total = total.to(dtype)
    inverse = sorted(range(len(kept_order)), key=lambda i: kept_order[i])
    return total.view([codes.shape[d] for d in kept_order]).permute(*inverse)


def _column_sums(mat: torch.Tensor, kernel) -> torch.Tensor:
    """``mat.sum(0)`` of byte codes ``(R, K)`` (contiguous), exact: int32 from the :mod:`..kernels.sums`
    kernel, in row chunks whose sums int32 holds (int64 where there are several)."""
    name = _byte_name(mat)
    sums = []
    for lo in range(0, max(mat.shape[0], 1), MAX_SUM_ROWS):
        part = mat[lo : lo + MAX_SUM_ROWS]
        sums.append(torch.empty(mat.shape[1], dtype=torch.int32))
        kernel(KernelRef("code_sums", (name,), serial=_serial(part.numel())))(part, sums[-1])
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum(0, dtype=torch.int64)


def _byte_name(codes: torch.Tensor) -> str:
    """The kernel dtype name of byte codes."""
    return "uint8" if codes.dtype == torch.uint8 else "int8"


def _code_sums(codes: torch.Tensor, dim, kernel=None) -> torch.Tensor:
    """Exact sums of integer codes along ``dim``, as fp32."""
    return _exact_sums(codes, [dim], kernel=kernel)


def _conv_shape_args(spec: SiteSpec, w_shape):
    return (
        list(spec.stride),
        list(spec.gemm_padding(w_shape)),
        list(spec.dilation),
        False,
        [0] * spec.conv_dims,
    )


def _window_code_sums(spec: SiteSpec, xq: IntCodes, w_shape, kernel=None) -> torch.Tensor:
    """Per output row, the sum of the input codes it reads: ``Σ_k qx`` (a conv: over its window,
    per group, zero padding reading code 0), shaped to broadcast against the output. ``kernel``:
    as :func:`_exact_sums`."""
    if spec.kind in ("linear", "matmul"):
        return _code_sums(xq.codes, -1, kernel).unsqueeze(-1)
    G, OC = spec.groups, w_shape[0]
    codes = xq.codes
    # the channel sums first (exact), then one box filter per group: a pass over the codes
    # instead of a C-channel convolution
    if G == 1:
        per_group = _exact_sums(codes, [1], kernel=kernel).unsqueeze(1)
    else:
        per_group = _exact_sums(codes.reshape(codes.shape[0], G, -1, *codes.shape[2:]), [2], kernel=kernel)
    sums = _box_sums(per_group, w_shape[2:], spec.stride, spec.gemm_padding(w_shape), spec.dilation)
    return sums if G == 1 else sums.repeat_interleave(OC // G, dim=1)


def _box_sums(t: torch.Tensor, ksize, stride, padding, dilation) -> torch.Tensor:
    """The sum over every conv window of ``t`` ``(N, G, *spatial)`` (zero padding): a conv with
    all-ones taps, one channel per group, computed separably: per spatial dim, the sum of its
    ``k`` strided slices (``Σ k`` additions instead of a ``Π k``-tap conv, which runs poorly on
    one channel). fp32 sums of integers are exact below 2**24, in any order."""
    n = len(ksize)
    t = torch.nn.functional.pad(t, [p for d in reversed(range(n)) for p in (padding[d], padding[d])])
    for d in range(n):
        dim, span = 2 + d, dilation[d] * (ksize[d] - 1)
        out = (t.shape[dim] - span - 1) // stride[d] + 1
        total = None
        for tap in range(ksize[d]):
            first = tap * dilation[d]
            index = (slice(None),) * dim + (slice(first, first + (out - 1) * stride[d] + 1, stride[d]),)
            total = t[index].clone() if total is None else total.add_(t[index])
        t = total
    return t


def _value_sums(spec: SiteSpec, wq: IntCodes, x_shape, w_shape, kernel=None) -> torch.Tensor:
    """Per output column, the sum of the weight's (second operand's) values it reads: ``Σ_k w``
    (a conv: over the taps inside the image at each output position, the same for every
    sample, laid out channels innermost), shaped to broadcast against the output. A linear's
    from its codes' exact sums, ``sw·Σ_k q + K·zw`` (no fp32 copy of the weight; ``kernel``: as
    :func:`_exact_sums`)."""
    if spec.kind == "linear" and isinstance(wq.offset, int) and not wq.offset and not wq.wide:
        sums = _code_sums(wq.codes, -1, kernel) * wq.scale.reshape(-1)
        return sums if wq.zero is None else sums.add_(wq.zero.reshape(-1), alpha=wq.codes.shape[-1])
    w = wq.dequantize()
    if spec.kind == "linear":
        return w.sum(-1)
    if spec.kind == "matmul":
        return w.sum(-2, keepdim=True)
    ones = torch.ones((1, *x_shape[1:]), device=w.device)
    sums = CONV_FNS[spec.conv_dims](
        ones, w, None, spec.stride, spec.gemm_padding(w_shape), spec.dilation, spec.groups
    )
    # channels innermost, as the conv outputs it is added to: an elementwise op over operands of
    # two layouts takes torch's strided loop, many times slower
    return sums.movedim(1, -1).contiguous().movedim(-1, 1)


def _border_slices(spec: SiteSpec, in_sp, w_shape) -> list[tuple]:
    """Indices ``(..., *spatial slices)`` of a conv output that together cover, once each, the
    positions where some tap reads outside the image (zero padding), and nothing else: per
    spatial dim, the positions before the first and after the last whose window lies inside,
    with the dims before it held to that inside range."""
    pad, ks, n = spec.gemm_padding(w_shape), w_shape[2:], spec.conv_dims
    out_sp = _out_sizes(spec, in_sp, w_shape)
    inside = []
    for d in range(n):
        # output o reads o·stride - pad + tap·dilation: inside for every tap from
        # ceil(pad / stride) to floor((size - 1 + pad - dilation·(k - 1)) / stride)
        lo = min(-(-pad[d] // spec.stride[d]), out_sp[d])
        last = (in_sp[d] - 1 + pad[d] - spec.dilation[d] * (ks[d] - 1)) // spec.stride[d]
        inside.append((lo, max(lo, min(last + 1, out_sp[d]))))
    out = []
    for d in range(n):
        held = tuple(slice(*inside[e]) for e in range(d))
        rest = (slice(None),) * (n - d - 1)
        lo, hi = inside[d]
        for part in (slice(0, lo), slice(hi, out_sp[d])):
            if part.stop > part.start:
                out.append((slice(None), slice(None), *held, part, *rest))
    return out


def _tap_sums(spec: SiteSpec, t: torch.Tensor, in_sp, out_sp, w_shape, image: bool) -> torch.Tensor:
    """For every tap of a conv's kernel, the sum over the output positions ``o`` whose tap reads
    inside the image (input coordinate ``o·stride + tap·dilation - padding``): of the image ``t``
    ``(C, *in_sp)`` at those coordinates (``image``), or of the output map ``t`` ``(OC, *out_sp)``
    at those positions. Returns ``(len(t), *kernel)`` in ``t``'s dtype.

    Each tap's sum covers a box of ``t`` (per dim a range; strided in the image where the conv
    has a stride): on the CPU, boxes are differences of float64 prefix sums, one dim at a time,
    for all taps at once (exact for integer-valued ``t``); strided boxes, and GPU tensors, are
    summed one slice per tap."""
    n, pad, ks = spec.conv_dims, spec.gemm_padding(w_shape), w_shape[2:]
    ranges = []  # per dim: per tap, the range [lo, hi) of t's coordinates it sums (empty: lo == hi)
    for d in range(n):
        st = spec.stride[d]
        lo_hi = []
        for tap in range(ks[d]):
            first = tap * spec.dilation[d] - pad[d]
            lo = max(0, -(first // st))  # ceil(-first / st)
            hi = min(out_sp[d] - 1, (in_sp[d] - 1 - first) // st)
            if hi < lo:
                lo_hi.append((0, 0))
            else:
                lo_hi.append((first + lo * st, first + hi * st + 1) if image else (lo, hi + 1))
        ranges.append((lo_hi, st if image else 1))
    if any(st != 1 for _, st in ranges) or t.device.type != "cpu":  # (no host index on a GPU)
        return _tap_sums_sliced(t, ranges, ks)
    # separably, per spatial dim: prefix sums along it, then each tap's range as the difference
    # of two of them (float64: exact for integer-valued t); a dim's taps replace its extent
    out = t.double()
    for d, (lo_hi, _) in enumerate(ranges):
        lo, hi = _range_index(tuple(lo_hi))
        P = torch.nn.functional.pad(out.cumsum(1 + d), [0, 0] * (n - 1 - d) + [1, 0])
        out = P.index_select(1 + d, hi).sub_(P.index_select(1 + d, lo))
    return out.to(t.dtype)


@functools.lru_cache(maxsize=256)
def _range_index(lo_hi: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The start and end indices of ranges ``[lo, hi)``, as index tensors (one pair per geometry)."""
    return torch.tensor([r[0] for r in lo_hi]), torch.tensor([r[1] for r in lo_hi])


def _tap_sums_sliced(t: torch.Tensor, ranges, ks) -> torch.Tensor:
    """:func:`_tap_sums` over ``ranges`` (per dim: per tap ``(lo, hi)``, and the step), one
    strided slice sum per tap."""
    n = len(ks)
    out = t.new_zeros((t.shape[0], *ks))
    for tap in itertools.product(*(range(k) for k in ks)):
        index = [slice(None)]
        for d in range(n):
            (lo, hi), st = ranges[d][0][tap[d]], ranges[d][1]
            if hi <= lo:
                break
            index.append(slice(lo, hi, st))
        else:
            out[(slice(None), *tap)] = t[tuple(index)].sum(list(range(1, n + 1)))
    return out


def _input_code_sums(spec: SiteSpec, xq: IntCodes, x_shape, w_shape, kernel=None) -> torch.Tensor:
    """Per weight-gradient entry, the sum over output positions of the input codes it pairs
    with: ``Σ_m qx[m, k]`` (a conv: per tap, zero padding reading code 0), shaped to broadcast
    against ``dw``."""
    codes = xq.codes
    if spec.kind == "linear":
        return _code_sums(codes.reshape(-1, x_shape[-1]), 0, kernel)
    if spec.kind == "matmul":
        return _code_sums(codes, -2, kernel).unsqueeze(-1)
    # every sample pairs with the same taps: the batch sum first (exact), then one image
    return _input_taps(spec, _exact_sums(codes, [0], kernel=kernel), x_shape, w_shape)


def _input_taps(spec: SiteSpec, batch: torch.Tensor, x_shape, w_shape) -> torch.Tensor:
    """A conv's :func:`_input_code_sums` from the sum ``batch`` ``(C, *spatial)`` of its samples'
    codes (or any weighted sum of them: every sample pairs with the same taps), in ``batch``'s
    dtype."""
    G, Cg = spec.groups, w_shape[1]
    out_sp = _out_sizes(spec, x_shape[2:], w_shape)
    sums = _tap_sums(spec, batch, x_shape[2:], out_sp, w_shape, image=True)  # (C, *kernel)
    if G == 1:
        return sums.unsqueeze(0)
    return sums.reshape(G, Cg, *w_shape[2:]).repeat_interleave(w_shape[0] // G, dim=0)


def _gradient_sums(spec: SiteSpec, dyq: IntCodes, x_shape, w_shape, kernel=None) -> torch.Tensor:
    """Per weight-gradient entry, the sum of ``dy``'s values over the output positions it pairs
    with: ``Σ_m dy[m, n]`` (a conv: the positions whose tap lands inside the image), shaped to
    broadcast against ``dw``. From exact sums of the codes: ``s·Σq + count·z``."""
    if spec.kind == "matmul":
        codes = dyq.codes
        sums = _code_sums(codes, -2, kernel).unsqueeze(-2) * dyq.scale  # (per sample where scale is)
        return sums if dyq.zero is None else sums + codes.shape[-2] * dyq.zero
    return _gradient_taps(spec, _gradient_values(spec, dyq, kernel), x_shape, w_shape)


def _gradient_values(spec: SiteSpec, dyq: IntCodes, kernel=None) -> torch.Tensor:
    """The sum over samples (a linear: over rows) of ``dy``'s values, ``s·Σq + count·z`` from
    exact code sums: ``(OC, *out_spatial)`` for a conv, ``(N,)`` for a linear."""
    codes = dyq.codes
    if spec.kind == "linear":
        codes = codes.reshape(-1, codes.shape[-1])
    return _code_sums(codes, 0, kernel) * dyq.scale.reshape(-1) + codes.shape[0] * _zero(dyq)


def _gradient_taps(spec: SiteSpec, values: torch.Tensor, x_shape, w_shape) -> torch.Tensor:
    """:func:`_gradient_sums` of a conv or linear from :func:`_gradient_values` (or any weighted
    sum of them over groups of samples), in ``values``' dtype."""
    if spec.kind == "linear":
        return values.unsqueeze(-1)
    sums = _tap_sums(spec, values, x_shape[2:], values.shape[1:], w_shape, image=False)  # (OC, *kernel)
    return sums.unsqueeze(1)


def _zero(q: IntCodes) -> torch.Tensor:
    return q.zero.reshape(-1) if q.zero is not None else q.scale.new_zeros(1)


def _out_sizes(spec: SiteSpec, size, w_shape) -> list[int]:
    """Output spatial sizes of a conv on input spatial sizes ``size``."""
    pad, ks = spec.gemm_padding(w_shape), w_shape[2:]
    return [
        (size[d] + 2 * pad[d] - spec.dilation[d] * (ks[d] - 1) - 1) // spec.stride[d] + 1
        for d in range(spec.conv_dims)
    ]


def _channel_sums(codes: torch.Tensor, channel_dim: int, kernel=None) -> torch.Tensor:
    """Exact sums of integer codes over every dim but ``channel_dim`` (the bias gradient, the
    sign-flip terms), as int64."""
    dims = [d for d in range(codes.dim()) if d != channel_dim % codes.dim()]
    return _exact_sums(codes, dims, torch.float64, kernel).long()
