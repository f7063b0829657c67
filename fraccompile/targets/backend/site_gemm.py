"""The autograd Function of a site on the integer kernels (:class:`IntSiteGemm`): forward from
the operands' codes, backward quantizing ``dy`` once for the error backprop and weight gradient,
with the epilogue (activation, BatchNorm) recomputed from the saved codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.nn.modules.batchnorm import _BatchNorm

from ...ops.contract import SiteCall
from ...ops.functions import apply_epilogue, epilogue_backward
from ...ops.quantizers import qparams_from_range, tensor_range
from .affine import _channel_sums
from .codes import IntCodes, _row_codes, _to_codes, centered, pack_bytes, pack_saved, unpack_saved

if TYPE_CHECKING:
    from .tvm_backend import TVMBackend


def _not_a_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` (the fw output: often a reshaped or channels-last view of the GEMM's buffer) as a
    tensor of its own on the same memory. Autograd refuses in-place ops (``ReLU(inplace=True)``)
    on a custom Function's output that is a view of a tensor made inside it."""
    if t._base is None:
        return t
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


def _fast_norm(norm, epilogue) -> bool:
    """Whether ``norm`` (+ ``epilogue``) takes the saved-statistics path of :class:`IntSiteGemm`:
    an ``nn.BatchNorm`` whose forward is torch's own, in batch-statistics mode, followed by
    nothing or a ReLU."""
    return (
        isinstance(norm, _BatchNorm)
        and type(norm).forward is _BatchNorm.forward
        and norm.training
        and (epilogue is None or epilogue[0] == "relu")
    )


def _batch_norm_forward(norm, y: torch.Tensor):
    """``norm(y)`` as ``nn.BatchNorm``'s own forward computes it in training mode (the same
    ``native_batch_norm`` call, running statistics and ``num_batches_tracked`` updated alike), also
    returning the batch mean and inverse standard deviation it saves for backward."""
    norm._check_input_dim(y)
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    track = norm.track_running_stats
    return torch.ops.aten.native_batch_norm(
        y,
        norm.weight,
        norm.bias,
        norm.running_mean if track else None,
        norm.running_var if track else None,
        True,
        factor,
        norm.eps,
    )


def _norm_backward(norm, batch_stats: bool, epilogue, y: torch.Tensor, gamma, beta, dz):
    """Gradients w.r.t. ``y``, ``gamma`` and ``beta`` of ``activation(batch_norm(y))`` by autograd
    on the recomputed ops: the unfused graph's backward, op for op (no running statistics are
    updated: with batch statistics they are not read, else they are)."""
    with torch.enable_grad():
        g = gamma.detach().requires_grad_() if gamma is not None else None
        b = beta.detach().requires_grad_() if beta is not None else None
        z = F.batch_norm(
            y,
            None if batch_stats else norm.running_mean,
            None if batch_stats else norm.running_var,
            g,
            b,
            batch_stats,
            0.0,
            norm.eps,
        )
        z = apply_epilogue(epilogue, z)
        leaves = [t for t in (y, g, b) if t is not None]
        grads = iter(torch.autograd.grad(z, leaves, dz))
    dy = next(grads)
    return dy, next(grads) if g is not None else None, next(grads) if b is not None else None


class IntSiteGemm(Function):
    """Forward: the site's output from integer codes; backward: ``dy`` quantized once (stochastic
    rounding, the reference's random numbers) and fed to EB and GC. The straight-through estimator
    of the reference (``STEQuantize``) is built in: gradients w.r.t. ``x``/``w`` are those w.r.t.
    their quantized values.

    With an ``epilogue`` (``FracOp.epilogue``, set by the epilogue-fusion pass) the output is the
    activation of the GEMM's, and backward recomputes the GEMM's output from the saved codes to
    take the activation's backward: only the codes are kept, not the fp32 pre-activation. With a
    ``norm`` (``FracOp.epilogue_norm``, a BatchNorm module whose ``weight``/``bias`` come in as
    ``gamma``/``beta``) the forward applies it first (running statistics updated as usual), and
    backward recomputes it too and returns ``gamma``'s and ``beta``'s gradients."""

    @staticmethod
    def forward(
        ctx,
        x,
        w,
        bias,
        xq: IntCodes,
        wq: IntCodes,
        call: SiteCall,
        backend: TVMBackend,
        gamma=None,
        beta=None,
        wq_eb: IntCodes | None = None,
    ):
        spec, site, epilogue, norm = call.spec, call.site, call.epilogue, call.epilogue_norm
        backend.where = (site, "fw")
        shapes = (tuple(x.shape), tuple(w.shape))
        fast_norm = norm is not None and _fast_norm(norm, epilogue)
        y = backend.fw(spec, xq, wq, *shapes, bias=bias, temporary=fast_norm)
        fused = epilogue is not None or norm is not None
        stats = mask = None
        ctx.fast_norm = fast_norm
        ctx.signs, ctx.qmax = (xq.signed, wq.signed), (xq.qmax, wq.qmax)
        ctx.offsets = (xq.offset, wq.offset)
        ctx.device_grids = (xq.device_grid, wq.device_grid)
        ctx.call, ctx.spec, ctx.backend, ctx.site = call, spec, backend, site
        ctx.epilogue, ctx.norm = epilogue, norm
        ctx.shapes = shapes
        ctx.has_bias = bias is not None
        if ctx.fast_norm:  # keep the batch statistics and the ReLU's mask: backward needs only
            y, mean, invstd = _batch_norm_forward(norm, y)  # the recomputed GEMM output
            stats = (mean, invstd)
            if epilogue is not None:
                y = torch.relu_(y)  # the norm's own fresh output
                mask = y.bool().view(torch.uint8)  # as MaskedReLU's: 1 where not 0 (NaN too)
        elif norm is not None:
            # nn.BatchNorm's own choice of batch or running statistics, kept for the recompute
            ctx.norm_batch_stats = norm.training or norm.running_mean is None
            y = norm(y)
        ctx.eb_weight = None if wq_eb is None else (wq_eb.signed, wq_eb.qmax, wq_eb.offset, wq_eb.device_grid)
        eb_tensors = (None,) * 3 if wq_eb is None else (wq_eb.codes, wq_eb.scale, wq_eb.zero)
        # the input's codes at the bits their grid needs (4-bit codes two per byte ...), the ReLU
        # mask at one bit
        kernel = backend.quantize_kernel(xq.codes)
        packed = pack_saved(xq, kernel)
        ctx.packed = None if packed is None else packed.meta()
        packed_mask = None if mask is None else pack_bytes(mask, 1, 0, kernel)
        ctx.packed_mask = None if packed_mask is None else packed_mask.meta()
        if packed_mask is not None:
            mask = packed_mask.data
        ctx.save_for_backward(
            packed.data if packed is not None else xq.codes,
            wq.codes,
            xq.scale,
            wq.scale,
            xq.zero,
            wq.zero,
            bias if fused else None,
            gamma,
            beta,
            *(stats or (None, None)),
            mask,
            *eb_tensors,
        )
        if ctx.fast_norm or epilogue is None:
            return _not_a_view(y)
        return _not_a_view(apply_epilogue(epilogue, y, inplace=True))  # (y: the GEMM's, fresh)

    @staticmethod
    def backward(ctx, dy):
        xc, wc, xs, ws, xz, wz, bias, gamma, beta, mean, invstd, mask, *eb = ctx.saved_tensors
        if ctx.packed is not None:
            xc = unpack_saved(xc, ctx.packed, ctx.backend.quantize_kernel(xc))
        if ctx.packed_mask is not None:
            mask = unpack_saved(mask, ctx.packed_mask, ctx.backend.quantize_kernel(mask))
        xq = IntCodes(xc, xs, ctx.signs[0], xz, ctx.qmax[0], ctx.offsets[0], ctx.device_grids[0])
        wq = IntCodes(wc, ws, ctx.signs[1], wz, ctx.qmax[1], ctx.offsets[1], ctx.device_grids[1])
        spec, backend = ctx.spec, ctx.backend
        x_shape, w_shape = ctx.shapes
        dgamma = dbeta = None
        if ctx.fast_norm:  # recompute the GEMM's output; the ops autograd runs for ReLU and the norm
            backend.where = (ctx.site, "fw")
            y = backend.fw(spec, xq, wq, *ctx.shapes, bias=bias, temporary=True)
            if dy.stride() != y.stride():  # one layout for the elementwise backward ops (on two
                dy = backend._scratch_like("dy", y).copy_(dy)  # they take strided loops)
            if mask is not None:  # the mask as fp32 in a scratch buffer (see MaskedReLU)
                dy = torch.ops.aten.threshold_backward(dy, backend._scratch_like("mask", y).copy_(mask), 0)
            norm = ctx.norm
            track = norm.track_running_stats
            dy, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                dy,
                y,
                gamma,
                norm.running_mean if track else None,
                norm.running_var if track else None,
                mean,
                invstd,
                True,
                norm.eps,
                [True, gamma is not None, beta is not None],
            )
        elif ctx.norm is not None:  # recompute the GEMM's output and differentiate norm + activation
            backend.where = (ctx.site, "fw")
            y = _not_a_view(backend.fw(spec, xq, wq, *ctx.shapes, bias=bias)).requires_grad_()
            dy, dgamma, dbeta = _norm_backward(
                ctx.norm, ctx.norm_batch_stats, ctx.epilogue, y, gamma, beta, dy
            )
        elif ctx.epilogue is not None:  # dy is the activation's gradient: recompute its input
            backend.where = (ctx.site, "fw")
            y = backend.fw(spec, xq, wq, *ctx.shapes, bias=bias)
            dy = epilogue_backward(ctx.epilogue, dy, y, out=y)  # (y: recomputed, fresh)
        backend.where = (ctx.site, "quantize")
        dyq = backend.gradient_codes(ctx.call, dy)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            backend.where = (ctx.site, "eb")
            if ctx.eb_weight is None:
                dx = backend.eb(spec, dyq, xq, wq, x_shape, w_shape)
            else:  # the weight quantized per input channel: scales on EB's output columns
                wq_eb = IntCodes(eb[0], eb[1], ctx.eb_weight[0], eb[2], *ctx.eb_weight[1:])
                dx = backend.eb(spec, dyq, xq, wq_eb, x_shape, w_shape, column_scales=True)
        if ctx.needs_input_grad[1]:
            backend.where = (ctx.site, "gc")
            dw = backend.gc(spec, xq, dyq, x_shape, w_shape)
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            channel = 1 if spec.kind == "conv" else dy.dim() - 1
            if dyq.per_row:  # (the error backprop is done with its scratch buffer)
                db = backend._dequantize_codes(dyq, "eb").sum([d for d in range(dy.dim()) if d != channel])
            else:  # exact code sums: s·Σq + count·z
                c = centered(dyq) if dyq.has_offset else dyq
                db = _channel_sums(
                    c.codes, channel, backend.quantize_kernel(c.codes)
                ).float() * c.scale.reshape(-1)
                if c.zero is not None:
                    db += c.codes.numel() // c.codes.shape[channel] * c.zero.reshape(-1)
        return dx, dw, db, None, None, None, None, dgamma, dbeta, None


def _gradient_codes(call: SiteCall, dy: torch.Tensor, kernel) -> IntCodes:
    """``dy``'s codes: the reference's ``quantize_gradient`` (or, per sample,
    ``quantize_gradient_rows``): per-tensor range, stochastic rounding."""
    lo, hi = tensor_range(dy)
    asym = call.scheme == "sbm"

    def grid(bits: int):
        return qparams_from_range(lo, hi, bits, call.scheme, signed=True)

    if call.rows is not None:
        return _row_codes(
            dy,
            call.rows.row_bits("g"),
            grid,
            stochastic=True,
            noise=call.rounding_noise,
            asymmetric=asym,
            kernel=kernel,
        )
    return _to_codes(
        dy, grid(call.prec.g), stochastic=True, noise=call.rounding_noise, kernel=kernel, asymmetric=asym
    )
