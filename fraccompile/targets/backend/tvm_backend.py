"""The ``tvm`` backend: every site's GEMMs as integer kernels.

A site runs here when the scheme is ``symmetric`` (zero point 0, so integer products need no
zero-point terms beyond the sign shift below), its three precisions are 1..8 bits, and its op has
a kernel (conv without pre-padding, linear, matmul/bmm). Anything else runs on the reference
backend, and :meth:`TVMBackend.unsupported_reason` says why (shown in ``.sites`` and by
``fraccompile transform``). The numerics are the reference backend's: the same integer codes (same
quantizer code, same random numbers for the gradient), and the products differ only by fp32
rounding of the reference (the integer sums here are exact).

:class:`TVMBackend` holds the state (kernel provider, per-thread scratch buffers, the CUDA GEMM),
quantizes a site call's operands and dispatches it to :class:`.site_gemm.IntSiteGemm`; the three
roles per op kind come from :class:`.roles.SiteRoles`, the integer GEMMs, implicit convs and
operand packers (and the sign shifts of u8 × s8) from :class:`.gemm_runtime.IntegerGemms`.
CUDA tensors are quantized by the CUDA quantization kernels (:mod:`.device_codes`, their grids
kept on the device, no host read). Only the quantized codes (int8/uint8) are saved for backward,
not fp32 copies.
"""

from __future__ import annotations

import math
import threading

import torch

from ...ops.backend import CHANNELS_LAST, INTEGER_KERNELS, ReferenceBackend
from ...ops.contract import GateDecision, SiteCall
from ...ops.functions import GateProbe, register_mask_grad
from ...ops.quantizers import (
    input_channel_range,
    qparams_from_range,
    quantize_activation,
    tensor_range,
    weight_range,
)
from ..runtime import memory
from ..runtime.cache import KernelCache
from ..runtime.library import RECORDED_KINDS, JitKernels, KernelRef, Recorder
from .codes import _ZERO, IntCodes, _dense_perm, _row_codes, _serial, _to_codes
from .gemm_runtime import IntegerGemms
from .roles import SiteRoles
from .site_gemm import IntSiteGemm, _gradient_codes

MAX_BITS = 8  # a and w: the codes the int8 kernels (and what backward saves) hold
MAX_G_BITS = 16  # g: wider gradient codes run as two 8-bit halves (see split_codes)
MIN_GROUP_WIDTH = 8  # narrower groups waste most of the 16 int32 lanes of a VNNI instruction


def _row_grid(q: IntCodes) -> bool:
    """Whether ``q``'s grid is one per row of dim 0 (scale ``(N, 1, ...)``, the zero point one
    value or one per row, an integer offset): what the ``dequant_rows`` kernel takes."""
    n = q.codes.shape[0]
    return (
        tuple(q.scale.shape) == (n,) + (1,) * (q.codes.dim() - 1)
        and (q.zero is None or q.zero.numel() in (1, n))
        and isinstance(q.offset, int)
    )


class TVMBackend(SiteRoles, IntegerGemms, ReferenceBackend):
    """Integer kernels built with TVM (falls back to :class:`ReferenceBackend` per site)."""

    name = "tvm"
    capabilities = frozenset({INTEGER_KERNELS, CHANNELS_LAST})

    def __init__(self, cache: KernelCache | None = None, kernels=None, options=()):
        """``kernels``: the kernel provider (default: :class:`JitKernels` over ``cache``);
        ``options``: the ``(key, value)`` pairs :func:`~fraccompile.ops.backend.get_backend` made
        this backend for (kept for pickling)."""
        self.kernels = kernels if kernels is not None else JitKernels(cache)
        self.options = tuple(options)
        self.recorder: Recorder | None = None  # set by tune/export to enumerate a run's kernels
        self.where: tuple[str, str] | None = None  # (site, role) being computed, for messages
        self._cuda = None  # the CUDA GEMM, created for the first GPU tensor
        self._cuda_quant = None  # the CUDA quantization kernels (runtime.cuda_quant.CudaQuant)
        self._local = threading.local()  # per-thread scratch buffers (see scratch())
        register_mask_grad(self.mask_grad)  # the backward of the ReLUs its graphs keep a mask for
        memory.keep_freed_memory()  # the next step reuses this one's freed pages (once per process)

    def __reduce__(self):
        from ...ops.backend import get_backend

        return get_backend, (self.name, dict(self.options))

    @property
    def cache(self) -> KernelCache:
        return self.kernels.cache

    # -- devices: CPU tensors run the TVM CPU kernels, CUDA tensors the TVM CUDA GEMM (cuda.py) ----
    @staticmethod
    def on_gpu(t: torch.Tensor) -> bool:
        return t.is_cuda

    @property
    def cuda(self):
        if self._cuda is None:
            from ..runtime.cuda_driver import CudaGemm

            self._cuda = CudaGemm()
        return self._cuda

    @property
    def cuda_quant(self):
        """The quantization kernels of GPU tensors (:class:`..runtime.cuda_quant.CudaQuant`; tests
        put an object whose ``launcher(device)`` is an emulator here)."""
        if self._cuda_quant is None:
            from ..runtime.cuda_quant import CudaQuant

            self._cuda_quant = CudaQuant(library=getattr(self._cuda, "library", None))
        return self._cuda_quant

    def mask_grad(self, dy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """:class:`~fraccompile.ops.functions.MaskedReLU`'s backward, ``dy`` where ``mask`` is set
        and 0 elsewhere, in one kernel pass (:mod:`..kernels.masks`): for an fp32 CPU gradient laid
        out as its uint8 mask, dense; None otherwise (torch's route)."""
        perm = _dense_perm(mask)
        if (
            perm is None
            or not mask.numel()
            or self.on_gpu(dy)
            or dy.dtype != torch.float32
            or mask.dtype != torch.uint8
            or dy.shape != mask.shape
            or dy.stride() != mask.stride()
        ):
            return None
        out = torch.empty_like(dy)  # a dense tensor's strides are kept

        def flat(t):
            return t.permute(*perm).reshape(-1)  # a view: memory order

        self.kernel(KernelRef("mask_grad", (), serial=_serial(9 * dy.numel())))(
            flat(dy), flat(mask), flat(out)
        )
        return out

    def scratch(self, slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of ``shape`` for a temporary that one GEMM call consumes: its packed A
        (``slot`` ``"a"``), packed B (``"b"``), int32 product before the epilogue (``"c"``), padded
        input codes of an implicit-GEMM conv forward (``"x"``) or weight gradient (``"xt"``), the
        dequantized error of an fp32 EB (``"eb"``), or a fused norm's input (``"y"``), ReLU mask
        (``"mask"``) and re-laid-out gradient (``"dy"``).
        Each slot keeps the largest buffer asked for, per thread: a fresh tensor of many MB is
        mapped by the allocator and zeroed by page faults on first touch, every step (measurably
        slower than reused buffers in ``bench/step_breakdown.py``)."""
        store = self._local.__dict__.setdefault("scratch", {})
        views = self._local.__dict__.setdefault("scratch_views", {})
        key = (slot, tuple(shape), dtype)
        buf = store.get(slot)
        cached = views.get(key)  # the view made last time, while the slot keeps its buffer
        if cached is not None and cached[0] is buf:
            return cached[1]
        nbytes = math.prod(shape) * dtype.itemsize
        if buf is None or buf.numel() < nbytes:
            for stale in [k for k in views if k[0] == slot]:  # (they would keep the old buffer)
                del views[stale]
            buf = store[slot] = torch.empty(nbytes, dtype=torch.uint8)
        view = buf[:nbytes].view(dtype).view(shape)
        views[key] = (buf, view)
        return view

    def _dequantize_codes(self, q: IntCodes, slot: str) -> torch.Tensor:
        """``q``'s fp32 values (:meth:`IntCodes.dequantize`: bit for bit without a zero point,
        within one rounding with one) in the :meth:`scratch` ``slot``, laid out as the codes: one
        TVM pass on the CPU for a per-tensor scale, or one per row of dim 0 (a weight's output
        channels, a routed gradient's samples), where torch takes a copy and one or two
        arithmetic passes; else those torch ops."""
        out = self._scratch_like(slot, q.codes)
        perm = _dense_perm(q.codes)
        cpu = perm is not None and not self.on_gpu(q.codes) and not q.wide and not q.device_grid
        if cpu and q.per_row and perm[0] == 0 and _row_grid(q):
            N = q.codes.shape[0]
            zero = q.zero.reshape(-1).float().expand(N) if q.zero is not None else q.scale.new_zeros(N)
            rows = torch.stack([q.scale.reshape(N).float(), zero, zero.new_full((N,), float(q.offset))], 1)
            name = str(q.codes.dtype).removeprefix("torch.")
            ref = KernelRef("dequant_rows", (name,), serial=_serial(5 * q.codes.numel()))
            self.kernel(ref)(q.codes.permute(*perm).reshape(N, -1), rows, out.permute(*perm).reshape(N, -1))
            return out
        if not cpu or q.per_row:
            out.copy_(q.codes)  # the reference's mul / addcmul, the same fp32 operations
            if q.has_offset:  # the grid's codes (exact in fp32)
                out.add_(q.offset)
            if q.zero is None:
                return out.mul_(q.scale)
            return torch.addcmul(q.zero, out, q.scale, out=out)
        n = q.codes.numel()
        ref = KernelRef("dequant_codes", (str(q.codes.dtype).removeprefix("torch."),), serial=_serial(5 * n))
        zero = q.zero.reshape(1).float() if q.zero is not None else _ZERO
        grid = torch.cat([q.scale.reshape(1).float(), zero, _ZERO + float(q.offset)])
        self.kernel(ref)(q.codes.permute(*perm).reshape(-1), grid, out.permute(*perm).reshape(-1))
        return out

    def _padded_codes(
        self, slot: str, shape, dim: int, padding, src: torch.Tensor, flip: int
    ) -> torch.Tensor:
        """A :meth:`scratch` uint8 buffer of ``shape`` holding the codes ``src`` in its interior
        (the two spatial dims from ``dim`` on, padded by ``padding``) and code 0 around them, all
        of it XORed with ``flip``: an implicit conv's input. Only the interior is written per
        call; the borders (``0 ^ flip``) are rewritten only when the buffer, its shape past the
        samples, the padding or the flip changed, and for more samples only those past the ones
        already written (consecutive calls of one geometry, most sites of a stage, skip the
        strided fills). Planes (``dim`` 2) of channels-last codes on the CPU are written
        by one transposing kernel (``pad_planes``); other interiors by torch's copy and XOR."""
        buf = self.scratch(slot, shape, torch.uint8)
        (ph, pw), (H, W) = padding, src.shape[dim : dim + 2]
        state = self._local.__dict__.setdefault("borders", {})
        # the borders stay valid for the samples (dim 0) written last time under the same key:
        # a routed site's groups of different sizes rewrite only those past the last count
        key = (buf.data_ptr(), tuple(shape[1:]), tuple(padding), flip)
        valid = state[slot][1] if slot in state and state[slot][0] == key else 0
        if valid < shape[0]:
            lead = (slice(valid, None),) + (slice(None),) * (dim - 1)  # the samples past them
            rows = slice(ph, ph + H)
            for border in (
                lead + (slice(0, ph),),
                lead + (slice(ph + H, None),),
                lead + (rows, slice(0, pw)),
                lead + (rows, slice(pw + W, None)),
            ):
                buf[border].fill_(flip)
            state[slot] = (key, shape[0])
        planes = dim == 2 and src.dim() == 4 and tuple(shape) == (*src.shape[:2], H + 2 * ph, W + 2 * pw)
        if planes and not self.on_gpu(src) and src.permute(0, 2, 3, 1).is_contiguous():
            # planes from channels-last codes (a weight gradient's): one transposing kernel pass
            ref = KernelRef("pad_planes", (H, W, src.shape[1], ph, pw))
            self.kernel(ref)(src.permute(0, 2, 3, 1), buf, flip)
            return buf
        interior = buf[(slice(None),) * dim + (slice(ph, ph + H), slice(pw, pw + W))]
        interior.copy_(src)
        if flip:
            interior.bitwise_xor_(flip)
        return buf

    def _scratch_like(self, slot: str, t: torch.Tensor) -> torch.Tensor:
        """An fp32 :meth:`scratch` buffer shaped and laid out as ``t`` (a fresh one on the GPU
        or for a layout that is neither contiguous nor channels-last)."""
        perm = _dense_perm(t)
        if perm is None or self.on_gpu(t):
            return torch.empty_like(t, dtype=torch.float32)
        buf = self.scratch(slot, [t.shape[p] for p in perm], torch.float32)
        return buf.permute(*[perm.index(i) for i in range(len(perm))])

    def quantize_kernel(self, x: torch.Tensor):
        """The ``kernel`` argument of :func:`_to_codes` for ``x``: the fused CPU quantizer, or
        None (torch's quantizer, on the GPU)."""
        return None if self.on_gpu(x) else self.kernel

    def kernel(self, ref: KernelRef):
        """The compiled function of ``ref`` from this backend's provider (noted on the recorder
        where its kind is one a run records by name)."""
        if self.recorder is not None and ref.kind in RECORDED_KINDS:
            self.recorder.kernel(ref, self.where)
        return self.kernels.get(ref, self.where)

    # -- what runs here ----------------------------------------------------------------------------
    def unsupported_reason(self, call: SiteCall) -> str | None:
        spec, weight_shape = call.spec, call.weight_shape
        if spec.kind == "conv" and (spec.pre_pad or spec.padding == "same" or spec.padding_mode != "zeros"):
            return "conv with pre-padding (padding_mode or padding='same') has no kernel"
        if (
            spec.kind == "conv"
            and spec.groups > 1
            and weight_shape is not None
            and weight_shape[0] // spec.groups < MIN_GROUP_WIDTH
        ):
            return (
                f"grouped conv with {weight_shape[0] // spec.groups} output channel(s) per "
                f"group (depthwise): the GEMM form pads them to 16 lanes"
            )
        if call.rows is not None and call.rows.mode == "dense":
            return "dense gate mode computes every candidate on the reference backend"
        bits = call.bits
        if bits.is_full and call.rows is None:
            return None  # full precision runs the original op on every backend
        for name, value, top in (("a", bits.a, MAX_BITS), ("w", bits.w, MAX_BITS), ("g", bits.g, MAX_G_BITS)):
            if not 1 <= value <= top:
                what = "full precision" if value == 0 else f"{value} bits"
                return f"{name}={what}: integer kernels take 1..{top} bits for {name}"
        return None

    # -- one site ----------------------------------------------------------------------------------
    def run_site(
        self, call: SiteCall, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        """``call``'s output from integer kernels: the operands' codes (the reference's, same
        quantizer), then :class:`IntSiteGemm`."""
        spec, prec, asym = call.spec, call.prec, call.scheme == "sbm"
        self.where = (call.site, "quantize")
        if self.on_gpu(x):  # the quantization kernels of CUDA tensors: no host sync
            from .device_codes import site_codes

            xq, wq, wq_eb, x = site_codes(self, call, x, w)
            norm = call.epilogue_norm
            return IntSiteGemm.apply(
                x, w, b, xq, wq, call, self, getattr(norm, "weight", None), getattr(norm, "bias", None), wq_eb
            )
        kernel = self.quantize_kernel(x)
        lo, hi = call.x_range or tensor_range(x)
        d = call.rows
        if d is None:
            xq = _to_codes(
                x.detach(), qparams_from_range(lo, hi, prec.a, call.scheme), kernel=kernel, asymmetric=asym
            )
        else:
            xq = _row_codes(
                x.detach(),
                d.row_bits("a"),
                lambda k: qparams_from_range(lo, hi, k, call.scheme),
                asymmetric=asym,
                kernel=kernel,
            )
        if spec.kind == "matmul":
            ylo, yhi = call.y_range or tensor_range(w)
            wq = _to_codes(
                w.detach(), qparams_from_range(ylo, yhi, prec.w, call.scheme), kernel=kernel, asymmetric=asym
            )
        else:
            wlo, whi = weight_range(w, per_channel=call.weight_scale != "tensor")
            wq = _to_codes(
                w.detach(),
                qparams_from_range(wlo, whi, prec.w, call.scheme, signed=True),
                kernel=kernel,
                asymmetric=asym,
            )
        wq_eb = None
        if call.weight_scale == "gemm" and spec.kind != "matmul":  # EB's own: per input channel
            elo, ehi = input_channel_range(w, spec.groups)
            wq_eb = _to_codes(
                w.detach(),
                qparams_from_range(elo, ehi, prec.w, call.scheme, signed=True),
                kernel=kernel,
                asymmetric=asym,
            )
        if d is not None:  # the gate's gradient, as the reference's GateProbe gives it

            def quantize_at(t: torch.Tensor, k: int) -> torch.Tensor:
                return quantize_activation(t, k, call.scheme, lo=lo, hi=hi)

            probe = None if self.on_gpu(x) else self._gate_probe(d, call.scheme, lo, hi)
            x = GateProbe.apply(
                x, d.onehot, x.detach(), quantize_at, d.a, xq.dequantize if probe is None else None, probe
            )
        norm = call.epilogue_norm
        return IntSiteGemm.apply(
            x, w, b, xq, wq, call, self, getattr(norm, "weight", None), getattr(norm, "bias", None), wq_eb
        )

    def gradient_codes(self, call: SiteCall, dy: torch.Tensor) -> IntCodes:
        """``dy``'s codes (the reference's ``quantize_gradient``, per sample for a routed site):
        the quantization kernels on the GPU, else :func:`.site_gemm._gradient_codes`."""
        if self.on_gpu(dy):
            from .device_codes import gradient_codes

            return gradient_codes(self, call, dy)
        return _gradient_codes(call, dy, self.quantize_kernel(dy))

    def _gate_probe(self, d: GateDecision, scheme: str, lo: torch.Tensor, hi: torch.Tensor):
        """GateProbe's sums for the routed decision ``d`` as one kernel pass (:mod:`..kernels.probe`):
        ``probe(x, dqx) -> (N, len(candidates))``, the input's grid spanning ``[lo, hi]``."""
        bits = sorted(set(d.a))
        qps = [qparams_from_range(lo, hi, b, scheme) for b in bits]
        grids = torch.stack(
            [
                torch.stack(
                    [
                        qp.scale.reshape(()).float(),
                        qp.zero.reshape(()).float(),
                        torch.tensor(float(qp.qmin)),
                        torch.tensor(float(qp.qmax)),
                    ]
                )
                for qp in qps
            ]
        )
        where = self.where
        ref = KernelRef("gate_probe", (len(bits),))

        def probe(x: torch.Tensor, dqx: torch.Tensor) -> torch.Tensor:
            row_bits = d.row_bits("a")
            index = torch.searchsorted(torch.tensor(bits), row_bits.cpu())
            rows = grids[index].contiguous()
            perm = _dense_perm(x)
            if perm is None or perm[0] != 0:
                x, perm = x.contiguous(), list(range(x.dim()))
            xs = x.permute(*perm)
            gs = dqx.permute(*perm)
            if not gs.is_contiguous():
                gs = gs.contiguous()
            N = x.shape[0]
            out = torch.empty((N, len(bits)))
            if self.recorder is not None:
                self.recorder.kernel(ref, where)
            self.kernel(ref)(xs.reshape(N, -1), gs.reshape(N, -1), grids, rows, out)
            return out[:, [bits.index(b) for b in d.a]]

        return probe


def make_tvm_backend(options: dict) -> TVMBackend:
    """The backend for :func:`fraccompile.ops.get_backend` options (``kernels``, ``tuning_db``,
    ``kernels_fallback``; see :class:`fraccompile.FracConfig`)."""
    unknown = set(options) - {"kernels", "tuning_db", "kernels_fallback"}
    if unknown:
        raise ValueError(f"unknown tvm backend option(s) {sorted(unknown)}")
    tuning = None
    if options.get("tuning_db"):
        from ..runtime.tuning_db import TuningDB

        tuning = TuningDB(options["tuning_db"])
    if options.get("kernels"):
        from ..runtime.exported import ExportedKernels

        provider = ExportedKernels(options["kernels"], bool(options.get("kernels_fallback")), tuning=tuning)
    else:
        provider = JitKernels(tuning=tuning)
    backend = TVMBackend(kernels=provider, options=sorted(options.items()))
    if options.get("kernels"):  # GPU tensors take their kernels from the same directory
        from ..runtime.cuda_driver import CudaGemm
        from ..runtime.cuda_quant import CudaQuant

        backend._cuda = CudaGemm(library=provider.cuda_library)
        backend._cuda_quant = CudaQuant(library=provider.cuda_library)
    return backend
