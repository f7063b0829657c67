"""Codes of CUDA tensors from the TVM-generated quantization kernels
(:mod:`..kernels.cuda_quantize`, launched by :mod:`..runtime.cuda_quant`): range, grid and codes
on the device, the reference quantizer's codes bit for bit, and no host read of the data.

The grid stays data (:class:`.codes.IntCodes` with ``device_grid``): codes are int8 (int32 for
gradients over 8 bits), an unsigned grid's stored minus its middle ``2**(bits-1)`` (``offset``).
Where the host knows the signedness (weights and gradients: signed; ``sbm``: unsigned) the offset
is a Python int; where the data decides it (a symmetric activation's ``signed=None``: the
reference's ``bool((lo < 0).any())``) or the bits are per sample, it is a device tensor
broadcasting like ``scale``, which the GEMMs correct exactly (:func:`..runtime.cuda_driver.offset_terms`)
or fold into a zero point (:func:`.codes.centered`).

Every function takes ``launch``, a ``Launcher`` (the device's, or in tests an emulator's).
"""

from __future__ import annotations

import torch

from ...ops.quantizers import noise_seed
from .codes import IntCodes, _dense_perm

MAX_BYTE_BITS = 8  # wider grids store int32 codes


_BITS: dict = {}


def _bits(value: int, device: torch.device) -> torch.Tensor:
    """The int32 device tensor of a bit width (made once per value and device: a host-to-device
    copy, kept out of the step)."""
    key = (value, str(device))
    t = _BITS.get(key)
    if t is None:
        t = _BITS[key] = torch.tensor([value], dtype=torch.int32, device=device)
    return t


def _layout(x: torch.Tensor, first_dim: bool):
    """``(xd, perm)``: ``x`` as a contiguous view in its memory order (``perm`` the dim order),
    a contiguous copy where it is not dense (or, with ``first_dim``, where dim 0 is not outermost)."""
    perm = _dense_perm(x)
    if perm is None or (first_dim and perm[0] != 0):
        x, perm = x.contiguous(), list(range(x.dim()))
    return x.permute(*perm), perm


def minmax_of(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A given range (a running range, a routed site's shared one) as the kernels' ``(1, 2)``."""
    return torch.stack([lo.reshape(()).float(), hi.reshape(()).float()]).reshape(1, 2)


def device_codes(
    x: torch.Tensor,
    launch,
    bits: int,
    scheme: str,
    signed: bool | None,
    *,
    minmax: torch.Tensor | None = None,
    per_row: bool = False,
    stochastic: bool = False,
    noise: str = "counter",
    out: torch.Tensor | None = None,
) -> IntCodes:
    """``x``'s codes on the grid :func:`~fraccompile.ops.quantizers.qparams_from_range` gives for
    its range (per tensor, or ``per_row``: per slice of dim 0, a weight's output channels; or the
    given ``minmax`` ``(1, 2)``), ``bits``, ``scheme`` and ``signed`` (None: decided on the device),
    rounded to nearest or (``stochastic``) with the reference's ``noise`` (``torch``: the same
    ``torch.rand`` draw; ``counter``: the same seed). ``out``: a padded ``(Rp, Kp)`` int8 operand
    of the GEMM to write ``x`` viewed ``(-1, x.shape[-1])`` into (a contiguous ``x``)."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    xd, perm = _layout(x, per_row)
    rows = x.shape[0] if per_row else 1
    if minmax is None:
        minmax = _tensor_minmax(xd, rows, launch)
    grid = _grids(minmax, _bits(bits, x.device), scheme, signed, launch)
    wide = bits > MAX_BYTE_BITS
    shape = (rows,) + (1,) * (x.dim() - 1) if per_row else ()
    codes = _quantize(xd, perm, grid, launch, stochastic, noise, wide, rows, out, x.shape)
    q = _int_codes(codes, grid, shape, scheme, signed, bits)
    q.operand = None if out is None else out.unsqueeze(0)
    return q


def device_row_codes(
    x: torch.Tensor,
    row_bits: torch.Tensor,
    launch,
    scheme: str,
    signed: bool | None,
    minmax: torch.Tensor,
    *,
    widest: int,
    stochastic: bool = False,
    out: torch.Tensor | None = None,
) -> IntCodes:
    """A routed site's per-sample codes (:func:`~fraccompile.ops.quantizers.quantize_rows`): sample
    ``i`` on the grid of ``row_bits[i]`` bits over the shared range ``minmax``; ``widest``: the
    largest candidate (int32 codes above 8 bits). Rounding to nearest reads nothing on the host.
    Stochastic rounding takes counter noise with the reference's seeds: one drawn per precision
    present, in ascending order, so the host reads which precisions are present (one read: the
    generator's draws depend on it). ``out``: as for :func:`device_codes` (rounding to nearest)."""
    x = x.detach().float()
    xd, perm = _layout(x, True)
    n = x.shape[0]
    bits = row_bits.to(torch.int32)
    grid = _grids(minmax, bits, scheme, signed, launch)
    rank = seed = None
    if stochastic:  # rank of each sample among those of its precision, and its group's seed
        same = bits.unsqueeze(0) == bits.unsqueeze(1)
        rank = (same & torch.ones_like(same).tril(-1)).sum(1, dtype=torch.int32)
        seed = torch.zeros(n, dtype=torch.int32, device=x.device)
        for b in torch.unique(bits).tolist():  # (the one host read)
            seed = torch.where(bits == b, noise_seed(device=x.device), seed)
    shape = (n,) + (1,) * (x.dim() - 1)
    if out is not None and (stochastic or perm != list(range(x.dim()))):
        out = None  # (the padded operand takes the row-major (rows, K) view of rounding to nearest)
    wide = widest > MAX_BYTE_BITS
    codes = _quantize(xd, perm, grid, launch, stochastic, "counter", wide, n, out, x.shape, rank, seed)
    q = _int_codes(codes, grid, shape, scheme, signed, None)
    q.operand = None if out is None else out.unsqueeze(0)
    return q


def _tensor_minmax(xd: torch.Tensor, rows: int, launch) -> torch.Tensor:
    from ..kernels.cuda_quantize import tensor_minmax

    return tensor_minmax(xd, rows, launch)


def _grids(minmax, bits, scheme, signed, launch) -> torch.Tensor:
    from ..kernels.cuda_quantize import grids

    return grids(minmax, bits, scheme, signed, launch)


def _quantize(xd, perm, grid, launch, stochastic, noise, wide, rows, out, shape, rank=None, seed=None):
    """The codes of ``xd`` (``x`` in memory order) on ``grid``, back in ``x``'s shape and layout."""
    from ..kernels.cuda_quantize import quantize_codes

    counter = stochastic and noise == "counter"
    kwargs = {"out_dtype": "int32" if wide else "int8"}
    if counter:  # (R, S, C) in memory order: the logical index of counter noise
        if perm == list(range(len(perm))):
            view = xd.reshape(-1, 1, xd.shape[-1] if xd.dim() else 1)
        else:  # channels-last (N, spatial, C)
            view = xd.reshape(xd.shape[0], -1, xd.shape[-1])
        if rank is not None:
            kwargs.update(rounding="counter_rows", rank=rank, seed=seed)
        else:
            kwargs.update(rounding="counter", seed=noise_seed(device=xd.device))
    else:
        # (rows, K) for a GEMM operand (``out``) or one grid; else a row per grid
        rowwise = out is None and rows > 1
        view = xd.reshape(rows, -1) if rowwise else xd.reshape(-1, xd.shape[-1] if xd.dim() else 1)
        if stochastic:  # the reference's torch.rand draw, in logical order, laid out like x
            u = torch.rand(shape, device=xd.device, dtype=torch.float32).permute(*perm)
            kwargs.update(rounding="torch", u=u.reshape(view.shape))
    codes = quantize_codes(view.contiguous(), grid, launch, out=out, **kwargs)
    if out is not None:
        codes = codes[: view.shape[0], : view.shape[1]]
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return codes.view(xd.shape).permute(*inverse)


def _int_codes(codes, grid, shape, scheme, signed, bits) -> IntCodes:
    """:class:`IntCodes` over the device grid: ``scale``, ``zero`` (sbm), ``qmax`` and ``offset``
    shaped ``shape`` (``()`` per tensor); the offset a Python int where the host knows it."""

    def field(i: int) -> torch.Tensor:
        return grid[:, i].reshape(shape)

    if scheme == "symmetric" and signed:
        offset = 0
    elif bits is not None and (scheme == "sbm" or signed is not None):
        offset = 1 << (bits - 1)
    else:
        offset = field(4)
    zero = field(1) if scheme == "sbm" else None
    return IntCodes(codes, field(0), True, zero, field(3), offset, device_grid=True)


# -- a site call's codes on the GPU ----------------------------------------------------------------
_TABLES: dict = {}


def _row_bits(d, which: str, device: torch.device) -> torch.Tensor:
    """``d.row_bits(which)`` without its host-to-device copy per call (which waits for the
    stream): the candidates' bits as a device table made once, indexed by the device choice."""
    values = tuple(getattr(d, which))
    key = (values, str(device))
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = torch.tensor(values, dtype=torch.int32, device=device)
    return table[d.choice]


def site_codes(backend, call, x: torch.Tensor, w: torch.Tensor):
    """``(xq, wq, wq_eb, x)`` of :meth:`.tvm_backend.TVMBackend.run_site` for CUDA tensors: the
    operands' codes from the quantization kernels (``wq_eb``, the per-input-channel weight of
    ``weight_scale="gemm"``, as rows of the transposed weight; per group of a grouped conv from
    torch ops), and ``x`` through
    the gate's probe for a routed site."""
    from ...ops.functions import GateProbe
    from ...ops.quantizers import input_channel_range, qparams_from_range
    from .codes import _to_codes

    spec, prec, scheme = call.spec, call.prec, call.scheme
    launch = backend.cuda_quant.launcher(x.device)
    d = call.rows
    minmax = minmax_of(*call.x_range) if call.x_range is not None else None
    out_x = out_w = None
    if spec.kind == "linear":  # the forward GEMM's operands, written in place
        out_x, out_w = _linear_operands(backend.cuda, x, w)
    if d is None:
        xq = device_codes(x, launch, prec.a, scheme, None, minmax=minmax, out=out_x)
    else:
        if minmax is None:
            minmax = _tensor_minmax(_layout(x.detach().float(), False)[0], 1, launch)
        bits = _row_bits(d, "a", x.device)
        xq = device_row_codes(x, bits, launch, scheme, None, minmax, widest=max(d.a), out=out_x)
    if spec.kind == "matmul":
        ymm = minmax_of(*call.y_range) if call.y_range is not None else None
        wq = device_codes(w, launch, prec.w, scheme, None, minmax=ymm)
    else:
        per_row = call.weight_scale != "tensor"
        wq = device_codes(w, launch, prec.w, scheme, True, per_row=per_row, out=out_w)
    wq_eb = None
    if call.weight_scale == "gemm" and spec.kind != "matmul":  # EB's own: per input channel
        if spec.groups == 1:  # the input channels as rows of the transposed weight
            q = device_codes(
                w.detach().transpose(0, 1).contiguous(), launch, prec.w, scheme, True, per_row=True
            )
            shape = (1, w.shape[1]) + (1,) * (w.dim() - 2)
            fields = [None if f is None else f.reshape(shape) for f in (q.scale, q.zero, q.qmax)]
            wq_eb = IntCodes(q.codes.transpose(0, 1), fields[0], True, fields[1], fields[2], q.offset, True)
        else:  # per group: torch ops (a signed grid: no host read either)
            elo, ehi = input_channel_range(w, spec.groups)
            qp = qparams_from_range(elo, ehi, prec.w, scheme, signed=True)
            wq_eb = _to_codes(w.detach(), qp, kernel=None, asymmetric=scheme == "sbm")
            wq_eb.device_grid = True
    if d is not None:  # the gate's gradient, as the reference's GateProbe gives it

        def quantize_at(t: torch.Tensor, k: int) -> torch.Tensor:
            return device_codes(t, launch, k, scheme, None, minmax=minmax).dequantize()

        x = GateProbe.apply(x, d.onehot, x.detach(), quantize_at, d.a, xq.dequantize, None)
    return xq, wq, wq_eb, x


def _linear_operands(gemm, x: torch.Tensor, w: torch.Tensor):
    """Empty int8 buffers ``(Mp, Kp)`` and ``(Np, Kp)``: the GEMM's padded operands of a linear
    forward ``x (..., K) @ w (N, K)ᵀ`` (:meth:`..runtime.cuda_driver.CudaGemm.padded_shape`), for
    the quantize kernel to write the codes and the padding's zeros into; ``(None, None)`` where
    the GEMM would take them otherwise (a reduction split into chunks, a non-contiguous ``x``)."""
    K, N = x.shape[-1], w.shape[0]
    M = x.numel() // max(K, 1)
    if x.dim() < 2 or not x.is_contiguous() or not w.is_contiguous() or not 0 < K <= gemm.max_k or M == 0:
        return None, None
    shape = gemm.padded_shape(1, M, N, K, gemm.kind_for(x.device))
    if max(shape.m, shape.n) * shape.k >= 2**31:
        return None, None
    return (
        torch.empty((shape.m, shape.k), dtype=torch.int8, device=x.device),
        torch.empty((shape.n, shape.k), dtype=torch.int8, device=x.device),
    )


def gradient_codes(backend, call, dy: torch.Tensor) -> IntCodes:
    """``dy``'s codes for CUDA tensors: the reference's ``quantize_gradient`` (per-tensor range,
    signed grid, stochastic rounding with ``call.rounding_noise``), per sample for a routed site
    (:func:`device_row_codes`; with ``torch`` noise the per-group draws need the groups' sizes
    on the host: that case runs the torch quantizer, :func:`.codes._row_codes`)."""
    from ...ops.quantizers import qparams_from_range, tensor_range
    from .codes import _row_codes

    launch = backend.cuda_quant.launcher(dy.device)
    d = call.rows
    if d is None:
        return device_codes(
            dy, launch, call.prec.g, call.scheme, True, stochastic=True, noise=call.rounding_noise
        )
    if call.rounding_noise != "counter":
        lo, hi = tensor_range(dy)
        return _row_codes(
            dy,
            d.row_bits("g"),
            lambda b: qparams_from_range(lo, hi, b, call.scheme, signed=True),
            stochastic=True,
            noise=call.rounding_noise,
            asymmetric=call.scheme == "sbm",
        )
    minmax = _tensor_minmax(_layout(dy.detach().float(), False)[0], 1, launch)
    return device_row_codes(
        dy, _row_bits(d, "g", dy.device), launch, call.scheme, True, minmax, widest=max(d.g), stochastic=True
    )
