"""The three roles of a site computed from its integer codes (:class:`SiteRoles`): ``fw`` the
forward, ``eb`` the error backprop (``grad_input``) and ``gc`` the weight gradient
(``grad_weight``), per op kind, on the integer GEMMs of :mod:`.gemm_runtime`; mixed into
:class:`.tvm_backend.TVMBackend` and called by :class:`.site_gemm.IntSiteGemm`; with the operand
layouts they hand to the GEMMs (im2col patches, weight rows, broadcast matmul batches).

Roles, as one batched GEMM ``C[g] = A[g]·B[g]ᵀ`` with A u8 and B s8 (see :mod:`..kernels.gemm`):

============  =====================================  ==============================================
role          linear / conv (im2col ``cols``)        matmul ``x @ y``
============  =====================================  ==============================================
forward FW    A = x codes, B = w codes               A = x, B = yᵀ
backprop EB   see below                              A = dy, B = y         (``dx``)
weight GC     A = dyᵀ, B = xᵀ (colsᵀ) → ``dw``      A = xᵀ, B = dyᵀ       (``dy`` of ``y``)
============  =====================================  ==============================================

EB of a weight site with per-output-channel weight ranges (``weight_scale="channel"``) is not an
integer GEMM: EB sums over output channels, so their scales cannot be taken out of the sum; it
runs in fp32 on exactly the reference backend's operands (docs/contract.md). With ``"gemm"``
(the default) or ``"tensor"`` (the weight's scales on EB's output axis) a linear site's EB is an
integer GEMM (A = dy, B = wᵀ), and a stride-1 2-D conv's the integer forward of its transposed
conv (zero points included); strided and grouped convs stay fp32. A matmul's operands are per
tensor: with zero points (``sbm``) each role is one GEMM plus one pass that adds their terms
(:meth:`.gemm_runtime.IntegerGemms.affine_gemm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...ops.spec import SiteSpec
from .affine import (
    _border_slices,
    _code_sums,
    _gradient_sums,
    _input_code_sums,
    _out_channel,
    _out_sizes,
    _value_sums,
    _window_code_sums,
)
from .codes import IntCodes, _dense_perm, _scalar_scale, centered, signed_b, split_codes
from .gemm_runtime import MAX_K_UNSIGNED, _bcast_batch, _gemm_offset, _matmul_batches
from .routed import RoutedGradients


class SiteRoles(RoutedGradients):
    """Forward / error backprop / weight gradient of a site from its codes, for the class that
    mixes it in after :class:`.gemm_runtime.IntegerGemms` (its GEMMs) and provides ``scratch``,
    ``on_gpu`` and ``_dequantize_codes`` (:class:`.tvm_backend.TVMBackend`)."""

    # -- the three roles per op kind ---------------------------------------------------------------
    def fw(
        self,
        spec: SiteSpec,
        xq: IntCodes,
        wq: IntCodes,
        x_shape,
        w_shape,
        bias: torch.Tensor | None = None,
        temporary: bool = False,
    ) -> torch.Tensor:
        """The site's output from the codes. ``temporary``: the caller consumes the result before
        the next GEMM call (a fused norm's input): a conv writes it into a :meth:`scratch`
        buffer.

        The integer product of the codes times the scales that factor out of it (per tensor,
        per output channel); then per-sample scales (rows), and the zero points' terms:
        ``x·w = sx·sw·Σqx·qw + sx·zw·Σqx + zx·Σw`` (for a conv the sums run over each output
        position's window, and ``Σw`` over the taps inside the image)."""
        keep = self.on_gpu(xq.codes) and spec.kind != "conv"  # device offsets: the GEMM's
        xq, wq = centered(xq, keep), centered(wq, keep)
        if spec.kind == "conv":
            wq = signed_b(wq)  # the conv kernels take the weight as signed B
        x_zero, w_zero = xq.has_zero, wq.has_zero
        late = xq.per_row or x_zero or w_zero
        scale = _scalar_scale(xq) * wq.scale.reshape(-1)
        if late and w_zero and not xq.per_row and spec.kind == "conv":
            # the weight zero point's term is rank one: (window sums)[position]·zw[channel],
            # added in the implicit conv's write-back where it runs (else one pass after); x's
            # zero point's term zx·Σw is the same for every sample and, away from the borders,
            # per channel: a bias, plus a correction on the border positions alone
            r = _window_code_sums(spec, xq, w_shape, self.quantize_kernel(xq.codes)).mul_(xq.scale)
            t = _out_channel(spec, wq.zero, r.dim())
            border = None
            if x_zero:
                values = _value_sums(spec, wq, x_shape, w_shape) * xq.zero  # (1, OC, *out)
                inner = wq.dequantize().sum(list(range(1, len(w_shape)))) * xq.zero.reshape(-1)
                border = values - inner.reshape(1, -1, *([1] * spec.conv_dims))
                bias = inner if bias is None else bias + inner
            y, taken = self._fw_core(spec, xq, wq, x_shape, w_shape, scale, bias, temporary, row_term=(r, t))
            if not taken:
                y.addcmul_(r, t)
            if border is not None:
                for index in _border_slices(spec, x_shape[2:], w_shape):
                    y[index] += border[index]
            return y
        if late and spec.kind == "linear" and not xq.per_row and not self.on_gpu(xq.codes):
            # the zero points' terms in the dequantize pass: zw's rank one, (x's code sums)·zw
            fixed = _value_sums(spec, wq, x_shape, w_shape, self.kernel) * xq.zero if x_zero else None
            fixed = bias if fixed is None else fixed if bias is None else fixed + bias
            r = (
                _window_code_sums(spec, xq, w_shape, self.kernel).mul_(xq.scale).reshape(1, -1)
                if w_zero
                else None
            )
            term = None if r is None else (r, wq.zero)
            return self._fw_core(spec, xq, wq, x_shape, w_shape, scale, fixed, temporary, row_term=term)[0]
        if xq.per_row and spec.kind != "matmul" and not self.on_gpu(xq.codes):
            return self._fw_rows(spec, xq, wq, x_shape, w_shape, scale, bias, temporary)
        if spec.kind == "matmul" and late and (y := self.affine_matmul(xq, wq)) is not None:
            return y  # the zero points' terms from the GEMM's own code sums, in one pass
        y, _ = self._fw_core(spec, xq, wq, x_shape, w_shape, scale, None if late else bias, temporary)
        if not late:
            return y
        if xq.per_row:
            y.mul_(xq.scale)
        if w_zero:  # sx·zw·(window sums of x's codes): one pass over y, no temporary of its size
            y.addcmul_(
                _window_code_sums(spec, xq, w_shape, self.quantize_kernel(xq.codes)).mul_(xq.scale),
                _out_channel(spec, wq.zero, y.dim()),
            )
        fixed = self._shared_terms(spec, xq, wq, x_shape, w_shape, bias, y.dim())
        return y if fixed is None else y.add_(fixed)

    def _shared_terms(self, spec: SiteSpec, xq: IntCodes, wq: IntCodes, x_shape, w_shape, bias, ndim: int):
        """What every sample's output shares, to add in one pass (None: nothing): x's zero point's
        term ``zx·Σw`` (border-aware sums of w's values) plus the bias, shaped for an ``ndim``-d
        output."""
        fixed = None
        if xq.has_zero:
            fixed = _value_sums(spec, wq, x_shape, w_shape, self.quantize_kernel(wq.codes)) * xq.zero
        if bias is not None:
            b = _out_channel(spec, bias, ndim)
            fixed = b if fixed is None else fixed + b
        return fixed

    def _fw_rows(self, spec: SiteSpec, xq: IntCodes, wq: IntCodes, x_shape, w_shape, scale, bias, temporary):
        """:meth:`fw` with per-sample scales ``sx`` (a DFQ-routed site) on the CPU: the kernel's
        write-back gives ``sw·Σqx·qw + zw·Σqx`` (the weight zero point's term, window code sums
        times ``zw``, before the sample's scale), and one pass applies ``sx`` and adds what every
        sample shares: ``y = sx·(...) + zx·Σw + bias``."""
        term = None
        if wq.has_zero:
            r = _window_code_sums(spec, xq, w_shape, self.quantize_kernel(xq.codes))
            if spec.kind == "linear":
                term = (r.reshape(1, -1), wq.zero.reshape(-1))
            else:
                term = (r, _out_channel(spec, wq.zero, r.dim()))
        y, taken = self._fw_core(spec, xq, wq, x_shape, w_shape, scale, None, temporary, row_term=term)
        if term is not None and not taken:
            y.addcmul_(*term)
        fixed = self._shared_terms(spec, xq, wq, x_shape, w_shape, bias, y.dim())
        if fixed is None:
            return y.mul_(xq.scale)
        return torch.addcmul(fixed, y, xq.scale, out=y)

    def _fw_core(
        self,
        spec: SiteSpec,
        xq: IntCodes,
        wq: IntCodes,
        x_shape,
        w_shape,
        scale,
        bias,
        temporary: bool,
        row_term=None,
    ) -> tuple[torch.Tensor, bool]:
        """``(y, taken)``: the scaled integer product plus ``bias``, and whether ``row_term``
        (see :meth:`fw`: a conv's, or a linear's ``(p (1, M), t)``) was added too."""
        if spec.kind == "linear":
            K = x_shape[-1]
            offsets = (_gemm_offset(xq, x_shape[:-1], False), _gemm_offset(wq, ()))
            a, b = xq.codes.reshape(1, -1, K), wq.codes.unsqueeze(0)
            operands = (xq.operand, wq.operand)  # (GPU: written padded by the quantize kernel)
            y = self.gemm_f32(a, b, scale, bias, offsets=offsets, operands=operands, row_term=row_term)
            return y.reshape(*x_shape[:-1], w_shape[0]), row_term is not None
        if spec.kind == "matmul":
            xb, yb, batch = _matmul_batches(xq.codes, wq.codes)
            offsets = (_gemm_offset(xq, batch, True), _gemm_offset(wq, batch, True))
            y = self.gemm_f32(xb, yb.mT, scale, offsets=offsets)
            return y.reshape(*batch, *y.shape[-2:]), False
        G, OC, n = spec.groups, w_shape[0], x_shape[0]
        xl = xq.codes.permute(0, *range(2, 2 + spec.conv_dims), 1)
        wr = _weight_rows(wq.codes, G)  # (G, OCg, k·Cg)
        out_sp = _out_sizes(spec, x_shape[2:], w_shape)
        # (N, O..., OC) in memory, an (N, OC, O...) tensor: channels-last, which the next conv
        # reads without a transpose
        d = len(out_sp)
        strides = [math.prod(out_sp) * OC] + [math.prod(out_sp[i + 1 :]) * OC for i in range(d)]
        if temporary and not self.on_gpu(xq.codes):
            y = self.scratch("y", (n, *out_sp, OC), torch.float32).permute(0, d + 1, *range(1, d + 1))
        else:
            y = torch.empty_strided((n, OC, *out_sp), (strides[0], 1, *strides[1:]), device=xq.codes.device)
        rows = y.permute(0, *range(2, 2 + d), 1)  # (N, O..., OC), contiguous
        fused = d == 2 and G == 1 and not self.on_gpu(xl)
        if fused:  # the fused paths read channels-last codes: a byte copy when they are not
            xl = xl.contiguous()
            self._note_gpu_gemm(1, rows.shape[0] * math.prod(out_sp), OC, wr.shape[-1])
        taken = (
            self._conv_implicit(spec, xq, xl, wr, w_shape, out_sp, scale, bias, rows, row_term)
            if fused
            else None
        )
        if taken is not None:
            return y, taken
        if fused and wr.shape[-1] <= MAX_K_UNSIGNED:  # A packed from x: no im2col copy
            a_shift = 128 if xq.signed else 0
            self._gemm(
                1,
                rows.shape[0] * math.prod(out_sp),
                a_shift,
                self._conv_a_packer(spec, xl, w_shape, a_shift),
                OC,
                wr.shape[-1],
                *self._b_packer(wr),
                dequant=(scale, bias, rows.view(1, -1, OC)),
            )
            return y, False
        if d == 2 and G == 1 and self.on_gpu(xl) and self._gpu_conv(spec, xl, wr, w_shape, scale, bias, rows):
            return y, False  # the implicit-GEMM tensor-core conv: no im2col copy
        cols, _ = _im2col(xq.codes, spec, w_shape)  # (G, M, k·Cg)
        if G == 1:
            self.gemm_f32(cols, wr, scale, bias, out=rows.view(1, -1, OC))
            return y, False
        C = self.gemm(cols, wr).permute(1, 0, 2).reshape(-1, OC)  # (M, OC): scale per group
        torch.mul(C, scale, out=rows.view(-1, OC))
        if bias is not None:
            y.add_(bias.reshape(1, -1, *([1] * d)))
        return y, False

    def _note_gpu_gemm(self, G: int, M: int, N: int, K: int) -> None:
        """Note on the recorder the im2col GEMM that CUDA tensors run on an exported library
        where this CPU run took a conv kernel (``export --target cuda`` builds it)."""
        if self.recorder is not None:
            self.recorder.gpu_problem((G, M, N, K), self.where)

    def _gpu_conv(self, spec: SiteSpec, xl, wr, w_shape, scale, bias, rows) -> bool:
        """The forward of a 2-D ungrouped conv of CUDA codes ``xl (N, H, W, C)`` on the
        implicit-GEMM tensor-core kernel (:class:`..runtime.cuda_conv.CudaConv`) into ``rows``: the
        integers of im2col + :meth:`gemm` (padding = code 0, uint8 codes corrected exactly),
        dequantized as :meth:`gemm_f32` does on the GPU. False (nothing done) where it does not
        apply (see :meth:`_conv_launcher`; or a reduction over the kernel's limit)."""
        from .gemm_runtime import _dequantize

        conv = self._conv_launcher(xl, wr)
        if conv is None or wr.shape[-1] > conv.max_k:
            return False
        w = wr.reshape(w_shape[0], *w_shape[2:], w_shape[1])  # (OC, kh, kw, C)
        C = conv.forward(xl, w, spec.stride, spec.gemm_padding(w_shape), spec.dilation)  # (M, OC)
        _dequantize(C, scale, bias, rows.view(C.shape))
        return True

    def _gpu_conv_gc(self, spec: SiteSpec, xl, dyq: IntCodes, w_shape, scale) -> torch.Tensor | None:
        """The weight gradient of a 2-D ungrouped conv of CUDA codes ``xl (N, H, W, C)`` on the
        implicit-GEMM tensor-core kernel (:meth:`..runtime.cuda_conv.CudaConv.weight_grad`): the
        integers of im2col + :meth:`gemm`, dequantized as :meth:`gemm_f32` does, ``(1, OC,
        kh·kw·C)``. None where it does not apply (see :meth:`_conv_launcher`; or one image's
        output pixels over the kernel's limit)."""
        from .gemm_runtime import _dequantize

        conv = self._conv_launcher(xl, dyq.codes)
        if conv is None or math.prod(dyq.codes.shape[2:]) > conv.max_k:
            return None
        dy = dyq.codes.permute(0, 2, 3, 1)  # (N, OH, OW, OC)
        padding = spec.gemm_padding(w_shape)
        dw = conv.weight_grad(xl, dy, w_shape[2:], spec.stride, padding, spec.dilation)
        return _dequantize(dw.reshape(1, w_shape[0], -1), scale)

    def _conv_launcher(self, x: torch.Tensor, other: torch.Tensor):
        """The implicit-GEMM conv launcher (:class:`..runtime.cuda_conv.CudaConv`) for CUDA codes
        ``x`` (int8/uint8) with ``other`` (int8: weights or gradients), beside the GEMM's; None
        where it does not apply: other dtypes, or a GEMM serving an exported library (which holds
        no conv kernel) or running dp4a."""
        from ..runtime.cuda_conv import CudaConv

        gemm = self.cuda
        if (
            x.dtype not in (torch.int8, torch.uint8)
            or other.dtype != torch.int8
            or gemm.library is not None
            or gemm.kind_for(x.device) != "mma"
        ):
            return None
        conv = getattr(self, "_cuda_conv", None)
        if conv is None:
            conv = self._cuda_conv = CudaConv(cache_dir=gemm.cache_dir)
        return conv

    def eb(
        self,
        spec: SiteSpec,
        dyq: IntCodes,
        xq: IntCodes,
        wq: IntCodes,
        x_shape,
        w_shape,
        column_scales: bool = False,
    ):
        """``dx``. An integer GEMM where the weight's scale factors out of the sum over output
        channels (a matmul, one weight scale per tensor, or ``column_scales``: one per input
        channel), else fp32 on the reference's dequantized operands (per-output-channel weight
        scales sit on the reduction axis)."""
        if spec.kind == "matmul" or wq.scale.numel() == 1 or column_scales:
            dx = self._eb_integer(spec, dyq, wq, x_shape, w_shape)
            if dx is not None:
                return dx
        # fp32 on the reference's operands (in scratch buffers: the fp32 op consumes them)
        dy, w = self._dequantize_codes(dyq, "eb"), self._dequantize_codes(wq, "w")
        if spec.kind == "linear":
            return dy.matmul(w)
        if spec.kind == "matmul":
            return dy.matmul(w.mT).sum_to_size(x_shape)
        # dx takes the layout of the (unused) input argument: x's, so that the elementwise
        # backward ops downstream (ReLU, BatchNorm, the residual sum) see one layout, not two
        x_like = (
            torch.empty_like(xq.codes, dtype=dy.dtype)
            if _dense_perm(xq.codes) is not None
            else dy.new_empty(x_shape)
        )
        return self._conv_backward(spec, dy, x_like, w, [True, False, False])[0]

    def _eb_integer(
        self, spec: SiteSpec, dyq: IntCodes, wq: IntCodes, x_shape, w_shape
    ) -> torch.Tensor | None:
        """:meth:`eb` as integer GEMMs (one per 8-bit part of ``dy``'s codes), or None where it
        does not apply (a conv geometry without an integer form)."""
        keep = self.on_gpu(dyq.codes) and spec.kind != "conv"  # device offsets: the GEMM's
        dyq, wq = centered(dyq, keep), centered(wq, keep)
        if spec.kind == "conv" and (dyq.has_zero or wq.has_zero):
            return self._eb_transposed_fw(spec, dyq, wq, x_shape, w_shape)
        parts = split_codes(dyq)
        dx = None
        if spec.kind == "conv":
            for part in parts:
                d = self._eb_implicit(spec, part, wq, x_shape, w_shape, part.scale * wq.scale.reshape(-1))
                if d is None:
                    return None
                dx = d if dx is None else dx.add_(d)
            return dx.mul_(dyq.scale) if dyq.per_row else dx
        one_pass = len(parts) == 1 and not dyq.per_row and not self.on_gpu(dyq.codes)
        if spec.kind == "linear" and (wq.has_zero or dyq.has_zero) and one_pass:
            # the zero points' terms in the dequantize pass, as in :meth:`fw`: zw's rank one
            # sd·(dy's code sums)·zw, and zd·Σ_n w per column as the bias
            N = w_shape[0]
            term = None
            if wq.has_zero:
                sums = _code_sums(dyq.codes, -1, self.quantize_kernel(dyq.codes)).reshape(1, -1)
                term = (sums.mul_(dyq.scale), wq.zero.reshape(-1))
            d = self.gemm_f32(
                parts[0].codes.reshape(1, -1, N),
                wq.codes.t().unsqueeze(0),
                parts[0].scale * wq.scale.reshape(-1),
                wq.dequantize().sum(0) * dyq.zero if dyq.has_zero else None,
                offsets=(None, _gemm_offset(wq, ())),
                row_term=term,
            )
            return d.reshape(*dyq.codes.shape[:-1], -1)
        matmul8 = spec.kind == "matmul" and len(parts) == 1  # (8-bit codes: as in fw)
        if matmul8 and (dx := self.affine_matmul(dyq, wq, tb=True)) is not None:
            return dx.sum_to_size(x_shape)
        for part in parts:
            if spec.kind == "matmul":
                dyb, yb, batch = _matmul_batches(part.codes, wq.codes)
                offsets = (None, _gemm_offset(wq, batch, True))
                d = self.gemm_f32(dyb, yb, part.scale * wq.scale, offsets=offsets)  # (G, M, K)
                d = d.reshape(*_bcast_batch(x_shape, w_shape), *d.shape[-2:])
            else:
                N = w_shape[0]
                d = self.gemm_f32(
                    part.codes.reshape(1, -1, N),
                    wq.codes.t().unsqueeze(0),
                    part.scale * wq.scale.reshape(-1),
                    offsets=(None, _gemm_offset(wq, ())),
                ).reshape(*dyq.codes.shape[:-1], -1)
            dx = d if dx is None else dx.add_(d)
        if dyq.per_row:
            dx.mul_(dyq.scale)
        if wq.has_zero:  # sd·zw·Σ_n qd
            sums = _code_sums(dyq.codes, -1, self.quantize_kernel(dyq.codes))
            dx.addcmul_(sums.unsqueeze(-1).mul_(dyq.scale), wq.zero.reshape(-1))
        if dyq.has_zero:  # zd·Σ_n w
            w = wq.dequantize()
            dx.add_((w.sum(-1).unsqueeze(-2) if spec.kind == "matmul" else w.sum(0)) * dyq.zero)
        return dx.sum_to_size(x_shape) if spec.kind == "matmul" else dx

    def _eb_transposed_fw(
        self, spec: SiteSpec, dyq: IntCodes, wq: IntCodes, x_shape, w_shape
    ) -> torch.Tensor | None:
        """The error backprop of a stride-1, ungrouped 2-D conv whose operands have zero points
        (``sbm``), as :meth:`fw` of its transposed conv: ``dy`` is the input, padded by
        ``d·(k-1) - p``, the weights flipped in space with their channel axes swapped, so the
        weight's scales and zero points per input channel (``weight_scale="gemm"``) become the
        transposed conv's per output channel and the forward's zero-point terms (window and
        border-aware value sums) apply as they are. None where that does not apply (a stride,
        groups, per-output-channel scales on the reduction axis, a padding over ``d·(k-1)``,
        gradients over 8 bits, the GPU). Gradients over 8 bits could run as two such forwards, one
        per 8-bit half of their codes, but that measured slower than the fp32 conv (docs/tvm.md,
        "The error backprop with per-channel weight ranges stays fp32")."""
        if spec.conv_dims != 2:
            return None
        (kh, kw), (ph, pw), (dh, dw) = w_shape[2:], spec.gemm_padding(w_shape), spec.dilation
        pad = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
        if (
            spec.groups != 1
            or tuple(spec.stride) != (1, 1)
            or min(pad) < 0
            or wq.scale.numel() not in (1, w_shape[1])
            or (wq.zero is not None and wq.zero.numel() not in (1, w_shape[1]))
            or dyq.wide
            or self.on_gpu(dyq.codes)
        ):
            return None
        N, C, H, W = x_shape
        wt = IntCodes(
            wq.codes.flip(2, 3).transpose(0, 1),
            wq.scale.reshape(-1, 1, 1, 1),
            wq.signed,
            None if wq.zero is None else wq.zero.reshape(-1, 1, 1, 1),
            wq.qmax,
            wq.offset,
        )
        transposed = SiteSpec.conv(2, 1, pad, spec.dilation)
        return self.fw(transposed, dyq, wt, dyq.codes.shape, (C, w_shape[0], kh, kw))

    def _eb_implicit(
        self, spec: SiteSpec, dyq: IntCodes, wq: IntCodes, x_shape, w_shape, scale: torch.Tensor
    ) -> torch.Tensor | None:
        """The error backprop of a stride-1, ungrouped 2-D conv with one weight scale, as the
        implicit-GEMM forward (:meth:`_conv_implicit`) of its transposed conv: ``dx`` is the conv
        of ``dy``, padded by ``d·(k-1) - p``, with the weights flipped in space and their two
        channel axes swapped; exact integer sums times ``scale(dy)·scale(w)``, channels-last.
        On CUDA tensors the forward is the tensor-core conv (:meth:`_gpu_conv`). None where that
        does not apply (a stride, groups, per-channel scales, a padding over ``d·(k-1)``, no VNNI
        on the CPU, or the forward kernel's own conditions)."""
        gpu = self.on_gpu(dyq.codes)
        if not (self._vnni or gpu) or spec.conv_dims != 2 or spec.groups != 1 or tuple(spec.stride) != (1, 1):
            return None
        (kh, kw), (ph, pw), (dh, dw) = w_shape[2:], spec.gemm_padding(w_shape), spec.dilation
        pad = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
        if min(pad) < 0:
            return None
        N, C, H, W = x_shape
        OC = w_shape[0]
        wt = (C, OC, kh, kw)
        w_rows = _weight_rows(wq.codes.flip(2, 3).transpose(0, 1), 1)  # (1, C, kh·kw·OC)
        dyl = dyq.codes.permute(0, 2, 3, 1)  # (N, OH, OW, OC)
        # dx: channels-last, on dy's device
        dx = torch.empty_strided((N, C, H, W), (H * W * C, 1, W * C, C), device=dyl.device)
        rows = dx.permute(0, 2, 3, 1)
        transposed = SiteSpec.conv(2, 1, pad, spec.dilation)
        if gpu:
            return dx if self._gpu_conv(transposed, dyl, w_rows, wt, scale, None, rows) else None
        dyl = dyl.contiguous()
        if self._conv_implicit(transposed, dyq, dyl, w_rows, wt, [H, W], scale, None, rows) is None:
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
        if rows and (spec.kind != "matmul" or len(x_shape) == 2):  # (a 2-D matmul's samples: rows)
            return self._gc_grouped(spec, xq, dyq, x_shape, w_shape)
        keep = self.on_gpu(xq.codes) and spec.kind != "conv"  # device offsets: the GEMM's
        xq, dyq = centered(xq, keep), centered(dyq, keep)
        parts = split_codes(dyq)
        if spec.kind == "conv":  # the implicit weight gradient takes dy as signed B
            parts = [signed_b(p) for p in parts]
        matmul8 = spec.kind == "matmul" and len(parts) == 1  # (8-bit codes: as in fw)
        if matmul8 and (dw := self.affine_matmul(xq, dyq, ta=True)) is not None:
            return dw.sum_to_size(w_shape)
        dw = None
        for part in parts:
            d = self._gc_core(spec, xq, part, x_shape, w_shape)
            dw = d if dw is None else dw.add_(d)
        zeros = [z for z in [dyq.zero] + [p.zero for p in parts] if z is not None]
        terms = []
        if zeros and (dyq.device_grid or any(bool((z != 0).any()) for z in zeros)):  # zd·sx·Σqx
            terms.append(
                _input_code_sums(spec, xq, x_shape, w_shape, self.quantize_kernel(xq.codes)).mul_(
                    xq.scale * sum(zeros)
                )
            )
        if xq.has_zero:  # zx·Σdy
            terms.append(
                _gradient_sums(spec, dyq, x_shape, w_shape, self.quantize_kernel(dyq.codes)).mul_(xq.zero)
            )
        if spec.kind != "matmul":
            for term in terms:  # rank-one terms: in place where they broadcast into dw (checked
                # here: torch.broadcast_shapes goes through torch's slow Python reference code)
                fits = term.dim() <= dw.dim() and all(
                    a in (1, b) for a, b in zip(term.shape[::-1], dw.shape[::-1])
                )
                dw = dw.add_(term) if fits else dw + term
            return dw
        # a matmul's products and terms are per batch entry, then summed over broadcast ones
        for q in (xq, dyq):
            if q.per_row:
                dw.mul_(q.scale)
        for term in terms:
            dw = dw + term
        return dw.sum_to_size(w_shape)

    def _gc_core(self, spec: SiteSpec, xq: IntCodes, dyq: IntCodes, x_shape, w_shape):
        """The integer part of :meth:`gc` for 8-bit codes with scales per tensor (per sample: 1,
        applied by the caller); a matmul's is per broadcast batch entry, not yet summed."""
        scale = _scalar_scale(xq) * _scalar_scale(dyq)
        # dw = dyᵀ·x: A = dyᵀ (the smaller operand is transposed by the pack kernel), B = xᵀ,
        # which the pack kernel reads in 16-byte rows of x — no transpose of the activations
        if spec.kind == "linear":
            K, N = x_shape[-1], w_shape[0]
            dyt = dyq.codes.reshape(-1, N).t().unsqueeze(0)  # (1, N, M)
            xt = xq.codes.reshape(-1, K).t().unsqueeze(0)  # (1, K, M)
            return self.gemm_f32(dyt, xt, scale, offsets=(None, _gemm_offset(xq, ())))[0]
        if spec.kind == "matmul":
            xb, dyb, batch = _matmul_batches(xq.codes, dyq.codes)
            offsets = (_gemm_offset(xq, batch, True), None)
            dw = self.gemm_f32(xb.mT, dyb.mT, scale, offsets=offsets)  # (G, K, N)
            return dw.reshape(*_bcast_batch(x_shape, w_shape), *dw.shape[-2:])
        G, OC = spec.groups, w_shape[0]
        n = spec.conv_dims
        dyl = dyq.codes.permute(0, *range(2, 2 + n), 1).reshape(-1, G, OC // G)  # (M, G, OCg)
        xl = xq.codes.permute(0, *range(2, 2 + n), 1)
        fused = n == 2 and G == 1 and not self.on_gpu(xl)
        if fused:  # as in fw: channels-last codes (a byte copy when they are not)
            xl = xl.contiguous()
            self._note_gpu_gemm(1, OC, w_shape[1] * math.prod(w_shape[2:]), dyl.shape[0])
        dw = self._gc_implicit(spec, xq, dyq, xl, w_shape, scale) if fused else None
        if dw is not None:
            return dw
        if fused:  # B packed from x
            flip = 0 if xq.signed else 128
            C = self._gemm(
                1,
                OC,
                *self._a_packer(dyl.permute(1, 2, 0)),  # A = dyᵀ (1, OC, M)
                w_shape[1] * math.prod(w_shape[2:]),
                dyl.shape[0],
                flip,
                self._conv_patch_packer(spec, xl, w_shape, flip),
                dequant=(scale, None, None),
            )
        else:  # on the GPU: the implicit-GEMM conv's weight gradient where it applies
            C = self._gpu_conv_gc(spec, xl, dyq, w_shape, scale) if n == 2 and G == 1 else None
            if C is None:
                cols, _ = _im2col(xq.codes, spec, w_shape)  # (G, M, k·Cg)
                C = self.gemm_f32(dyl.permute(1, 2, 0), cols.mT, scale)  # (G, OCg, k·Cg)
        ks = list(w_shape[2:])
        dw = C.reshape(OC, *ks, w_shape[1])  # (OC, k..., Cg)
        return dw.permute(0, n + 1, *range(1, n + 1))


def _weight_rows(codes: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv weight codes ``(OC, Cg, k...)`` as GEMM rows ``(G, OCg, k·Cg)`` in im2col's order."""
    n = codes.dim() - 2
    w = codes.permute(0, *range(2, 2 + n), 1)  # (OC, k..., Cg)
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
    xl = codes.permute(0, *range(2, 2 + n), 1)  # (N, S..., C) view
    out_sp = _out_sizes(spec, size, w_shape)
    if any(pad):  # F.pad's spec runs from the last dim: C (none), then S_n .. S_1
        xl = F.pad(xl, [0, 0] + [p for d in reversed(range(n)) for p in (pad[d], pad[d])])
    st = xl.stride()
    patches = xl.as_strided(
        (N, *out_sp, *ks, C),
        (
            st[0],
            *(st[1 + d] * spec.stride[d] for d in range(n)),
            *(st[1 + d] * spec.dilation[d] for d in range(n)),
            st[-1],
        ),
    )
    G = spec.groups
    M, kp = N * math.prod(out_sp), math.prod(ks)
    cols = patches.reshape(M, kp * C)  # the one copy
    if G == 1:
        return cols.view(1, M, kp * C), out_sp
    cols = cols.view(M, kp, G, C // G).permute(2, 0, 1, 3).reshape(G, M, kp * (C // G))
    return cols, out_sp
