"""The terms an integer GEMM adds to its exact product when its operands have zero points
(``sbm``): row sums of one operand's codes, sums of the other's values, and for convs their
window, tap and border forms (docs/contract.md, "Integer lowering"). Exact integer sums are
taken as fp32 (exact below 2**24)."""

from __future__ import annotations

import itertools

import torch

from ..ops.spec import CONV_FNS, SiteSpec
from .codes import IntCodes, _dense_perm

def _out_channel(spec: SiteSpec, v: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-output-channel vector (or one value) shaped to broadcast against an output of
    ``dims`` dims (channels at dim 1 for a conv, last otherwise)."""
    v = v.reshape(-1)
    if spec.kind == "conv":
        return v.reshape(1, -1, *([1] * (dims - 2)))
    return v


def _code_sums(codes: torch.Tensor, dim) -> torch.Tensor:
    """Exact sums of integer codes along ``dim``, as fp32 (exact below 2**24)."""
    if dim == 0:
        return _leading_sums(codes)
    return codes.sum(dim, dtype=torch.int64).float()


def _leading_sums(codes: torch.Tensor) -> torch.Tensor:
    """Exact sums of integer codes over dim 0 (the batch), as fp32, ``codes.shape[1:]``: read in
    memory order as an ``(N, rest)`` matrix of floats (an fp32 copy and a vectorized column sum:
    a twentieth of the time of torch's integer reduction over a leading dim of bytes)."""
    perm = _dense_perm(codes)
    if perm is None or perm[0] != 0 or codes.shape[0] * 2 ** 16 >= 2 ** 24 \
            or codes.element_size() > 1:
        return codes.sum(0, dtype=torch.int64).float()
    rows = codes.permute(*perm).reshape(codes.shape[0], -1).float().sum(0)
    inner = [codes.shape[p] for p in perm[1:]]
    inverse = sorted(range(len(perm) - 1), key=lambda i: perm[1:][i])
    return rows.view(inner).permute(*inverse)


def _conv_shape_args(spec: SiteSpec, w_shape):
    return (list(spec.stride), list(spec.gemm_padding(w_shape)), list(spec.dilation), False,
            [0] * spec.conv_dims)


def _window_code_sums(spec: SiteSpec, xq: IntCodes, w_shape) -> torch.Tensor:
    """Per output row, the sum of the input codes it reads: ``Σ_k qx`` (a conv: over its window,
    per group, zero padding reading code 0), shaped to broadcast against the output."""
    if spec.kind == "linear":
        return _code_sums(xq.codes, -1).unsqueeze(-1)
    if spec.kind == "matmul":
        return _code_sums(xq.codes, -1).unsqueeze(-1)
    G, OC = spec.groups, w_shape[0]
    codes = xq.codes
    # the channel sums first (exact int32), then one box filter per group: a pass over the codes
    # instead of a C-channel convolution
    per_group = codes.reshape(codes.shape[0], G, -1, *codes.shape[2:]).sum(2, dtype=torch.int32)
    ones = torch.ones((G, 1, *w_shape[2:]), device=codes.device)
    sums = CONV_FNS[spec.conv_dims](per_group.float(), ones, None, spec.stride,
                                    spec.gemm_padding(w_shape), spec.dilation, G)
    return sums if G == 1 else sums.repeat_interleave(OC // G, dim=1)


def _value_sums(spec: SiteSpec, wq: IntCodes, x_shape, w_shape) -> torch.Tensor:
    """Per output column, the sum of the weight's (second operand's) values it reads: ``Σ_k w``
    (a conv: over the taps inside the image at each output position, the same for every
    sample), shaped to broadcast against the output."""
    w = wq.dequantize()
    if spec.kind == "linear":
        return w.sum(-1)
    if spec.kind == "matmul":
        return w.sum(-2, keepdim=True)
    ones = torch.ones((1, *x_shape[1:]), device=w.device)
    return CONV_FNS[spec.conv_dims](ones, w, None, spec.stride, spec.gemm_padding(w_shape),
                                    spec.dilation, spec.groups)


def _tap_sums(spec: SiteSpec, t: torch.Tensor, in_sp, out_sp, w_shape, image: bool
              ) -> torch.Tensor:
    """For every tap of a conv's kernel, the sum over the output positions ``o`` whose tap reads
    inside the image (input coordinate ``o·stride + tap·dilation - padding``): of the image ``t``
    ``(C, *in_sp)`` at those coordinates (``image``), or of the output map ``t`` ``(OC, *out_sp)``
    at those positions. Returns ``(len(t), *kernel)``: one strided slice sum per tap."""
    n, pad = spec.conv_dims, spec.gemm_padding(w_shape)
    out = t.new_zeros((t.shape[0], *w_shape[2:]))
    for tap in itertools.product(*(range(k) for k in w_shape[2:])):
        index = [slice(None)]
        for d in range(n):
            first, st = tap[d] * spec.dilation[d] - pad[d], spec.stride[d]
            lo = max(0, -(first // st))                       # ceil(-first / st)
            hi = min(out_sp[d] - 1, (in_sp[d] - 1 - first) // st)
            if hi < lo:
                index = None
                break
            index.append(slice(first + lo * st, first + hi * st + 1, st) if image
                         else slice(lo, hi + 1))
        if index is not None:
            out[(slice(None), *tap)] = t[tuple(index)].sum(list(range(1, n + 1)))
    return out


def _input_code_sums(spec: SiteSpec, xq: IntCodes, x_shape, w_shape) -> torch.Tensor:
    """Per weight-gradient entry, the sum over output positions of the input codes it pairs
    with: ``Σ_m qx[m, k]`` (a conv: per tap, zero padding reading code 0), shaped to broadcast
    against ``dw``."""
    codes = xq.codes
    if spec.kind == "linear":
        return _code_sums(codes.reshape(-1, x_shape[-1]), 0)
    if spec.kind == "matmul":
        return _code_sums(codes, -2).unsqueeze(-1)
    G, Cg = spec.groups, w_shape[1]
    out_sp = _out_sizes(spec, x_shape[2:], w_shape)
    # every sample pairs with the same taps: the batch sum first (exact), then one image
    sums = _tap_sums(spec, _leading_sums(codes), x_shape[2:], out_sp, w_shape,
                     image=True)                                # (C, *kernel)
    if G == 1:
        return sums.unsqueeze(0)
    return sums.reshape(G, Cg, *w_shape[2:]).repeat_interleave(w_shape[0] // G, dim=0)


def _gradient_sums(spec: SiteSpec, dyq: IntCodes, x_shape, w_shape) -> torch.Tensor:
    """Per weight-gradient entry, the sum of ``dy``'s values over the output positions it pairs
    with: ``Σ_m dy[m, n]`` (a conv: the positions whose tap lands inside the image), shaped to
    broadcast against ``dw``. From exact sums of the codes: ``s·Σq + count·z``."""
    codes = dyq.codes
    if spec.kind == "linear":
        flat = codes.reshape(-1, codes.shape[-1])
        return (_code_sums(flat, 0) * dyq.scale.reshape(-1) + flat.shape[0] * _zero(dyq)) \
            .unsqueeze(-1)
    if spec.kind == "matmul":
        sums = _code_sums(codes, -2).unsqueeze(-2) * dyq.scale  # (per sample where scale is)
        return sums if dyq.zero is None else sums + codes.shape[-2] * dyq.zero
    out_sp = codes.shape[2:]
    values = _code_sums(codes, 0) * dyq.scale.reshape(-1) + codes.shape[0] * _zero(dyq)
    sums = _tap_sums(spec, values, x_shape[2:], out_sp, w_shape, image=False)  # (OC, *kernel)
    return sums.unsqueeze(1)


def _zero(q: IntCodes) -> torch.Tensor:
    return q.zero.reshape(-1) if q.zero is not None else q.scale.new_zeros(1)


def _out_sizes(spec: SiteSpec, size, w_shape) -> list[int]:
    """Output spatial sizes of a conv on input spatial sizes ``size``."""
    pad, ks = spec.gemm_padding(w_shape), w_shape[2:]
    return [(size[d] + 2 * pad[d] - spec.dilation[d] * (ks[d] - 1) - 1) // spec.stride[d] + 1
            for d in range(spec.conv_dims)]


def _channel_sums(codes: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Exact sums of int8 codes over every dim but ``channel_dim`` (the bias gradient). Codes with
    32 or more channels innermost in memory are summed as rows of a ``(rows, C)`` matrix in int32
    (exact below 2**31 / 128 rows), many times faster than torch's int64 reduction on a wide
    matrix; with 16 channels the int64 reduction is the faster one (``bench/packing.py``)."""
    C = codes.shape[channel_dim]
    last = codes.movedim(channel_dim, -1)
    rows = codes.numel() // max(C, 1)
    if C >= 32 and last.is_contiguous() and rows * 128 < 2**31 and codes.element_size() == 1:
        return last.reshape(rows, C).sum(0, dtype=torch.int32)
    return codes.sum([d for d in range(codes.dim()) if d != channel_dim], dtype=torch.int64)
