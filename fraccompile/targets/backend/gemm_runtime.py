"""The integer GEMMs and implicit convs a backend runs (:class:`IntegerGemms`), on the scratch
buffers and kernel provider of the class that mixes it in (:class:`.tvm_backend.TVMBackend`), and the
operand packers they use.

One batched GEMM ``C[g] = A[g]·B[g]ᵀ`` with A u8 and B s8 (see :mod:`..kernels.gemm`), its operands given
by packers (a dense code tensor, the im2col patches of channels-last conv codes); the implicit-GEMM
convs of :mod:`..kernels.conv` (forward and weight gradient) read padded codes instead of a patch matrix.
:mod:`.roles` expresses a site's forward, error backprop and weight gradient with these.

Signs: a signed A (activations with negatives, gradients) is shifted by +128 into u8 (an XOR of
the sign bit) and an unsigned 8-bit B by -128 into s8; ``C = C' + β·Σa - α·Σb + αβK`` undoes it.
"""

from __future__ import annotations

import functools
import math

import torch

from ...ops.spec import SiteSpec
from ..kernels import conv, gemm
from ..runtime.library import KernelRef
from .affine import _channel_sums, _exact_sums, _out_sizes
from .codes import IntCodes, _jit_kernel, _serial

MAX_K = 65_536  # |C'| <= 255·128·K must stay below 2**31
MAX_K_UNSIGNED = 33_025  # both operands unsigned: the sum itself (<= 255²·K) must fit


class IntegerGemms:
    """The integer GEMMs and implicit convs a backend runs, on the scratch buffers and kernel
    provider of the class that mixes it in: it provides ``kernels`` (the kernel provider),
    ``recorder``, ``where``, :meth:`~.backend.TVMBackend.scratch`,
    :meth:`~.backend.TVMBackend.kernel`, ``on_gpu``, ``cuda`` and ``_padded_codes``."""

    # -- the integer GEMM --------------------------------------------------------------------------
    def gemm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact ``a @ bᵀ`` per group for int8/uint8 codes ``a (G, M, K)`` and ``b (G, N, K)``,
        as int32 ``(G, M, N)`` (int64 when ``K`` is split into int32-safe chunks)."""
        if self.on_gpu(a):
            return self.cuda.gemm(a, b)
        return self._gemm(*a.shape[:2], *self._a_packer(a), *b.shape[1:], *self._b_packer(b))

    def gemm_f32(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        offsets: tuple | None = None,
        operands: tuple | None = None,
        row_term: tuple | None = None,
    ) -> torch.Tensor:
        """``(a @ bᵀ) * scale + bias`` in fp32, ``(G, M, N)``: :meth:`gemm`'s exact integer product
        dequantized (``scale``: one value or one per column ``N``; ``bias``: per column). On the
        CPU the sign corrections, the scale and the bias are one fused kernel pass; ``out``: a
        contiguous fp32 ``(G, M, N)`` to write into (e.g. a view of the caller's buffer).
        ``offsets``: ``(a's, b's)`` per-row device code offsets of GPU codes (None each for none;
        see :meth:`..runtime.cuda_driver.CudaGemm.gemm`), corrected exactly in the GEMM;
        ``operands``: ``(a's, b's)`` padded GEMM operands ``a`` and ``b`` are views of
        (:attr:`.codes.IntCodes.operand`), taken as they are when both are given.
        ``row_term``: ``(p (G, M), t (N,))`` fp32, a rank-one term ``p[g, m]·t[n]`` added before
        the bias (on the CPU in the same kernel pass). On the GPU, one tensor-core kernel with
        the dequantize in its write-back where it applies (:func:`..runtime.cuda_epilogue.gemm_f32`),
        else the GEMM then torch ops."""
        if self.on_gpu(a):
            from ..runtime import cuda_epilogue

            y = cuda_epilogue.gemm_f32(self.cuda, a, b, scale, bias, out, offsets, operands, row_term)
            if y is not None:
                return y
            c = self.cuda.gemm(a, b, *(offsets or (None, None)), padded=operands)
            return _dequantize(c, scale, bias, out, row_term)
        if offsets is not None and any(o is not None for o in offsets):
            raise ValueError("device code offsets on CPU tensors")
        y = self._gemm_dq(a, b, scale, bias, out, row_term)
        if y is not None:
            return y
        return self._gemm(
            *a.shape[:2],
            *self._a_packer(a),
            *b.shape[1:],
            *self._b_packer(b),
            dequant=(scale, bias, out, row_term),
        )

    def _gemm_dq(self, a, b, scale, bias, out, row_term) -> torch.Tensor | None:
        """:meth:`gemm_f32` on the CPU as one kernel, the dequantize in the GEMM's write-back
        (:func:`..kernels.gemm.definition`'s epilogue), where it applies: an AVX-512 VNNI host, a
        reduction within the exact-sum limit, and a tile that pads no column. Where the tile pads
        rows, the kernel writes a taller output whose first ``M`` rows are returned (one group and
        no ``out`` only, so the result stays contiguous). The sign corrections come from the
        operands' row sums instead of ones rows in the product. None where it does not apply."""
        G, M, K = a.shape
        N = b.shape[1]
        a_shift, b_shift = (128 if a.dtype == torch.int8 else 0), (128 if b.dtype == torch.uint8 else 0)
        if not self._vnni or K > (MAX_K_UNSIGNED if b_shift and not a_shift else MAX_K):
            return None
        # one group: the tile of the problem the int32 path runs for a signed A (a ones row
        # more; A is copied to flip its signs either way, so a tile that pads rows costs no extra
        # copy, and tuned tiles carry over); several: the problem's own, which must pad no row
        problem = (G, M + 1 if a_shift and G == 1 else M, N, K)
        if self.recorder is not None:  # noted with the true M: export builds it for either sign
            # of A (another batch's codes may be unsigned) at its provider's tiles
            # (:func:`..tools.export.kernel_refs`)
            self.recorder.problem(problem, [(G, M, N, K), (G, M + 1, N, K)], self.where)
            true = gemm.GemmShape(G, M, N, K, gemm.default_tile(M, N, K))
            self.recorder.kernel(KernelRef.gemm_dq(true, row_term is not None), self.where)
        shape = self.kernels.gemm_shape(*problem, where=self.where)
        Mp = shape.m
        if shape.n != N or (Mp != M and (G > 1 or out is not None)):
            return None
        # C' = sum (a + α)(b - β) = C - β·Σa + α·Σb - αβK: add back β·Σa per row, -α·(Σb - βK) per column
        a_sums = _row_sums(a, self.kernel) if b_shift else None
        b_sums = _row_sums(b, self.kernel) if a_shift else None
        if (b_shift and a_sums is None) or (a_shift and b_sums is None):
            return None  # the ones rows give these sums for free
        _, pack_a = self._a_packer(a)
        _, pack_b = self._b_packer(b)
        A, Bp = pack_a(0, K, Mp, shape.k), pack_b(0, K, N, shape.k)
        rc = torch.zeros((G, Mp), dtype=torch.int32)
        if b_shift:
            rc[:, :M] = a_sums.mul_(b_shift)
        cc = (b_sums - b_shift * K).mul_(-a_shift) if a_shift else torch.zeros((G, N), dtype=torch.int32)
        y = out if out is not None else torch.empty((G, Mp, N))
        if row_term is not None and Mp != M:  # the term's rows padded as the product's
            p = row_term[0].reshape(G, M)
            row_term = (torch.cat([p, p.new_zeros(G, Mp - M)], 1), row_term[1])
        scale, bias, extra = _epilogue_args(scale, bias, row_term, G, Mp, N)
        self.kernel(KernelRef.gemm_dq(shape, row_term is not None))(A, Bp, rc, cc, scale, bias, *extra, y)
        return y if Mp == M else y[:, :M]

    def affine_matmul(
        self, aq: IntCodes, bq: IntCodes, ta: bool = False, tb: bool = False
    ) -> torch.Tensor | None:
        """``op(a) @ op(b)`` of two affine operands (``op``: transposed where ``ta``/``tb``), batch
        dims broadcast, by :meth:`affine_gemm`: a matmul site's forward (``x @ y``), error backprop
        (``dy @ yᵀ``) and weight gradient (``xᵀ @ dy``), before any sum over broadcast entries.
        Scales and zero points are per tensor or per sample (a routed site's: dim 0, the leading
        batch dim), so per batch entry. None where :meth:`affine_gemm` does not apply: GPU codes,
        no zero point (the plain GEMM serves), codes wider than a byte or with an offset, per-sample
        values of an operand without the leading batch dim."""
        if self.on_gpu(aq.codes) or aq.has_offset or bq.has_offset or not (aq.has_zero or bq.has_zero):
            return None
        if aq.codes.element_size() != 1 or bq.codes.element_size() != 1:
            return None
        ab, bb, batch = _matmul_batches(aq.codes, bq.codes)
        entries = [_per_entry(v, q.codes.dim(), batch) for q in (aq, bq) for v in (q.scale, q.zero)]
        if any(e is False for e in entries):
            return None
        y = self.affine_gemm(ab.mT if ta else ab, bb if tb else bb.mT, *entries)
        return None if y is None else y.reshape(*batch, *y.shape[-2:])

    def affine_gemm(self, a: torch.Tensor, b: torch.Tensor, sa, za, sb, zb) -> torch.Tensor | None:
        """``Σ_k (za + sa·a[g, m, k])·(zb + sb·b[g, n, k])`` in fp32 ``(G, M, N)``: the product of
        two affine operands, byte codes ``a (G, M, K)`` and ``b (G, N, K)`` (no code offset:
        :func:`.codes.centered`), with a scale and a zero point per group, fp32 ``(G,)``.
        Expanded, ``sa·sb·Σab + sa·zb·Σa + za·sb·Σb + K·za·zb``: one GEMM gives the integer
        product and B's code sums (a ones row in A at ``M``); A's come from the ``row_sums`` kernel
        where A is dense, else from a ones row in B at ``N``; one dequantize pass (variant
        ``"affine"``) scales each group and adds the row and the column terms. None past the exact
        int32 limit of the reduction."""
        G, M, K = a.shape
        N = b.shape[1]
        a_shift, pack_a = self._a_packer(a)
        b_shift, pack_b = self._b_packer(b)
        if K > (MAX_K_UNSIGNED if b_shift and not a_shift else MAX_K):
            return None
        sum_a = _row_sums(a, self.kernel)
        problem = (G, M + 1, N + (sum_a is None), K)
        if self.recorder is not None:
            self.recorder.problem(problem, [problem], self.where)
        shape = self.kernels.gemm_shape(*problem, where=self.where)
        C = self.scratch("c", (G, shape.m, shape.n), torch.int32)
        self.kernel(KernelRef.gemm(shape))(pack_a(0, K, shape.m, shape.k), pack_b(0, K, shape.n, shape.k), C)
        # the ones rows: C[:, :M, N] = Σ(a + α), C[:, M, :N] = Σ(b - β); Σab = C + βΣa - αΣb + αβK
        sum_a = C[:, :M, N] - a_shift * K if sum_a is None else sum_a
        sum_b = C[:, M, :N] + b_shift * K
        rc = sum_a * b_shift
        cc = sum_b * -a_shift + a_shift * b_shift * K
        # the row term sa·zb·Σa as p·t, the column term za·sb·Σb + K·za·zb as the bias
        bias = sum_b.float().mul_((za * sb).unsqueeze(1)).add_((za * zb * K).unsqueeze(1))
        out = torch.empty((G, M, N))
        ref = KernelRef("dequant", ("affine",), serial=_serial(G * M * N * 8))
        p = sum_a.float().contiguous()
        self.kernel(ref)(C, rc.contiguous(), cc.contiguous(), sa * sb, bias, p, sa * zb, out)
        return out

    def _gemm(
        self, G: int, M: int, a_shift: int, pack_a, N: int, K: int, b_shift: int, pack_b, dequant=None
    ) -> torch.Tensor:
        """:meth:`gemm` with the operands given by packers ``pack_a(k0, kc, Mp, Kp)`` and
        ``pack_b(k0, kc, Np, Kp)``: reduction columns ``k0 .. k0+kc``, padded, sign-flipped by
        ``a_shift`` / ``b_shift``, with a ones row at ``M`` / ``N`` when there is room. ``dequant``:
        ``(scale, bias, out[, row_term])`` of :meth:`gemm_f32` (None: the int32 product)."""
        max_k = MAX_K_UNSIGNED if b_shift and not a_shift else MAX_K
        if K > max_k:  # split the reduction so no int32 partial sum can overflow
            out = None
            for k0 in range(0, K, max_k):
                kc = min(max_k, K - k0)
                part = self._gemm(
                    G,
                    M,
                    a_shift,
                    lambda j0, jc, mp, kp, k0=k0: pack_a(k0 + j0, jc, mp, kp),
                    N,
                    kc,
                    b_shift,
                    lambda j0, jc, np_, kp, k0=k0: pack_b(k0 + j0, jc, np_, kp),
                )
                out = part.long() if out is None else out.add_(part)
            return out if dequant is None else _dequantize(out, *dequant)
        # the sign corrections need B's row sums (A shifted) and A's (B shifted): an extra row of
        # ones in A, resp. in B, makes the kernel return them with the product
        problem = (G, M + 1 if a_shift else M, N + 1 if b_shift else N, K)
        if self.recorder is not None:  # the other signs: a ones row more or less on either side
            self._variants = [(G, M + i, N + j, K) for i in (0, 1) for j in (0, 1)]
            self._problem = problem
            self.recorder.problem(problem, self._variants, self.where)
        shape = self.kernels.gemm_shape(*problem, where=self.where)
        A = pack_a(0, K, shape.m, shape.k)
        Bp = pack_b(0, K, shape.n, shape.k)
        # the product is a temporary when the epilogue consumes it here, else the result
        C = (
            self.scratch("c", (G, shape.m, shape.n), torch.int32)
            if dequant is not None
            else torch.empty((G, shape.m, shape.n), dtype=torch.int32)
        )
        self.kernel(KernelRef.gemm(shape))(A, Bp, C)
        if dequant is not None:  # C[m, n] + rc[m] + cc[n], the same sums as below, then scaled
            scale, bias, out, *row_term = dequant
            rc = (C[:, :M, N] - a_shift * K) * b_shift if b_shift else C.new_zeros((G, M))
            cc = C[:, M, :N] * -a_shift if a_shift else C.new_zeros((G, N))
            return self._dequant(C, rc, cc, scale, bias, out, G, M, N, *row_term)
        if a_shift:  # row M: sum_k (b - b_shift)  ->  sum_k b = C[M] + b_shift*K
            b_sums = C[:, M : M + 1, :N] + b_shift * K
        if b_shift:  # column N: sum_k (a + a_shift)  ->  sum_k a = C[:, :, N] - a_shift*K
            a_sums = C[:, :M, N : N + 1] - a_shift * K
        C = C[:, :M, :N]
        if b_shift:
            C += b_shift * a_sums
        if a_shift:
            C -= a_shift * b_sums
            if b_shift:
                C += a_shift * b_shift * K
        return C

    def _dequant(self, C, rc, cc, scale, bias, out, G: int, M: int, N: int, row_term=None) -> torch.Tensor:
        """``out[g, m, n] = (C[g, m, n] + rc[g, m] + cc[g, n]) · scale[n] + bias[n]`` in fp32, one
        TVM kernel pass (``C`` may be padded past ``M`` and ``N``); ``row_term`` ``(p, t)`` adds
        ``p[g, m]·t[n]`` before the bias in the same pass."""
        scale, bias, extra = _epilogue_args(scale, bias, row_term, G, M, N)
        out = out if out is not None else torch.empty((G, M, N))
        ref = KernelRef("dequant", ("rank1",) if extra else (), serial=_serial(G * M * N * 8))
        self.kernel(ref)(C, rc.contiguous(), cc.contiguous(), scale, bias, *extra, out)
        return out

    @property
    def _vnni(self) -> bool:
        """Whether the kernel provider builds for AVX-512 VNNI (the implicit-GEMM convs' ISA)."""
        host = getattr(self.kernels, "host", None)
        return host is not None and host.isa == "avx512-vnni"

    def _conv_implicit(
        self,
        spec: SiteSpec,
        xq: IntCodes,
        xl: torch.Tensor,
        wr: torch.Tensor,
        w_shape,
        out_sp,
        scale,
        bias,
        rows: torch.Tensor,
        row_term=None,
    ) -> bool | None:
        """The forward of a 2-D conv as an implicit GEMM (:mod:`..kernels.conv`) into ``rows (N·OH·OW,
        OC)``: the codes ``xl (N, H, W, C)`` padded and sign-flipped once, no patch matrix. None
        (nothing done) where it does not apply: no VNNI, ``C`` not a multiple of 4, or no register
        block dividing the output width; else whether ``row_term`` (``(r, t)``: ``r (N, 1, OH,
        OW)·t`` per channel, see :meth:`fw`) was added in the write-back."""
        if not self._vnni:
            return None
        shape = conv.forward_shape(
            xl.shape, w_shape, spec.stride, spec.gemm_padding(w_shape), spec.dilation, out_sp, MAX_K
        )
        if shape is None:
            return None
        N, H, W, Cin = xl.shape
        OC, K = wr.shape[1:]
        (ph, pw), flip = spec.gemm_padding(w_shape), 128 if xq.signed else 0
        # a tap outside the image reads code 0, flipped as the codes are
        X = self._padded_codes("x", (N, shape.hp, shape.wp, Cin), 1, (ph, pw), xl.view(torch.uint8), flip)
        _, pack_b = self._b_packer(wr)  # w is signed: no flip
        Bp = pack_b(0, K, shape.ocp, K)
        # A was shifted by +flip: subtract flip·(the weight row's code sum) per output channel
        cc = wr.sum(-1, dtype=torch.int32) * -flip if flip else torch.zeros((1, OC), dtype=torch.int32)
        M = N * math.prod(out_sp)
        if shape.ocp == OC:  # the dequantize in the kernel's write-back: fp32 rows, one pass
            ref = KernelRef("conv_dqz" if row_term is not None else "conv_dq", shape.args)
            extra = (
                ()
                if row_term is None
                else (
                    row_term[0].reshape(N, *out_sp).contiguous(),
                    row_term[1].reshape(-1).float().expand(OC).contiguous(),
                )
            )
            self.kernel(ref)(
                X,
                Bp[0],
                cc[0],
                scale.reshape(-1).float().expand(OC).contiguous(),
                bias.float().contiguous() if bias is not None else torch.zeros(OC),
                *extra,
                rows.view(N, *out_sp, OC),
            )
            return row_term is not None
        C = self.scratch("c", (1, M, shape.ocp), torch.int32)
        ref = KernelRef("conv", shape.args)
        self.kernel(ref)(X, Bp[0], C.view(N, *out_sp, shape.ocp))
        self._dequant(C, C.new_zeros((1, M)), cc, scale, bias, rows.view(1, M, OC), 1, M, OC)
        return False

    def _gc_implicit(
        self, spec: SiteSpec, xq: IntCodes, dyq: IntCodes, xl: torch.Tensor, w_shape, scale
    ) -> torch.Tensor | None:
        """The weight gradient of a stride-1 2-D conv as an implicit GEMM
        (:func:`..kernels.conv.gc_definition`): the codes ``xl (N, H, W, C)`` as padded, sign-flipped
        planes, ``dy`` packed as B, no patch matrix; the reduction over positions runs in batch
        chunks that keep the int32 sums exact.
        None where it does not apply (no VNNI, a stride, an output width not a multiple of 4, or
        one image's positions over the exact-sum limit)."""
        OH, OW = dyq.codes.shape[2:]
        shapes = (
            conv.gc_shapes(
                xl.shape, w_shape, spec.stride, spec.gemm_padding(w_shape), spec.dilation, (OH, OW), MAX_K
            )
            if self._vnni
            else None
        )
        if shapes is None:
            return None
        N, H, W, Cin = xl.shape
        OC, per, ocp = w_shape[0], OH * OW, shapes[0].ocp
        (ph, pw), flip = spec.gemm_padding(w_shape), 128 if xq.signed else 0
        # the transposing copy, then the flip in place over the dense planes (an XOR straight
        # into the strided interior goes through a temporary and a second copy)
        XT = self._padded_codes(
            "xt",
            (N, Cin, H + 2 * ph, W + 2 * pw),
            2,
            (ph, pw),
            xl.view(torch.uint8).permute(0, 3, 1, 2),
            flip,
        )
        dy = dyq.codes.permute(0, 2, 3, 1).reshape(N * per, OC)  # (positions, OC)
        total, b0 = None, 0
        for shape in shapes:  # batch chunks
            nc = shape.n
            _, pack_b = self._b_packer(dy[b0 * per : (b0 + nc) * per].t().unsqueeze(0))
            Bp = pack_b(0, nc * per, ocp, nc * per)
            ref = KernelRef("gc", shape.args)
            C = self.scratch("c", (*w_shape[2:], Cin, ocp), torch.int32)
            self.kernel(ref)(XT[b0 : b0 + nc], Bp[0], C)
            if len(shapes) == 1 and not flip:  # one chunk's int32 sum is exact as it is
                total = C
            else:
                total = C.long() if total is None else total.add_(C)
            b0 += nc
        # A was shifted by +flip: subtract flip·(the sum of dy over positions) per output channel
        total = total[..., :OC] - flip * _channel_sums(dyq.codes, 1, self.kernel) if flip else total[..., :OC]
        dw = (total.float() * scale).permute(3, 0, 1, 2).contiguous()  # (OC, kh, kw, C)
        return dw.permute(0, 3, 1, 2)

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
                self.recorder.conv_pack(
                    geo, k0, kc, [v for v in self._variants if v[1] == m], self.where, side="b"
                )
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
                self.recorder.conv_pack(
                    geo, k0, kc, [v for v in self._variants if v[2] == n], self.where, side="a"
                )
            self.kernel(KernelRef("pack_conv_a", (*geo, mp, kp)))(src, _flip(flip), out.view(-1))
            return out

        return pack_a

    def _a_packer(self, a: torch.Tensor):
        """``(a_shift, pack_a)`` for int8/uint8 codes ``a (G, M, K)``: signed codes are shifted by
        128."""
        a_shift = 128 if a.dtype == torch.int8 else 0
        a8 = a.view(torch.uint8)
        return a_shift, lambda k0, kc, mp, kp: _pack_a(
            a8[..., k0 : k0 + kc], a_shift, mp, kp, self.kernel, self.scratch
        )

    def _b_packer(self, b: torch.Tensor):
        """``(b_shift, pack_b)`` for int8/uint8 codes ``b (G, N, K)``: unsigned codes are shifted by
        -128."""
        b_shift = 128 if b.dtype == torch.uint8 else 0
        b8 = b.view(torch.uint8)
        return b_shift, lambda k0, kc, np_, kp: _pack_b(
            b8[..., k0 : k0 + kc], b_shift, np_, kp, self.kernel, self.scratch
        )


def _gemm_offset(q: IntCodes, lead, groups: bool = False) -> torch.Tensor | None:
    """The GEMM operand's per-row code offset of ``q`` (a device offset, kept by
    :func:`.codes.centered`; None for none): broadcast over the operand's leading dims ``lead``
    (one value, or one per sample along dim 0) and shaped to the GEMM's ``(G, rows)``: the rows
    (``groups`` False: ``(1, Π lead)``) or the groups (``groups``: ``(Π lead, 1)``, a matmul's
    broadcast batch)."""
    if not isinstance(q.offset, torch.Tensor):
        return None
    off = q.offset
    if off.numel() == 1:
        return off.reshape(1, 1)
    lead = tuple(lead)
    if groups and len(lead) != off.dim() - 2:  # the samples must lead the broadcast batch
        raise ValueError(f"per-sample offsets {tuple(off.shape)} for a batch {lead}")
    off = off.reshape(off.shape[: len(lead)] if off.dim() >= len(lead) else off.shape)
    full = torch.broadcast_to(off.reshape(off.shape[0], *([1] * (len(lead) - 1))), lead).reshape(-1)
    return full.reshape(-1, 1) if groups else full.reshape(1, -1)


def _per_entry(v: torch.Tensor | None, ndim: int, batch) -> torch.Tensor | bool:
    """A matmul operand's scale or zero point ``v`` (None: 0, one value, or one per sample: dim 0 of
    an ``ndim``-d operand, ``(N, 1, ...)``) as fp32 per entry of the broadcast ``batch``, ``(G,)``;
    False where per-sample values do not lead the batch (an operand without all its batch dims)."""
    G = math.prod(batch)
    if v is None:  # no zero point: 0
        return torch.zeros(G)
    if v.numel() == 1:
        return v.reshape(1).float().expand(G)
    if not batch or ndim - 2 != len(batch) or v.shape[0] != batch[0] or v.numel() != batch[0]:
        return False  # (a 2-D operand's samples are its rows, not a batch entry)
    return v.reshape(-1, *([1] * (len(batch) - 1))).float().expand(*batch).reshape(G)


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


def _epilogue_args(scale, bias, row_term, G: int, M: int, N: int) -> tuple:
    """The dequantize epilogue's fp32 arguments: ``scale`` and ``bias`` per column, and
    ``row_term`` ``(p (G, M), t)`` as ``(p, t per column)`` (empty without one)."""
    scale = scale.reshape(-1).float().expand(N).contiguous()
    bias = bias.float().contiguous() if bias is not None else scale.new_zeros(N)
    if row_term is None:
        return scale, bias, ()
    p, t = row_term
    return scale, bias, (p.float().reshape(G, M).contiguous(), t.reshape(-1).float().expand(N).contiguous())


def _row_sums(t: torch.Tensor, kernel) -> torch.Tensor | None:
    """``Σ_k t[g, r, k]`` of byte codes ``t (G, R, K)`` as int32 ``(G, R)``, where one sums-kernel
    pass over the codes gives it: ``t`` dense, or one group's transposed view (column sums); else
    None (it would take a copy)."""
    if t.is_contiguous():
        return _exact_sums(t, [2], torch.int32, kernel)
    if t.shape[0] == 1 and t.mT.is_contiguous():
        return _exact_sums(t.mT[0], [0], torch.int32, kernel).unsqueeze(0)
    return None


def _conv2d_geometry(spec: SiteSpec, xl: torch.Tensor, w_shape) -> tuple[int, ...]:
    """N, H, W, C, kh, kw, strides, paddings, dilations, OH, OW of a 2-D conv on ``xl (N, H, W, C)``
    (the static arguments of the conv pack kernels)."""
    N, H, W, C = xl.shape
    (sh, sw), (dh, dw), (ph, pw) = spec.stride, spec.dilation, spec.gemm_padding(w_shape)
    return (N, H, W, C, *w_shape[2:], sh, sw, ph, pw, dh, dw, *_out_sizes(spec, (H, W), w_shape))


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


def _pack_a(a: torch.Tensor, flip: int, mp: int, kp: int, kernel=_jit_kernel, scratch=None) -> torch.Tensor:
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


def _pack_b(b: torch.Tensor, flip: int, np_: int, kp: int, kernel=_jit_kernel, scratch=None) -> torch.Tensor:
    """``B (G, np/16, kp/4, 16, 4)`` s8 from the (G, N, K) byte view ``b`` (into ``scratch`` as
    :func:`_pack_a`)."""
    G = b.shape[0]
    layout, src = _source(b, "nk", "kn")
    out = (scratch or _fresh)("b", (G, np_ // 16, kp // 4, 16, 4), torch.uint8)
    kernel(KernelRef("pack_b", (layout,), _serial(2 * out.numel())))(src, _flip(flip), out)
    return out.view(torch.int8)


def _fresh(slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _dequantize(
    C: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    row_term: tuple | None = None,
) -> torch.Tensor:
    """``C * scale + p·t + bias`` in fp32 with torch ops (the GPU's and long reductions' epilogue;
    ``row_term``: ``(p (G, M), t (N,))`` or None)."""
    y = torch.mul(C, scale.reshape(-1))
    if row_term is not None:
        y.addcmul_(row_term[0].unsqueeze(-1), row_term[1].reshape(-1))
    if bias is not None:
        y.add_(bias)
    return y if out is None else out.copy_(y)
