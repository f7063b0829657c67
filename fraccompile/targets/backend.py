"""The ``tvm`` backend: every site's GEMMs as integer kernels.

A site runs here when the scheme is ``symmetric`` (zero point 0, so integer products need no
zero-point terms beyond the sign shift below), its three precisions are 1..8 bits, and its op has
a kernel (conv without pre-padding, linear, matmul/bmm). Anything else runs on the reference
backend, and :meth:`TVMBackend.unsupported_reason` says why (shown in ``.sites`` and by
``fraccompile transform``). The numerics are the reference backend's: the same integer codes (same
quantizer code, same random numbers for the gradient), and the products differ only by fp32
rounding of the reference (the integer sums here are exact).

Roles, as one batched GEMM ``C[g] = A[g]·B[g]ᵀ`` with A u8 and B s8 (see :mod:`.gemm`):

============  =====================================  ==============================================
role          linear / conv (im2col ``cols``)        matmul ``x @ y``
============  =====================================  ==============================================
forward FW    A = x codes, B = w codes               A = x, B = yᵀ
backprop EB   fp32 GEMM on the dequantized codes     A = dy, B = y         (``dx``)
weight GC     A = dyᵀ, B = xᵀ (colsᵀ) → ``dw``      A = xᵀ, B = dyᵀ       (``dy`` of ``y``)
============  =====================================  ==============================================

EB of a weight site is not an integer GEMM: the weights have one scale per output channel, and EB
sums over output channels, so the scales cannot be taken out of the sum; it runs as an fp32 GEMM
on exactly the reference backend's operands (per-channel weight ranges: docs/contract.md). With
``FracConfig(weight_scale="tensor")`` a linear site's EB is an integer GEMM (A = dy, B = wᵀ); a
conv's stays fp32 (its transposed conv would need a col2im, and im2col already dominates).

Signs: a signed A (activations with negatives, gradients) is shifted by +128 into u8 (an XOR of
the sign bit) and an unsigned 8-bit B by -128 into s8; ``C = C' + β·Σa - α·Σb + αβK`` undoes it.
Only the quantized codes (int8/uint8) are saved for backward, not fp32 copies.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from ..ops.backend import CHANNELS_LAST, INTEGER_KERNELS, ReferenceBackend
from ..ops.contract import GateDecision, SiteCall
from ..ops.functions import GateProbe
from ..ops.quantizers import (input_channel_range, qparams_from_range, quantize_activation,
                               tensor_range, weight_range)
from ..ops.spec import SiteSpec
from . import conv
from .affine import (_channel_sums, _code_sums, _gradient_sums, _input_code_sums, _out_channel,
                     _out_sizes, _value_sums, _window_code_sums)
from .cache import KernelCache
from .codes import (IntCodes, _dense_perm, _jit_kernel, _row_codes, _row_value, _scalar_scale,
                    _serial, _take_rows, _to_codes, _ZERO, centered, signed_b, split_codes)
from .kernels import JitKernels, KernelRef, Recorder
from .site_gemm import IntSiteGemm

MAX_BITS = 8       # a and w: the codes the int8 kernels (and what backward saves) hold
MAX_G_BITS = 16    # g: wider gradient codes run as two 8-bit halves (see split_codes)
MIN_GROUP_WIDTH = 8  # narrower groups waste most of the 16 int32 lanes of a VNNI instruction
MAX_K = 65_536  # |C'| <= 255·128·K must stay below 2**31
MAX_K_UNSIGNED = 33_025  # both operands unsigned: the sum itself (<= 255²·K) must fit
class TVMBackend(ReferenceBackend):
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
        self._local = threading.local()  # per-thread scratch buffers (see scratch())

    def __reduce__(self):
        from ..ops.backend import get_backend
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
            from .cuda_driver import CudaGemm
            self._cuda = CudaGemm()
        return self._cuda

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
        nbytes = math.prod(shape) * dtype.itemsize
        buf = store.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = store[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)

    def _dequantize_codes(self, q: IntCodes, slot: str) -> torch.Tensor:
        """``q``'s fp32 values (:meth:`IntCodes.dequantize`: bit for bit without a zero point,
        within one rounding with one) in the :meth:`scratch` ``slot``, laid out as the codes: one
        TVM pass for a per-tensor scale on the CPU (a copy and one or two arithmetic passes in
        torch), else those torch ops."""
        out = self._scratch_like(slot, q.codes)
        perm = _dense_perm(q.codes)
        if perm is None or self.on_gpu(q.codes) or q.scale.numel() != 1 or q.wide:
            if q.zero is None:
                return out.copy_(q.codes).mul_(q.scale)
            out.copy_(q.codes)  # the reference's addcmul, the same fp32 operations
            if q.offset:
                out.add_(q.offset)
            return torch.addcmul(q.zero, out, q.scale, out=out)
        n = q.codes.numel()
        ref = KernelRef("dequant_codes", (str(q.codes.dtype).removeprefix("torch."),),
                        serial=_serial(5 * n))
        zero = q.zero.reshape(1).float() if q.zero is not None else _ZERO
        grid = torch.cat([q.scale.reshape(1).float(), zero, _ZERO + float(q.offset)])
        self.kernel(ref)(q.codes.permute(*perm).reshape(-1), grid, out.permute(*perm).reshape(-1))
        return out

    def _padded_codes(self, slot: str, shape, dim: int, padding, src: torch.Tensor,
                      flip: int) -> torch.Tensor:
        """A :meth:`scratch` uint8 buffer of ``shape`` holding the codes ``src`` in its interior
        (the two spatial dims from ``dim`` on, padded by ``padding``) and code 0 around them, all
        of it XORed with ``flip``: an implicit conv's input. Only the interior is written per
        call; the borders (``0 ^ flip``) are rewritten only when the buffer, its shape, the
        padding or the flip changed (consecutive calls of one geometry, most sites of a stage,
        skip the strided fills)."""
        buf = self.scratch(slot, shape, torch.uint8)
        (ph, pw), (H, W) = padding, src.shape[dim:dim + 2]
        lead = (slice(None),) * dim
        state = self._local.__dict__.setdefault("borders", {})
        key = (buf.data_ptr(), tuple(shape), tuple(padding), flip)
        if state.get(slot) != key:
            rows = slice(ph, ph + H)
            for border in (lead + (slice(0, ph),), lead + (slice(ph + H, None),),
                           lead + (rows, slice(0, pw)), lead + (rows, slice(pw + W, None))):
                buf[border].fill_(flip)
            state[slot] = key
        interior = buf[lead + (slice(ph, ph + H), slice(pw, pw + W))]
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
        """The compiled function of ``ref`` from this backend's provider."""
        return self.kernels.get(ref, self.where)

    # -- what runs here ----------------------------------------------------------------------------
    def unsupported_reason(self, call: SiteCall) -> str | None:
        spec, weight_shape = call.spec, call.weight_shape
        if spec.kind == "conv" and (spec.pre_pad or spec.padding == "same"
                                    or spec.padding_mode != "zeros"):
            return "conv with pre-padding (padding_mode or padding='same') has no kernel"
        if spec.kind == "conv" and spec.groups > 1 and weight_shape is not None \
                and weight_shape[0] // spec.groups < MIN_GROUP_WIDTH:
            return (f"grouped conv with {weight_shape[0] // spec.groups} output channel(s) per "
                    f"group (depthwise): the GEMM form pads them to 16 lanes")
        if call.rows is not None and call.rows.mode == "dense":
            return "dense gate mode computes every candidate on the reference backend"
        bits = call.bits
        if bits.is_full and call.rows is None:
            return None  # full precision runs the original op on every backend
        for name, value, top in (("a", bits.a, MAX_BITS), ("w", bits.w, MAX_BITS),
                                 ("g", bits.g, MAX_G_BITS)):
            if not 1 <= value <= top:
                what = "full precision" if value == 0 else f"{value} bits"
                return f"{name}={what}: integer kernels take 1..{top} bits for {name}"
        return None

    # -- one site ----------------------------------------------------------------------------------
    def run_site(self, call: SiteCall, x: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor | None) -> torch.Tensor:
        """``call``'s output from integer kernels: the operands' codes (the reference's, same
        quantizer), then :class:`IntSiteGemm`."""
        spec, prec, asym = call.spec, call.prec, call.scheme == "sbm"
        self.where = (call.site, "quantize")
        kernel = self.quantize_kernel(x)
        lo, hi = call.x_range or tensor_range(x)
        d = call.rows
        if d is None:
            xq = _to_codes(x.detach(), qparams_from_range(lo, hi, prec.a, call.scheme),
                           kernel=kernel, asymmetric=asym)
        else:
            xq = _row_codes(x.detach(), d.row_bits("a"),
                            lambda k: qparams_from_range(lo, hi, k, call.scheme), asymmetric=asym,
                            kernel=kernel)
        if spec.kind == "matmul":
            ylo, yhi = call.y_range or tensor_range(w)
            wq = _to_codes(w.detach(), qparams_from_range(ylo, yhi, prec.w, call.scheme),
                           kernel=kernel, asymmetric=asym)
        else:
            wlo, whi = weight_range(w, per_channel=call.weight_scale != "tensor")
            wq = _to_codes(w.detach(), qparams_from_range(wlo, whi, prec.w, call.scheme,
                                                          signed=True),
                           kernel=kernel, asymmetric=asym)
        wq_eb = None
        if call.weight_scale == "gemm" and spec.kind != "matmul":  # EB's own: per input channel
            elo, ehi = input_channel_range(w, spec.groups)
            wq_eb = _to_codes(w.detach(), qparams_from_range(elo, ehi, prec.w, call.scheme,
                                                             signed=True),
                              kernel=kernel, asymmetric=asym)
        if d is not None:  # the gate's gradient, as the reference's GateProbe gives it
            def quantize_at(t: torch.Tensor, k: int) -> torch.Tensor:
                return quantize_activation(t, k, call.scheme, lo=lo, hi=hi)
            probe = None if self.on_gpu(x) else self._gate_probe(d, call.scheme, lo, hi)
            x = GateProbe.apply(x, d.onehot, x.detach(), quantize_at, d.a,
                                xq.dequantize if probe is None else None, probe)
        norm = call.epilogue_norm
        return IntSiteGemm.apply(x, w, b, xq, wq, call, self, getattr(norm, "weight", None),
                                 getattr(norm, "bias", None), wq_eb)

    def _gate_probe(self, d: GateDecision, scheme: str, lo: torch.Tensor, hi: torch.Tensor):
        """GateProbe's sums for the routed decision ``d`` as one kernel pass (:mod:`.probe`):
        ``probe(x, dqx) -> (N, len(candidates))``, the input's grid spanning ``[lo, hi]``."""
        bits = sorted(set(d.a))
        qps = [qparams_from_range(lo, hi, b, scheme) for b in bits]
        grids = torch.stack([torch.stack([qp.scale.reshape(()).float(), qp.zero.reshape(()).float(),
                                          torch.tensor(float(qp.qmin)),
                                          torch.tensor(float(qp.qmax))]) for qp in qps])
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

    # -- the integer GEMM --------------------------------------------------------------------------
    def gemm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact ``a @ bᵀ`` per group for int8/uint8 codes ``a (G, M, K)`` and ``b (G, N, K)``,
        as int32 ``(G, M, N)`` (int64 when ``K`` is split into int32-safe chunks)."""
        if self.on_gpu(a):
            return self.cuda.gemm(a, b)
        return self._gemm(*a.shape[:2], *self._a_packer(a), *b.shape[1:], *self._b_packer(b))

    def gemm_f32(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``(a @ bᵀ) * scale + bias`` in fp32, ``(G, M, N)``: :meth:`gemm`'s exact integer product
        dequantized (``scale``: one value or one per column ``N``; ``bias``: per column). On the
        CPU the sign corrections, the scale and the bias are one fused kernel pass; ``out``: a
        contiguous fp32 ``(G, M, N)`` to write into (e.g. a view of the caller's buffer)."""
        if self.on_gpu(a):
            return _dequantize(self.cuda.gemm(a, b), scale, bias, out)
        return self._gemm(*a.shape[:2], *self._a_packer(a), *b.shape[1:], *self._b_packer(b),
                          dequant=(scale, bias, out))

    def _gemm(self, G: int, M: int, alpha: int, pack_a, N: int, K: int, beta: int,
              pack_b, dequant=None) -> torch.Tensor:
        """:meth:`gemm` with the operands given by packers ``pack_a(k0, kc, Mp, Kp)`` and
        ``pack_b(k0, kc, Np, Kp)``: reduction columns ``k0 .. k0+kc``, padded, sign-flipped by
        ``alpha`` / ``beta``, with a ones row at ``M`` / ``N`` when there is room. ``dequant``:
        ``(scale, bias, out)`` of :meth:`gemm_f32` (None: the int32 product)."""
        max_k = MAX_K_UNSIGNED if beta and not alpha else MAX_K
        if K > max_k:  # split the reduction so no int32 partial sum can overflow
            out = None
            for k0 in range(0, K, max_k):
                kc = min(max_k, K - k0)
                part = self._gemm(
                    G, M, alpha, lambda j0, jc, mp, kp, k0=k0: pack_a(k0 + j0, jc, mp, kp),
                    N, kc, beta, lambda j0, jc, np_, kp, k0=k0: pack_b(k0 + j0, jc, np_, kp))
                out = part.long() if out is None else out.add_(part)
            return out if dequant is None else _dequantize(out, *dequant)
        # the sign corrections need B's row sums (A shifted) and A's (B shifted): an extra row of
        # ones in A, resp. in B, makes the kernel return them with the product
        problem = (G, M + 1 if alpha else M, N + 1 if beta else N, K)
        if self.recorder is not None:  # the other signs: a ones row more or less on either side
            self._variants = [(G, M + i, N + j, K) for i in (0, 1) for j in (0, 1)]
            self._problem = problem
            self.recorder.problem(problem, self._variants, self.where)
        shape = self.kernels.gemm_shape(*problem, where=self.where)
        A = pack_a(0, K, shape.m, shape.k)
        Bp = pack_b(0, K, shape.n, shape.k)
        # the product is a temporary when the epilogue consumes it here, else the result
        C = (self.scratch("c", (G, shape.m, shape.n), torch.int32) if dequant is not None
             else torch.empty((G, shape.m, shape.n), dtype=torch.int32))
        self.kernel(KernelRef.gemm(shape))(A, Bp, C)
        if dequant is not None:  # C[m, n] + rc[m] + cc[n], the same sums as below, then scaled
            scale, bias, out = dequant
            rc = (C[:, :M, N] - alpha * K) * beta if beta else C.new_zeros((G, M))
            cc = C[:, M, :N] * -alpha if alpha else C.new_zeros((G, N))
            return self._dequant(C, rc, cc, scale, bias, out, G, M, N)
        if alpha:  # row M: sum_k (b - beta)  ->  sum_k b = C[M] + beta*K
            b_sums = C[:, M:M + 1, :N] + beta * K
        if beta:   # column N: sum_k (a + alpha)  ->  sum_k a = C[:, :, N] - alpha*K
            a_sums = C[:, :M, N:N + 1] - alpha * K
        C = C[:, :M, :N]
        if beta:
            C += beta * a_sums
        if alpha:
            C -= alpha * b_sums
            if beta:
                C += alpha * beta * K
        return C

    def _dequant(self, C, rc, cc, scale, bias, out, G: int, M: int, N: int) -> torch.Tensor:
        """``out[g, m, n] = (C[g, m, n] + rc[g, m] + cc[g, n]) · scale[n] + bias[n]`` in fp32, one
        TVM kernel pass (``C`` may be padded past ``M`` and ``N``)."""
        scale = scale.reshape(-1).float().expand(N).contiguous()
        bias = bias.float().contiguous() if bias is not None else scale.new_zeros(N)
        out = out if out is not None else torch.empty((G, M, N))
        ref = KernelRef("dequant", (), serial=_serial(G * M * N * 8))
        self.kernel(ref)(C, rc.contiguous(), cc.contiguous(), scale, bias, out)
        return out

    @property
    def _vnni(self) -> bool:
        """Whether the kernel provider builds for AVX-512 VNNI (the implicit-GEMM convs' ISA)."""
        host = getattr(self.kernels, "host", None)
        return host is not None and host.isa == "avx512-vnni"

    def _conv_implicit(self, spec: SiteSpec, xq: IntCodes, xl: torch.Tensor, wr: torch.Tensor,
                       w_shape, out_sp, scale, bias, rows: torch.Tensor,
                       row_term=None) -> bool | None:
        """The forward of a 2-D conv as an implicit GEMM (:mod:`.conv`) into ``rows (N·OH·OW,
        OC)``: the codes ``xl (N, H, W, C)`` padded and sign-flipped once, no patch matrix. None
        (nothing done) where it does not apply: no VNNI, ``C`` not a multiple of 4, or no register
        block dividing the output width; else whether ``row_term`` (``(r, t)``: ``r (N, 1, OH,
        OW)·t`` per channel, see :meth:`fw`) was added in the write-back."""
        if not self._vnni:
            return None
        shape = conv.forward_shape(xl.shape, w_shape, spec.stride, spec.gemm_padding(w_shape),
                                   spec.dilation, out_sp, MAX_K)
        if shape is None:
            return None
        N, H, W, Cin = xl.shape
        OC, K = wr.shape[1:]
        (ph, pw), flip = spec.gemm_padding(w_shape), 128 if xq.signed else 0
        # a tap outside the image reads code 0, flipped as the codes are
        X = self._padded_codes("x", (N, shape.hp, shape.wp, Cin), 1, (ph, pw),
                               xl.view(torch.uint8), flip)
        _, pack_b = self._b_packer(wr)                              # w is signed: no flip
        Bp = pack_b(0, K, shape.ocp, K)
        # A was shifted by +flip: subtract flip·(the weight row's code sum) per output channel
        cc = (wr.sum(-1, dtype=torch.int32) * -flip if flip
              else torch.zeros((1, OC), dtype=torch.int32))
        M = N * math.prod(out_sp)
        if shape.ocp == OC:  # the dequantize in the kernel's write-back: fp32 rows, one pass
            ref = KernelRef("conv_dqz" if row_term is not None else "conv_dq", shape.args)
            if self.recorder is not None:
                self.recorder.kernel(ref, self.where)
            extra = () if row_term is None else (
                row_term[0].reshape(N, *out_sp).contiguous(),
                row_term[1].reshape(-1).float().expand(OC).contiguous())
            self.kernel(ref)(X, Bp[0], cc[0], scale.reshape(-1).float().expand(OC).contiguous(),
                             bias.float().contiguous() if bias is not None
                             else torch.zeros(OC), *extra, rows.view(N, *out_sp, OC))
            return row_term is not None
        C = self.scratch("c", (1, M, shape.ocp), torch.int32)
        ref = KernelRef("conv", shape.args)
        if self.recorder is not None:
            self.recorder.kernel(ref, self.where)
        self.kernel(ref)(X, Bp[0], C.view(N, *out_sp, shape.ocp))
        self._dequant(C, C.new_zeros((1, M)), cc, scale, bias, rows.view(1, M, OC), 1, M, OC)
        return False

    def _gc_implicit(self, spec: SiteSpec, xq: IntCodes, dyq: IntCodes, xl: torch.Tensor, w_shape,
                     scale) -> torch.Tensor | None:
        """The weight gradient of a stride-1 2-D conv as an implicit GEMM
        (:func:`.conv.gc_definition`): the codes ``xl (N, H, W, C)`` as padded, sign-flipped
        planes, ``dy`` packed as B, no patch matrix; the reduction over positions runs in batch
        chunks that keep the int32 sums exact.
        None where it does not apply (no VNNI, a stride, an output width not a multiple of 4, or
        one image's positions over the exact-sum limit)."""
        OH, OW = dyq.codes.shape[2:]
        shapes = conv.gc_shapes(xl.shape, w_shape, spec.stride, spec.gemm_padding(w_shape),
                                spec.dilation, (OH, OW), MAX_K) if self._vnni else None
        if shapes is None:
            return None
        N, H, W, Cin = xl.shape
        OC, per, ocp = w_shape[0], OH * OW, shapes[0].ocp
        (ph, pw), flip = spec.gemm_padding(w_shape), 128 if xq.signed else 0
        # the transposing copy, then the flip in place over the dense planes (an XOR straight
        # into the strided interior goes through a temporary and a second copy)
        XT = self._padded_codes("xt", (N, Cin, H + 2 * ph, W + 2 * pw), 2, (ph, pw),
                                xl.view(torch.uint8).permute(0, 3, 1, 2), flip)
        dy = dyq.codes.permute(0, 2, 3, 1).reshape(N * per, OC)    # (positions, OC)
        total, b0 = None, 0
        for shape in shapes:  # batch chunks
            nc = shape.n
            _, pack_b = self._b_packer(dy[b0 * per:(b0 + nc) * per].t().unsqueeze(0))
            Bp = pack_b(0, nc * per, ocp, nc * per)
            ref = KernelRef("gc", shape.args)
            if self.recorder is not None:
                self.recorder.kernel(ref, self.where)
            C = self.scratch("c", (*w_shape[2:], Cin, ocp), torch.int32)
            self.kernel(ref)(XT[b0:b0 + nc], Bp[0], C)
            if len(shapes) == 1 and not flip:  # one chunk's int32 sum is exact as it is
                total = C
            else:
                total = C.long() if total is None else total.add_(C)
            b0 += nc
        # A was shifted by +flip: subtract flip·(the sum of dy over positions) per output channel
        total = total[..., :OC] - flip * _channel_sums(dyq.codes, 1) if flip else total[..., :OC]
        dw = (total.float() * scale).permute(3, 0, 1, 2).contiguous()  # (OC, kh, kw, C)
        return dw.permute(0, 3, 1, 2)

    # -- the three roles per op kind ---------------------------------------------------------------
    def fw(self, spec: SiteSpec, xq: IntCodes, wq: IntCodes, x_shape, w_shape,
           bias: torch.Tensor | None = None, temporary: bool = False) -> torch.Tensor:
        """The site's output from the codes. ``temporary``: the caller consumes the result before
        the next GEMM call (a fused norm's input): a conv writes it into a :meth:`scratch`
        buffer.

        The integer product of the codes times the scales that factor out of it (per tensor,
        per output channel); then per-sample scales (rows), and the zero points' terms:
        ``x·w = sx·sw·Σqx·qw + sx·zw·Σqx + zx·Σw`` (for a conv the sums run over each output
        position's window, and ``Σw`` over the taps inside the image)."""
        xq, wq = centered(xq), centered(wq)
        if spec.kind == "conv":
            wq = signed_b(wq)  # the conv kernels take the weight as signed B
        x_zero, w_zero = xq.has_zero, wq.has_zero
        late = xq.per_row or x_zero or w_zero
        scale = _scalar_scale(xq) * wq.scale.reshape(-1)
        if late and w_zero and not (xq.per_row or x_zero) and spec.kind == "conv":
            # the weight zero point's term is rank one: (window sums)[position]·zw[channel],
            # added in the implicit conv's write-back where it runs (else one pass after)
            r = _window_code_sums(spec, xq, w_shape).mul_(xq.scale)
            t = _out_channel(spec, wq.zero, r.dim())
            y, taken = self._fw_core(spec, xq, wq, x_shape, w_shape, scale, bias, temporary,
                                     row_term=(r, t))
            if not taken:
                y.addcmul_(r, t)
            return y
        y, _ = self._fw_core(spec, xq, wq, x_shape, w_shape, scale, None if late else bias,
                             temporary)
        if not late:
            return y
        if xq.per_row:
            y.mul_(xq.scale)
        if w_zero:  # sx·zw·(window sums of x's codes): one pass over y, no temporary of its size
            y.addcmul_(_window_code_sums(spec, xq, w_shape).mul_(xq.scale),
                       _out_channel(spec, wq.zero, y.dim()))
        fixed = None  # the terms every sample shares, added in one pass
        if x_zero:  # zx·(sums of w's values)
            fixed = _value_sums(spec, wq, x_shape, w_shape) * xq.zero
        if bias is not None:
            b = _out_channel(spec, bias, y.dim())
            fixed = b if fixed is None else fixed + b
        if fixed is not None:
            y.add_(fixed)
        return y

    def _fw_core(self, spec: SiteSpec, xq: IntCodes, wq: IntCodes, x_shape, w_shape, scale,
                 bias, temporary: bool, row_term=None) -> tuple[torch.Tensor, bool]:
        """``(y, taken)``: the scaled integer product plus ``bias``, and whether ``row_term``
        (a conv's, see :meth:`fw`) was added too."""
        if spec.kind == "linear":
            K = x_shape[-1]
            y = self.gemm_f32(xq.codes.reshape(1, -1, K), wq.codes.unsqueeze(0), scale, bias)
            return y.reshape(*x_shape[:-1], w_shape[0]), False
        if spec.kind == "matmul":
            xb, yb, batch = _matmul_batches(xq.codes, wq.codes)
            y = self.gemm_f32(xb, yb.mT, scale)
            return y.reshape(*batch, *y.shape[-2:]), False
        G, OC, n = spec.groups, w_shape[0], x_shape[0]
        xl = xq.codes.permute(0, *range(2, 2 + spec.conv_dims), 1)
        wr = _weight_rows(wq.codes, G)                              # (G, OCg, k·Cg)
        out_sp = _out_sizes(spec, x_shape[2:], w_shape)
        # (N, O..., OC) in memory, an (N, OC, O...) tensor: channels-last, which the next conv
        # reads without a transpose
        d = len(out_sp)
        strides = [math.prod(out_sp) * OC] + [math.prod(out_sp[i + 1:]) * OC for i in range(d)]
        if temporary and not self.on_gpu(xq.codes):
            y = self.scratch("y", (n, *out_sp, OC), torch.float32).permute(0, d + 1, *range(1, d + 1))
        else:
            y = torch.empty_strided((n, OC, *out_sp), (strides[0], 1, *strides[1:]),
                                    device=xq.codes.device)
        rows = y.permute(0, *range(2, 2 + d), 1)                    # (N, O..., OC), contiguous
        fused = d == 2 and G == 1 and not self.on_gpu(xl)
        if fused:  # the fused paths read channels-last codes: a byte copy when they are not
            xl = xl.contiguous()
        taken = self._conv_implicit(spec, xq, xl, wr, w_shape, out_sp, scale, bias, rows,
                                    row_term) if fused else None
        if taken is not None:
            return y, taken
        if fused and wr.shape[-1] <= MAX_K_UNSIGNED:  # A packed from x: no im2col copy
            alpha = 128 if xq.signed else 0
            self._gemm(1, rows.shape[0] * math.prod(out_sp), alpha,
                       self._conv_a_packer(spec, xl, w_shape, alpha), OC, wr.shape[-1],
                       *self._b_packer(wr), dequant=(scale, bias, rows.view(1, -1, OC)))
            return y, False
        cols, _ = _im2col(xq.codes, spec, w_shape)                 # (G, M, k·Cg)
        if G == 1:
            self.gemm_f32(cols, wr, scale, bias, out=rows.view(1, -1, OC))
            return y, False
        C = self.gemm(cols, wr).permute(1, 0, 2).reshape(-1, OC)   # (M, OC): scale per group
        torch.mul(C, scale, out=rows.view(-1, OC))
        if bias is not None:
            y.add_(bias.reshape(1, -1, *([1] * d)))
        return y, False

    def eb(self, spec: SiteSpec, dyq: IntCodes, xq: IntCodes, wq: IntCodes, x_shape, w_shape,
           column_scales: bool = False):
        """``dx``. An integer GEMM where the weight's scale factors out of the sum over output
        channels (a matmul, one weight scale per tensor, or ``column_scales``: one per input
        channel), else fp32 on the reference's dequantized operands (per-output-channel weight
        scales sit on the reduction axis)."""
        if spec.kind == "matmul" or wq.scale.numel() == 1 or column_scales:
            dx = self._eb_integer(spec, dyq, wq, x_shape, w_shape)
            if dx is not None:
                return dx
        # fp32 on the reference's operands (dy's in a scratch buffer: the fp32 op consumes it)
        dy = self._dequantize_codes(dyq, "eb")
        w = wq.dequantize()
        if spec.kind == "linear":
            return dy.matmul(w)
        if spec.kind == "matmul":
            return dy.matmul(w.mT).sum_to_size(x_shape)
        n = spec.conv_dims
        # dx takes the layout of the (unused) input argument: x's, so that the elementwise
        # backward ops downstream (ReLU, BatchNorm, the residual sum) see one layout, not two
        x_like = (torch.empty_like(xq.codes, dtype=dy.dtype) if _dense_perm(xq.codes) is not None
                  else dy.new_empty(x_shape))
        return torch.ops.aten.convolution_backward(
            dy, x_like, w, None, list(spec.stride), list(spec.gemm_padding(w.shape)),
            list(spec.dilation), False, [0] * n, spec.groups, [True, False, False])[0]

    def _eb_integer(self, spec: SiteSpec, dyq: IntCodes, wq: IntCodes, x_shape, w_shape
                    ) -> torch.Tensor | None:
        """:meth:`eb` as integer GEMMs (one per 8-bit part of ``dy``'s codes), or None where it
        does not apply (a conv with a zero point, or a conv geometry without an integer form)."""
        dyq, wq = centered(dyq), centered(wq)
        parts = split_codes(dyq)
        dx = None
        if spec.kind == "conv":
            if dyq.has_zero or wq.has_zero:  # their terms would need the transposed windows
                return None
            for part in parts:
                d = self._eb_implicit(spec, part, wq, x_shape, w_shape,
                                      part.scale * wq.scale.reshape(-1))
                if d is None:
                    return None
                dx = d if dx is None else dx.add_(d)
            return dx.mul_(dyq.scale) if dyq.per_row else dx
        for part in parts:
            if spec.kind == "matmul":
                dyb, yb, _ = _matmul_batches(part.codes, wq.codes)
                d = self.gemm_f32(dyb, yb, part.scale * wq.scale)  # (G, M, K)
                d = d.reshape(*_bcast_batch(x_shape, w_shape), *d.shape[-2:])
            else:
                N = w_shape[0]
                d = self.gemm_f32(part.codes.reshape(1, -1, N), wq.codes.t().unsqueeze(0),
                                  part.scale * wq.scale.reshape(-1)
                                  ).reshape(*dyq.codes.shape[:-1], -1)
            dx = d if dx is None else dx.add_(d)
        if dyq.per_row:
            dx.mul_(dyq.scale)
        if wq.has_zero:  # sd·zw·Σ_n qd
            dx.addcmul_(_code_sums(dyq.codes, -1).unsqueeze(-1).mul_(dyq.scale),
                        wq.zero.reshape(-1))
        if dyq.has_zero:  # zd·Σ_n w
            w = wq.dequantize()
            dx.add_((w.sum(-1).unsqueeze(-2) if spec.kind == "matmul" else w.sum(0))
                    * dyq.zero)
        return dx.sum_to_size(x_shape) if spec.kind == "matmul" else dx

    def _eb_implicit(self, spec: SiteSpec, dyq: IntCodes, wq: IntCodes, x_shape, w_shape,
                     scale: torch.Tensor) -> torch.Tensor | None:
        """The error backprop of a stride-1, ungrouped 2-D conv with one weight scale, as the
        implicit-GEMM forward (:meth:`_conv_implicit`) of its transposed conv: ``dx`` is the conv
        of ``dy``, padded by ``d·(k-1) - p``, with the weights flipped in space and their two
        channel axes swapped; exact integer sums times ``scale(dy)·scale(w)``, channels-last.
        None where that does not apply (a stride, groups, per-channel scales, a padding over
        ``d·(k-1)``, no VNNI, or the forward kernel's own conditions on the channels and width)."""
        if not self._vnni or spec.conv_dims != 2 or spec.groups != 1 \
                or tuple(spec.stride) != (1, 1) or self.on_gpu(dyq.codes):
            return None
        (kh, kw), (ph, pw), (dh, dw) = w_shape[2:], spec.gemm_padding(w_shape), spec.dilation
        pad = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
        if min(pad) < 0:
            return None
        N, C, H, W = x_shape
        OC = w_shape[0]
        wt = (C, OC, kh, kw)
        w_rows = _weight_rows(wq.codes.flip(2, 3).transpose(0, 1), 1)  # (1, C, kh·kw·OC)
        dyl = dyq.codes.permute(0, 2, 3, 1).contiguous()              # (N, OH, OW, OC)
        dx = torch.empty_strided((N, C, H, W), (H * W * C, 1, W * C, C))  # channels-last
        rows = dx.permute(0, 2, 3, 1)
        transposed = SiteSpec.conv(2, 1, pad, spec.dilation)
        if self._conv_implicit(transposed, dyq, dyl, w_rows, wt, [H, W], scale, None,
                               rows) is None:
            return None
        return dx

    def gc(self, spec: SiteSpec, xq: IntCodes, dyq: IntCodes, x_shape, w_shape):
        """``dw`` (a matmul: the second operand's gradient), the sum over samples. Per-sample
        scales (a DFQ-routed site) sit on that reduction axis: one accumulation per group of
        samples sharing their scales (a matmul's samples are a batch axis: each batch entry's
        product takes its sample's scales before the sum over broadcast entries). Else one integer
        GEMM per 8-bit part of ``dy``'s codes, then the zero points' terms:
        ``Σ dy·x = sd·sx·Σqd·qx + zd·sx·Σqx + zx·Σdy``."""
        rows = xq.per_row or dyq.per_row
        if rows and spec.kind != "matmul":
            return self._gc_grouped(spec, xq, dyq, x_shape, w_shape)
        xq, dyq = centered(xq), centered(dyq)
        parts = split_codes(dyq)
        if spec.kind == "conv":  # the implicit weight gradient takes dy as signed B
            parts = [signed_b(p) for p in parts]
        dw = None
        for part in parts:
            d = self._gc_core(spec, xq, part, x_shape, w_shape)
            dw = d if dw is None else dw.add_(d)
        zeros = [z for z in [dyq.zero] + [p.zero for p in parts] if z is not None]
        terms = []
        if zeros and any(bool((z != 0).any()) for z in zeros):  # zd·sx·Σqx
            terms.append(_input_code_sums(spec, xq, x_shape, w_shape).mul_(xq.scale * sum(zeros)))
        if xq.has_zero:  # zx·Σdy
            terms.append(_gradient_sums(spec, dyq, x_shape, w_shape).mul_(xq.zero))
        if spec.kind != "matmul":
            for term in terms:
                dw = dw + term
            return dw
        # a matmul's products and terms are per batch entry, then summed over broadcast ones
        for q in (xq, dyq):
            if q.per_row:
                dw.mul_(q.scale)
        for term in terms:
            dw = dw + term
        return dw.sum_to_size(w_shape)

    def _gc_grouped(self, spec: SiteSpec, xq: IntCodes, dyq: IntCodes, x_shape, w_shape):
        """:meth:`gc` summed over the groups of samples whose (x, dy) scales are equal."""
        n = x_shape[0]
        keys = torch.stack([xq.scale.reshape(-1).expand(n), dyq.scale.reshape(-1).expand(n)], 1)
        scales, group = torch.unique(keys, dim=0, return_inverse=True)
        dw = None
        for j in range(scales.shape[0]):
            rows = (group == j).nonzero().flatten()
            sub_x = IntCodes(_take_rows(xq.codes, rows), scales[j, 0].reshape(1), xq.signed,
                             xq.zero, _row_value(xq.qmax, rows), xq.offset)
            sub_dy = IntCodes(_take_rows(dyq.codes, rows), scales[j, 1].reshape(1), dyq.signed,
                              dyq.zero, _row_value(dyq.qmax, rows), dyq.offset)
            d = self.gc(spec, sub_x, sub_dy, (len(rows), *x_shape[1:]), w_shape)
            dw = d if dw is None else dw.add_(d)
        return dw

    def _gc_core(self, spec: SiteSpec, xq: IntCodes, dyq: IntCodes, x_shape, w_shape):
        """The integer part of :meth:`gc` for 8-bit codes with scales per tensor (per sample: 1,
        applied by the caller); a matmul's is per broadcast batch entry, not yet summed."""
        scale = _scalar_scale(xq) * _scalar_scale(dyq)
        # dw = dyᵀ·x: A = dyᵀ (the smaller operand is transposed by the pack kernel), B = xᵀ,
        # which the pack kernel reads in 16-byte rows of x — no transpose of the activations
        if spec.kind == "linear":
            K, N = x_shape[-1], w_shape[0]
            dyt = dyq.codes.reshape(-1, N).t().unsqueeze(0)        # (1, N, M)
            xt = xq.codes.reshape(-1, K).t().unsqueeze(0)          # (1, K, M)
            return self.gemm_f32(dyt, xt, scale)[0]
        if spec.kind == "matmul":
            xb, dyb, _ = _matmul_batches(xq.codes, dyq.codes)
            dw = self.gemm_f32(xb.mT, dyb.mT, scale)               # (G, K, N)
            return dw.reshape(*_bcast_batch(x_shape, w_shape), *dw.shape[-2:])
        G, OC = spec.groups, w_shape[0]
        n = spec.conv_dims
        dyl = dyq.codes.permute(0, *range(2, 2 + n), 1).reshape(-1, G, OC // G)  # (M, G, OCg)
        xl = xq.codes.permute(0, *range(2, 2 + n), 1)
        fused = n == 2 and G == 1 and not self.on_gpu(xl)
        if fused:  # as in fw: channels-last codes (a byte copy when they are not)
            xl = xl.contiguous()
        dw = self._gc_implicit(spec, xq, dyq, xl, w_shape, scale) if fused else None
        if dw is not None:
            return dw
        if fused:  # B packed from x
            flip = 0 if xq.signed else 128
            C = self._gemm(1, OC, *self._a_packer(dyl.permute(1, 2, 0)),  # A = dyᵀ (1, OC, M)
                           w_shape[1] * math.prod(w_shape[2:]), dyl.shape[0], flip,
                           self._conv_patch_packer(spec, xl, w_shape, flip),
                           dequant=(scale, None, None))
        else:
            cols, _ = _im2col(xq.codes, spec, w_shape)              # (G, M, k·Cg)
            C = self.gemm_f32(dyl.permute(1, 2, 0), cols.mT, scale)  # (G, OCg, k·Cg)
        ks = list(w_shape[2:])
        dw = C.reshape(OC, *ks, w_shape[1])                         # (OC, k..., Cg)
        return dw.permute(0, n + 1, *range(1, n + 1))


    # -- operand packers ---------------------------------------------------------------------------
    def _conv_patch_packer(self, spec: SiteSpec, xl: torch.Tensor, w_shape, flip: int):
        """``pack_b`` for a 2-D conv's weight gradient: B = the im2col patches of the channels-last
        codes ``xl (N, H, W, C)``, built and packed by one TVM kernel per chunk."""
        geo = _conv2d_geometry(spec, xl, w_shape)
        src = xl.view(torch.uint8)

        def pack_b(k0, kc, np_, kp):
            out = self.scratch("b", (1, np_ // 16, kp // 4, 16, 4), torch.uint8)
            ref = KernelRef("pack_conv_b", (*geo, k0, kc, np_ // 16, kp // 4))
            if self.recorder is not None:  # A = dyᵀ is always signed: only B's sign varies
                m = self._variants[-1][1]
                self.recorder.conv_pack(geo, k0, kc, [v for v in self._variants if v[1] == m],
                                        self.where, side="b")
            self.kernel(ref)(src, _flip(flip), out)
            return out.view(torch.int8)

        return pack_b

    def _conv_a_packer(self, spec: SiteSpec, xl: torch.Tensor, w_shape, flip: int):
        """``pack_a`` for a 2-D conv's forward GEMM: A = the im2col patches of the channels-last
        codes ``xl (N, H, W, C)``, padded, flipped and packed by one TVM kernel (the reduction is
        never split: the caller keeps it under the GEMM's limit)."""
        geo = _conv2d_geometry(spec, xl, w_shape)
        src = xl.reshape(-1).view(torch.uint8)

        def pack_a(k0, kc, mp, kp):
            if (k0, kc) != (0, math.prod(w_shape[1:])):
                raise AssertionError(f"conv A pack of columns {k0}..{k0 + kc}: split reduction")
            out = self.scratch("a", (1, mp, kp), torch.uint8)
            if self.recorder is not None:  # B = w is always signed: only A's sign varies
                n = self._problem[2]
                self.recorder.conv_pack(geo, k0, kc, [v for v in self._variants if v[2] == n],
                                        self.where, side="a")
            self.kernel(KernelRef("pack_conv_a", (*geo, mp, kp)))(src, _flip(flip), out.view(-1))
            return out

        return pack_a

    def _a_packer(self, a: torch.Tensor):
        """``(alpha, pack_a)`` for int8/uint8 codes ``a (G, M, K)``: signed codes are shifted by
        128."""
        alpha = 128 if a.dtype == torch.int8 else 0
        a8 = a.view(torch.uint8)
        return alpha, lambda k0, kc, mp, kp: _pack_a(a8[..., k0:k0 + kc], alpha, mp, kp,
                                                     self.kernel, self.scratch)

    def _b_packer(self, b: torch.Tensor):
        """``(beta, pack_b)`` for int8/uint8 codes ``b (G, N, K)``: unsigned codes are shifted by
        -128."""
        beta = 128 if b.dtype == torch.uint8 else 0
        b8 = b.view(torch.uint8)
        return beta, lambda k0, kc, np_, kp: _pack_b(b8[..., k0:k0 + kc], beta, np_, kp,
                                                     self.kernel, self.scratch)


def _conv2d_geometry(spec: SiteSpec, xl: torch.Tensor, w_shape) -> tuple[int, ...]:
    """N, H, W, C, kh, kw, strides, paddings, dilations, OH, OW of a 2-D conv on ``xl (N, H, W, C)``
    (the static arguments of the conv pack kernels)."""
    N, H, W, C = xl.shape
    (sh, sw), (dh, dw), (ph, pw) = spec.stride, spec.dilation, spec.gemm_padding(w_shape)
    return (N, H, W, C, *w_shape[2:], sh, sw, ph, pw, dh, dw,
            *_out_sizes(spec, (H, W), w_shape))


@functools.lru_cache(maxsize=None)  # read-only kernel arguments: made once, not per call
def _flip(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.uint8)


def _source(t: torch.Tensor, direct: str, transposed: str) -> tuple[str, torch.Tensor]:
    """A dense tensor holding the 3-D view ``t`` and its layout name: ``t`` itself, the tensor
    ``t`` is a transposed view of (the pack kernels read either), or a contiguous copy."""
    if t.is_contiguous():
        return direct, t
    if t.mT.is_contiguous():
        return transposed, t.mT
    return direct, t.contiguous()


def _pack_a(a: torch.Tensor, flip: int, mp: int, kp: int, kernel=_jit_kernel,
            scratch=None) -> torch.Tensor:
    """``A (G, mp, kp)`` u8 for the GEMM from the (G, M, K) byte view ``a`` (no copy when it is
    already that), into ``scratch("a", shape, dtype)`` when given (see
    :meth:`TVMBackend.scratch`)."""
    G, M, K = a.shape
    if a.is_contiguous() and not flip and (M, K) == (mp, kp):
        return a
    layout, src = _source(a, "mk", "km")
    out = (scratch or _fresh)("a", (G, mp, kp), torch.uint8)
    kernel(KernelRef("pack_a", (layout,), _serial(2 * out.numel())))(src, _flip(flip), out)
    return out


def _pack_b(b: torch.Tensor, flip: int, np_: int, kp: int, kernel=_jit_kernel,
            scratch=None) -> torch.Tensor:
    """``B (G, np/16, kp/4, 16, 4)`` s8 from the (G, N, K) byte view ``b`` (into ``scratch`` as
    :func:`_pack_a`)."""
    G = b.shape[0]
    layout, src = _source(b, "nk", "kn")
    out = (scratch or _fresh)("b", (G, np_ // 16, kp // 4, 16, 4), torch.uint8)
    kernel(KernelRef("pack_b", (layout,), _serial(2 * out.numel())))(src, _flip(flip), out)
    return out.view(torch.int8)


def _fresh(slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _bcast_batch(x_shape, y_shape) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(tuple(x_shape[:-2]), tuple(y_shape[:-2])))


def _matmul_batches(x: torch.Tensor, y: torch.Tensor):
    """``x (..., M, K)`` and ``y (..., K, N)`` broadcast and flattened to ``(G, M, K)``,
    ``(G, K, N)``; also returns the batch shape."""
    if x.dim() < 2 or y.dim() < 2:
        raise ValueError("matmul kernels need operands of at least 2 dimensions")
    batch = _bcast_batch(x.shape, y.shape)
    xb = x.expand(*batch, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    yb = y.expand(*batch, *y.shape[-2:]).reshape(-1, *y.shape[-2:])
    return xb, yb, batch


def _weight_rows(codes: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv weight codes ``(OC, Cg, k...)`` as GEMM rows ``(G, OCg, k·Cg)`` in im2col's order."""
    n = codes.dim() - 2
    w = codes.permute(0, *range(2, 2 + n), 1)                      # (OC, k..., Cg)
    return w.reshape(groups, codes.shape[0] // groups, -1)


def _im2col(codes: torch.Tensor, spec: SiteSpec, w_shape) -> tuple[torch.Tensor, list[int]]:
    """Patches of ``codes (N, C, *spatial)`` as ``(G, N·P, k·Cg)``: channels innermost, so each
    kernel offset copies whole channel vectors (a strided NCHW im2col of int8 is many times slower);
    the zero padding is code 0 (symmetric scheme). The channels-last codes are padded once, and
    the patches are one strided view of them, materialized by one copy, faster than a copy per
    kernel offset (``bench/packing.py``)."""
    n = spec.conv_dims
    pad, ks = spec.gemm_padding(w_shape), list(w_shape[2:])
    N, C, *size = codes.shape
    xl = codes.permute(0, *range(2, 2 + n), 1)                      # (N, S..., C) view
    out_sp = _out_sizes(spec, size, w_shape)
    if any(pad):  # F.pad's spec runs from the last dim: C (none), then S_n .. S_1
        xl = F.pad(xl, [0, 0] + [p for d in reversed(range(n)) for p in (pad[d], pad[d])])
    st = xl.stride()
    patches = xl.as_strided(
        (N, *out_sp, *ks, C),
        (st[0], *(st[1 + d] * spec.stride[d] for d in range(n)),
         *(st[1 + d] * spec.dilation[d] for d in range(n)), st[-1]))
    G = spec.groups
    M, kp = N * math.prod(out_sp), math.prod(ks)
    cols = patches.reshape(M, kp * C)                               # the one copy
    if G == 1:
        return cols.view(1, M, kp * C), out_sp
    cols = cols.view(M, kp, G, C // G).permute(2, 0, 1, 3).reshape(G, M, kp * (C // G))
    return cols, out_sp


def _dequantize(C: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``C * scale + bias`` in fp32 with torch ops (the GPU's and long reductions' epilogue)."""
    y = torch.mul(C, scale.reshape(-1))
    if bias is not None:
        y.add_(bias)
    return y if out is None else out.copy_(y)


def make_tvm_backend(options: dict) -> TVMBackend:
    """The backend for :func:`fraccompile.ops.get_backend` options (``kernels``, ``tuning_db``,
    ``kernels_fallback``; see :class:`fraccompile.FracConfig`)."""
    unknown = set(options) - {"kernels", "tuning_db", "kernels_fallback"}
    if unknown:
        raise ValueError(f"unknown tvm backend option(s) {sorted(unknown)}")
    tuning = None
    if options.get("tuning_db"):
        from .tuning import TuningDB
        tuning = TuningDB(options["tuning_db"])
    if options.get("kernels"):
        from .export import ExportedKernels
        provider = ExportedKernels(options["kernels"], bool(options.get("kernels_fallback")),
                                   tuning=tuning)
    else:
        provider = JitKernels(tuning=tuning)
    backend = TVMBackend(kernels=provider, options=sorted(options.items()))
    if options.get("kernels"):  # GPU tensors take their kernels from the same directory
        from .cuda_driver import CudaGemm
        backend._cuda = CudaGemm(library=provider.cuda_library)
    return backend
