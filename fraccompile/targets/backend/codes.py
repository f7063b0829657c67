"""Integer codes of a tensor and how they are made: :class:`IntCodes` (codes, scale, zero point,
code offset), the fused quantizer call (:func:`_to_codes`, per-sample grids :func:`_row_codes`),
and the views of codes the integer GEMMs take (:func:`split_codes` into 8-bit halves,
:func:`centered` asymmetric codes, :func:`signed_b`). The quantization contract is
docs/contract.md; the kernels are :mod:`..kernels.quantize`."""

from __future__ import annotations

import functools

import torch

from ...ops.quantizers import noise_seed, quantize_to_int, uniform_noise
from ..runtime import threads
from ..runtime.library import JitKernels, KernelRef

# On TVM's thread pool (see :mod:`..runtime.threads`) the memory-bound kernels (quantize, dequantize,
# packing) run on the calling thread below this many bytes moved: a parallel launch after torch ops
# waits for a TVM worker whose core a spinning OpenMP thread holds (``bench/step_breakdown.py``
# measures it). On torch's OpenMP threads (the default) the hand-over costs little and they always
# run parallel.
PARALLEL_MIN_BYTES = 64 << 20


def _serial(nbytes: int) -> bool:
    return nbytes < PARALLEL_MIN_BYTES and not threads.on_openmp()


class IntCodes:
    """Integer codes of a tensor with their grid: ``value = codes * scale + zero``.

    ``scale`` broadcasts against the tensor: one value, one per output channel (a weight, dim 0),
    or one per sample (dim 0 of an activation or gradient of a DFQ-routed site). ``zero`` is None
    (symmetric codes) or broadcasts likewise (``sbm``: the range's minimum). Codes are uint8/int8,
    or int32 for gradients wider than 8 bits (computed as two 8-bit halves, :func:`split_codes`).

    ``device_grid``: the grid came from the GPU quantizer (:mod:`.device_codes`) and stays data:
    ``offset`` (and ``qmax``) may be tensors broadcasting like ``scale``, and nothing here reads
    their values on the host (:attr:`has_zero` is True whenever there is a zero point).
    ``operand``: None, or the GPU GEMM's padded operand ``(1, Rp, Kp)`` int8 the codes are a view
    of (written by the quantize kernel with zeros around them), which the GEMM takes as it is.
    """

    __slots__ = ("codes", "scale", "signed", "zero", "qmax", "offset", "device_grid", "operand", "_has_zero")

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        signed: bool,
        zero: torch.Tensor | None = None,
        qmax=None,
        offset: int | torch.Tensor = 0,
        device_grid: bool = False,
        operand: torch.Tensor | None = None,
    ):
        self.codes, self.scale, self.signed, self.zero = codes, scale, signed, zero
        self.qmax = qmax  # the grid's top code (a float, or per sample like scale)
        # codes stored minus ``offset`` (the quantize kernel centers sbm codes into int8): the
        # grid's code is ``codes + offset``
        self.offset = offset
        self.device_grid = device_grid
        self.operand = operand
        self._has_zero = None  # (zero, :attr:`has_zero`): read once per zero point (a host sync)

    @property
    def has_offset(self) -> bool:
        """Whether the codes are stored minus an offset (a device offset counts, whatever its
        value)."""
        return isinstance(self.offset, torch.Tensor) or bool(self.offset)

    def grid_codes(self) -> torch.Tensor:
        """The grid's codes ``codes + offset`` as fp32 (exact)."""
        return self.codes.float() + self.offset if self.has_offset else self.codes.float()

    def dequantize(self) -> torch.Tensor:
        # the reference's fake-quantized value: addcmul(zero, q, scale) in fp32 (the integer
        # operand is promoted to fp32 inside the one multiply: no fp32 copy of the codes)
        if self.zero is None:
            return torch.mul(self.grid_codes() if self.has_offset else self.codes, self.scale)
        return torch.addcmul(self.zero, self.grid_codes(), self.scale)

    @property
    def per_row(self) -> bool:
        """Whether ``scale`` has one value per row of dim 0 (not one for the whole tensor)."""
        return self.scale.numel() != 1

    @property
    def has_zero(self) -> bool:
        if self.zero is None:
            return False
        if self._has_zero is None or self._has_zero[0] is not self.zero:
            self._has_zero = (self.zero, self.device_grid or bool((self.zero != 0).any()))
        return self._has_zero[1]

    @property
    def wide(self) -> bool:
        return self.codes.element_size() > 1


def _take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[rows]`` (samples of dim 0) in ``t``'s memory layout (channels-last stays so: the
    kernels read it without another copy); all of ``t`` when ``rows`` is every sample."""
    if len(rows) == t.shape[0]:
        return t
    perm = _dense_perm(t)
    if perm is None or perm[0] != 0:
        return t[rows]
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return t.permute(*perm).index_select(0, rows).permute(*inverse)


def _row_value(v, rows: torch.Tensor):
    """A per-sample value's entry for the group ``rows`` (whose samples share it)."""
    return v.reshape(-1)[rows[0]].item() if isinstance(v, torch.Tensor) else v


def _group_codes(q: IntCodes, rows: torch.Tensor, scale: torch.Tensor) -> IntCodes:
    """The samples ``rows`` of per-sample codes ``q``, which share the one ``scale``."""
    if q.device_grid:  # the grid's fields stay on the device: the group's entries as tensors
        first = rows[:1]
        offset = q.offset.reshape(-1)[first].reshape(()) if isinstance(q.offset, torch.Tensor) else q.offset
        zero = q.zero.reshape(-1)[first].reshape(()) if q.zero is not None and q.zero.numel() > 1 else q.zero
        qmax = q.qmax.reshape(-1)[first].reshape(()) if isinstance(q.qmax, torch.Tensor) else q.qmax
        return IntCodes(_take_rows(q.codes, rows), scale.reshape(1), q.signed, zero, qmax, offset, True)
    return IntCodes(
        _take_rows(q.codes, rows), scale.reshape(1), q.signed, q.zero, _row_value(q.qmax, rows), q.offset
    )


def _scalar_scale(q: IntCodes) -> torch.Tensor:
    """The part of ``q``'s scale that is one value (1 where it is per row)."""
    return q.scale.reshape(1) if not q.per_row else q.scale.new_ones(1)


def split_codes(q: IntCodes) -> list[IntCodes]:
    """``q``'s codes as 8-bit parts, each with the scale that factors out of an integer GEMM (per
    tensor; 1 for per-sample scales, which the caller applies to the result) and no zero point
    (the caller adds its terms). 8-bit codes are one part; wider ones two:
    ``hi = codes >> 8`` (int8, or uint8 for unsigned codes) with ``256·scale`` and
    ``lo = codes & 255`` (uint8) with ``scale``. Every integer GEMM role is linear in this
    operand, so it runs once per part and the results add up exactly."""
    scale = _scalar_scale(q)
    if not q.wide:
        return [IntCodes(q.codes, scale, q.signed)]
    hi = q.codes.bitwise_right_shift(8).to(torch.int8 if q.signed else torch.uint8)
    lo = q.codes.bitwise_and(255).to(torch.uint8)
    return [IntCodes(hi, scale * 256.0, q.signed), IntCodes(lo, scale, False)]


def centered(q: IntCodes, keep_offset: bool = False) -> IntCodes:
    """Unsigned asymmetric codes moved to the middle of their grid, ``codes - m`` with
    ``m = (qmax + 1) / 2`` (per sample where the grid is) and the zero point ``zero + m·scale``:
    the same values up to fp32 rounding of the zero, but the integer product no longer carries a
    large offset that the zero point's term must cancel (which costs fp32 precision). Codes
    without a (non-zero) zero point are returned as they are.

    Codes of the GPU quantizer carry a device ``offset``: with ``keep_offset`` (a GEMM that
    corrects it exactly, :meth:`.gemm_runtime.IntegerGemms.gemm_f32`'s ``offsets``) symmetric
    ones are returned as they are; otherwise, and always with a zero point (``sbm``), the zero
    point takes the offset (``zero + offset·scale``, on the device)."""
    if isinstance(q.offset, torch.Tensor):
        if keep_offset and q.zero is None:
            return q
        shift = q.scale * q.offset
        zero = shift if q.zero is None else q.zero + shift
        return IntCodes(q.codes, q.scale, True, zero, q.qmax, 0, q.device_grid, q.operand)
    if q.offset:  # centered already (by the quantize kernel): the zero point takes the offset
        shift = q.scale * float(q.offset)
        zero = shift if q.zero is None else q.zero + shift
        return IntCodes(q.codes, q.scale, True, zero, q.qmax, 0, q.device_grid, q.operand)
    if q.signed or q.qmax is None or not q.has_zero:
        return q
    m = (torch.as_tensor(q.qmax, dtype=torch.float32) + 1) / 2
    zero = q.zero + m.to(q.scale.device) * q.scale
    if m.numel() == 1 and q.codes.dtype == torch.uint8:  # one int8 pass, never in place
        if int(m) == 128:
            return IntCodes(q.codes.bitwise_xor(128).view(torch.int8), q.scale, True, zero)
        return IntCodes(q.codes.view(torch.int8) - int(m), q.scale, True, zero)  # codes < 128
    wide = bool((m > 128).any())
    if not wide and q.codes.dtype == torch.uint8:  # per sample: one uint8 pass, c - m wraps to int8
        return IntCodes(
            torch.sub(q.codes, m.to(torch.uint8).to(q.codes.device)).view(torch.int8), q.scale, True, zero
        )
    codes = q.codes.to(torch.int32) - m.to(torch.int32).to(q.codes.device)
    return IntCodes(codes if wide else codes.to(torch.int8), q.scale, True, zero)


def signed_b(q: IntCodes) -> IntCodes:
    """Unsigned codes as int8 ``codes - 128`` with the zero point ``zero + 128·scale`` (the same
    values up to fp32 rounding of the zero): the operand the conv kernels take as B, which they
    do not sign-correct. Signed codes are returned as they are."""
    if q.signed or q.codes.dtype != torch.uint8:
        return q
    zero = q.scale * 128.0 if q.zero is None else q.zero + q.scale * 128.0
    return IntCodes(q.codes.bitwise_xor(128).view(torch.int8), q.scale, True, zero)


def _code_dtype(qp) -> torch.dtype:
    if qp.qmin < 0:
        return torch.int8 if qp.qmin >= -128 else torch.int32
    return torch.uint8 if qp.qmax <= 255 else torch.int32


def _dense_perm(x: torch.Tensor) -> list[int] | None:
    """A dim order in which ``x`` is contiguous (identity, or channels-last), else None."""
    identity = list(range(x.dim()))
    if x.is_contiguous():
        return identity
    if x.dim() >= 3:
        last = [0, *range(2, x.dim()), 1]
        if x.permute(*last).is_contiguous():
            return last
    return None


_JIT: JitKernels | None = None


def _jit_kernel(ref: KernelRef):
    """The process's default kernel provider (builds on first use)."""
    global _JIT
    if _JIT is None:
        _JIT = JitKernels()
    return _JIT.get(ref)


def _to_codes(
    x: torch.Tensor,
    qp,
    *,
    stochastic: bool = False,
    noise: str = "torch",
    kernel=_jit_kernel,
    asymmetric: bool = False,
    center: bool = True,
) -> IntCodes:
    """``x``'s integer codes on the grid ``qp`` — the reference quantizer's codes exactly, from one
    fused TVM kernel when the scale is per tensor (activations, gradients) and the codes are 8-bit,
    else torch. ``kernel`` maps a :class:`KernelRef` to its compiled function (None: torch, as for
    GPU tensors). Stochastic rounding takes the reference's noise: ``torch.rand`` drawn here, or
    counter noise computed inside the kernel from a seed drawn here. ``asymmetric``: ``qp`` has a
    float zero point (``sbm``), kept with the codes; the kernel subtracts it first, as the
    reference does, and stores a non-zero one's codes centered into int8 (``offset``) unless
    ``center`` is False."""
    signed = qp.qmin < 0
    dtype = _code_dtype(qp)
    zero = qp.zero if asymmetric else None
    axis = None if kernel is None or stochastic else _grid_axis(x, qp, dtype)
    if axis is not None:
        return _grid_codes(x, qp, dtype, zero, kernel, axis)
    fused = kernel is not None and x.dtype == torch.float32 and qp.scale.numel() == 1 and dtype.itemsize == 1
    perm = _dense_perm(x) if fused else None
    if fused and perm is None:  # a strided view (e.g. a slice of q/k/v): one copy, then one pass
        x = x.contiguous()
        perm = list(range(x.dim()))
    if perm is None:
        q = quantize_to_int(x, qp, stochastic=stochastic, noise=noise)
        return IntCodes(q.to(dtype), qp.scale, signed, zero, qp.qmax)
    # sbm codes with a zero point come out centered (their grid's middle subtracted, int8)
    has_zero = zero is not None and bool(zero != 0)  # (one host read)
    offset = int(qp.qmax + 1) // 2 if center and has_zero and not signed else 0
    if offset:
        dtype = torch.int8
    xd = x.permute(*perm)
    counter = stochastic and noise == "counter"
    if counter and x.numel() >= 2**31:
        raise ValueError(f"counter noise indexes at most 2**31 - 1 elements, not {x.numel()}")
    if counter:  # (N, S, C) in memory order, logical index n·C·S + c·S + s
        if perm == list(range(x.dim())):
            last = x.shape[-1] if x.dim() else 1
            flat = xd.reshape(-1, 1, last)
        else:
            flat = xd.reshape(x.shape[0], -1, x.shape[1])
    else:
        flat = xd.reshape(-1)
    bounds = _bounds(qp.qmin, qp.qmax)
    if has_zero:
        bounds = torch.cat([bounds[:2], zero.reshape(1).float(), bounds.new_full((1,), offset)])
    args = [flat, qp.scale.reshape(1).float(), bounds]
    if counter:
        args.append(noise_seed())
    elif stochastic:  # the reference's draws, in logical order, laid out like x
        args.append(uniform_noise(x.shape, noise).permute(*perm).reshape(-1))
    codes = torch.empty(flat.shape, dtype=dtype)
    ref = KernelRef.quantize(
        str(dtype).removeprefix("torch."),
        stochastic,
        noise,
        serial=_serial(x.numel() * (9 if stochastic and not counter else 5)),
    )
    kernel(ref)(*args, codes)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return IntCodes(
        codes.view(xd.shape).permute(*inverse), qp.scale, signed or bool(offset), zero, qp.qmax, offset
    )


def _grid_axis(x: torch.Tensor, qp, dtype: torch.dtype) -> int | None:
    """The axis along which ``qp`` is one grid per slice of a contiguous fp32 ``x`` with 8-bit
    codes, which :func:`_grid_codes` quantizes in one pass: 0, one per slice of dim 0 (a weight's
    per-output-channel grid), or 1, one per column of a 2-D ``x`` (a linear weight's
    per-input-channel grid, ``weight_scale="gemm"``'s error backprop); else None."""
    if x.dtype != torch.float32 or dtype.itemsize != 1 or not x.is_contiguous() or x.numel() >= 2**31:
        return None
    for axis in (0, 1) if x.dim() == 2 else (0,):
        n = x.shape[axis] if x.dim() > axis else 0
        grid = tuple(n if d == axis else 1 for d in range(x.dim()))
        if n > 1 and tuple(qp.scale.shape) == grid and qp.zero.numel() in (1, n):
            return axis
    return None


def _grid_codes(x: torch.Tensor, qp, dtype: torch.dtype, zero, kernel, axis: int) -> IntCodes:
    """Round-to-nearest codes of ``x`` with one grid per slice along ``axis`` (:func:`_grid_axis`),
    in one pass of the per-row quantize kernel (``quantize_rows``, a row per output channel) or
    the per-column one (``quantize_cols``; :func:`..kernels.quantize.rows_definition`,
    :func:`~..kernels.quantize.cols_definition`): the reference's ``clamp(round((x - zero) /
    scale), qmin, qmax)`` element for element, so the codes are
    :func:`~fraccompile.ops.quantizers.quantize_to_int`'s (torch's form takes five passes over fp32
    temporaries). The codes are not centered, as torch's path leaves them."""
    n = x.shape[axis]
    flat = x.reshape(n, -1) if axis == 0 else x
    scale = qp.scale.reshape(n).float()
    bounds = [scale.new_full((n,), float(b)) for b in (qp.qmin, qp.qmax)]
    # (scale, zero, qmin, qmax) per grid: (n, 4) rows, or (4, n) read as vectors along a row
    grids = torch.stack([scale, qp.zero.reshape(-1).float().expand(n), *bounds], 1 - axis)
    codes = torch.empty(x.shape, dtype=dtype)
    kind = "quantize_rows" if axis == 0 else "quantize_cols"
    ref = KernelRef(kind, (str(dtype).removeprefix("torch."),), serial=_serial(x.numel() * 5))
    kernel(ref)(flat, grids, codes.view(flat.shape))
    return IntCodes(codes, qp.scale, qp.qmin < 0, zero, qp.qmax)


def _host_groups(keys: list, device) -> list[tuple]:
    """The distinct ``keys`` (read on the host once, a batch's worth) in ascending order, each with
    the ascending indices where it occurs, an int64 tensor on ``device``: what ``torch.unique`` and
    a ``nonzero`` per key give, without a host sync per key."""
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    return [(key, torch.tensor(members[key], device=device)) for key in sorted(members)]


def _row_codes(
    x: torch.Tensor,
    row_bits: torch.Tensor,
    qp_for_bits,
    *,
    stochastic: bool = False,
    noise: str = "torch",
    asymmetric: bool = False,
    kernel=None,
) -> IntCodes:
    """Codes of ``x`` with sample ``i`` (dim 0) on the grid ``qp_for_bits(row_bits[i])`` (one
    shared range, so only the step differs): the reference's
    :func:`~fraccompile.ops.quantizers.quantize_rows`, group by group in the same order (the same
    random draws), with a per-sample scale ``(N, 1, ...)``; each group through the fused
    quantizer (``kernel``, see :func:`_to_codes`) when the codes are 8-bit. Rounding to nearest
    (the activations) draws nothing: one kernel pass with a grid per sample."""
    groups = _host_groups([int(b) for b in row_bits.reshape(-1).tolist()], row_bits.device)
    grids = {b: qp_for_bits(b) for b, _ in groups}
    widest = grids[max(grids)]
    dtype = _code_dtype(widest)
    perm = _dense_perm(x)
    if (
        kernel is not None
        and (not stochastic or noise == "counter")
        and x.dtype == torch.float32
        and perm is not None
        and perm[0] == 0
        and x.numel() < 2**31
        and all(qp.scale.numel() == 1 for qp in grids.values())
    ):
        return _row_codes_fused(x, row_bits, groups, grids, perm, dtype, asymmetric, kernel, stochastic)
    codes = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device)
    qmax = torch.empty_like(scale)
    for b, rows in groups:
        qp = grids[b]
        if kernel is not None and dtype.itemsize == 1:
            codes[rows] = _to_codes(
                x[rows],
                qp,
                stochastic=stochastic,
                noise=noise,
                kernel=kernel,
                asymmetric=asymmetric,
                center=False,
            ).codes
        else:
            codes[rows] = quantize_to_int(x[rows], qp, stochastic=stochastic, noise=noise).to(dtype)
        scale[rows] = qp.scale.reshape(1).float()
        qmax[rows] = qp.qmax
    return IntCodes(codes, scale, widest.qmin < 0, widest.zero if asymmetric else None, qmax)


def _row_codes_fused(
    x, row_bits, groups, grids: dict, perm, dtype, asymmetric: bool, kernel, stochastic: bool
) -> IntCodes:
    """:func:`_row_codes` as one kernel pass with a grid per sample
    (:func:`..kernels.quantize.rows_definition`, or with counter noise
    :func:`..kernels.quantize.rows_counter_definition`, each group's seed drawn in the reference's
    order): the same codes, no gather or scatter per group."""
    bits = sorted(grids)
    table = torch.stack(
        [
            torch.stack(
                [
                    grids[b].scale.reshape(()).float(),
                    grids[b].zero.reshape(()).float(),
                    torch.tensor(float(grids[b].qmin)),
                    torch.tensor(float(grids[b].qmax)),
                ]
            )
            for b in bits
        ]
    )
    rows = table[torch.searchsorted(torch.tensor(bits), row_bits.cpu())].contiguous()
    xd = x.permute(*perm)
    N = x.shape[0]
    codes = torch.empty(xd.shape, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    serial = _serial(x.numel() * 5)
    if not stochastic:
        kernel(KernelRef("quantize_rows", (name,), serial=serial))(xd.reshape(N, -1), rows, codes.view(N, -1))
    else:  # the reference's draws: per group (ascending bits), its samples' ranks in it
        rank = torch.empty(N, dtype=torch.int32)
        seed = torch.empty(N, dtype=torch.int32)
        for _, members in groups:
            rank[members] = torch.arange(len(members), dtype=torch.int32)
            seed[members] = noise_seed()
        if perm == list(range(x.dim())):  # (N, 1, M): the sample's elements as C, the vector axis
            flat = xd.reshape(N, 1, -1)
        else:  # channels-last: (N, spatial, C), the logical index n·C·S + c·S + s
            flat = xd.reshape(N, -1, x.shape[1])
        kernel(KernelRef("quantize_rows_counter", (name,), serial=serial))(
            flat, rows, rank, seed, codes.view(flat.shape)
        )
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    shape = (N,) + (1,) * (x.dim() - 1)
    widest = grids[bits[-1]]
    return IntCodes(
        codes.permute(*inverse),
        rows[:, 0].reshape(shape).clone(),
        widest.qmin < 0,
        widest.zero if asymmetric else None,
        rows[:, 3].reshape(shape).clone(),
    )


class PackedCodes:
    """Codes kept for backward at ``width`` bits each (:mod:`..kernels.subbyte`): ``data`` (uint8, in the
    codes' memory order) and what :func:`unpack_saved` needs to restore them exactly."""

    __slots__ = ("data", "shape", "perm", "dtype", "add", "width")

    def __init__(self, data, shape, perm, dtype, add: int, width: int):
        self.data, self.shape, self.perm, self.dtype = data, shape, perm, dtype
        self.add, self.width = add, width

    def meta(self) -> tuple:
        """Everything but ``data`` (what a ctx keeps beside its saved tensors)."""
        return self.shape, self.perm, self.dtype, self.add, self.width


def code_bounds(q: IntCodes) -> tuple[int, int] | None:
    """The smallest and largest code ``q``'s grid allows, as stored (minus ``offset``); None when
    the grid is unknown. Per-sample grids give the widest."""
    if q.qmax is None or q.device_grid:  # (a device grid's bounds are not read on the host)
        return None
    top = int(q.qmax.max()) if isinstance(q.qmax, torch.Tensor) else int(q.qmax)
    if q.offset:
        return -q.offset, top - q.offset
    return (-top, top) if q.signed else (0, top)


def sub_byte_width(q: IntCodes) -> int | None:
    """The sub-byte width (1, 2 or 4 bits) that holds every code of ``q``'s grid, or None (8-bit
    grids, wide codes)."""
    bounds = code_bounds(q)
    if bounds is None or q.codes.element_size() != 1:
        return None
    count = bounds[1] - bounds[0] + 1
    return next((w for w in (1, 2, 4) if count <= 1 << w), None)


def pack_saved(q: IntCodes, kernel) -> PackedCodes | None:
    """``q``'s codes at the fewest bits its grid needs (two 4-bit codes per byte, four 2-bit ...),
    for what backward keeps; None where they stay bytes (8-bit grids, no kernel provider, a layout
    that is not dense)."""
    width = sub_byte_width(q) if kernel is not None else None
    if width is None:
        return None
    return pack_bytes(q.codes, width, -code_bounds(q)[0], kernel)


def pack_bytes(t: torch.Tensor, width: int, add: int, kernel) -> PackedCodes | None:
    """A byte tensor whose values plus ``add`` lie in ``0 .. 2**width - 1`` (codes, a 0/1 mask) at
    ``width`` bits each; None for a layout that is not dense."""
    perm = _dense_perm(t)
    if perm is None or kernel is None:
        return None
    per = 8 // width
    flat = t.permute(*perm).reshape(-1).view(torch.uint8)
    add %= 256
    data = torch.empty((flat.numel() + per - 1) // per, dtype=torch.uint8)
    kernel(KernelRef("pack_codes", (width,), serial=_serial(flat.numel())))(flat, _byte(add), data)
    return PackedCodes(data, tuple(t.shape), tuple(perm), t.dtype, add, width)


def unpack_saved(data: torch.Tensor, meta: tuple, kernel) -> torch.Tensor:
    """The codes :func:`pack_saved` packed (``data`` and ``PackedCodes.meta()``), exactly, in
    their layout."""
    shape, perm, dtype, add, width = meta
    flat = torch.empty(int(torch.Size(shape).numel()), dtype=torch.uint8)
    kernel(KernelRef("unpack_codes", (width,), serial=_serial(flat.numel())))(data, _byte(add), flat)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return flat.view(dtype).view([shape[p] for p in perm]).permute(*inverse)


@functools.lru_cache(maxsize=None)
def _byte(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.uint8)


_ZERO = torch.zeros(1)  # read-only kernel argument


@functools.lru_cache(maxsize=None)
def _bounds(qmin: float, qmax: float) -> torch.Tensor:
    """The quantize kernel's ``[qmin, qmax, zero, offset]`` for a zero point of 0, no offset."""
    return torch.tensor([qmin, qmax, 0.0, 0.0])
