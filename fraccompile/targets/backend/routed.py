"""The weight gradient of a DFQ-routed site (per-sample precisions) on the integer GEMMs:
:class:`RoutedGradients`, mixed into :class:`.roles.SiteRoles`.

Per-sample precisions put per-sample scales on the weight gradient's reduction axis (the
samples), where no integer GEMM can apply them: the samples are grouped by their ``(x, dy)``
scales and each group is one integer GEMM per 8-bit part of ``dy``'s codes. The zero points'
terms are linear in the samples, so a conv's or linear's are summed over the batch once, each
group's code sums weighted by its zero points and scales, and go through the per-tap sums of
:mod:`.affine` once, not once per group (docs/backends.md, the routed site's weight gradient)."""

from __future__ import annotations

import torch

from ...ops.spec import SiteSpec
from .affine import _exact_sums, _gradient_taps, _gradient_values, _input_taps
from .codes import IntCodes, _group_codes, _host_groups, _take_rows, centered, signed_b, split_codes


class RoutedGradients:
    """``_gc_grouped`` for :meth:`.roles.SiteRoles.gc` (which provides ``gc``, ``_gc_core``,
    ``quantize_kernel`` and ``on_gpu``). On the GPU each group goes through ``gc`` whole, its
    terms included."""

    def _gc_grouped(self, spec: SiteSpec, xq: IntCodes, dyq: IntCodes, x_shape, w_shape):
        """:meth:`gc` summed over the groups of samples whose (x, dy) scales are equal."""
        scales, members = _scale_groups(xq.scale, dyq.scale, x_shape[0])
        if self.on_gpu(xq.codes) or spec.kind not in ("conv", "linear"):
            dw = None  # each group through gc, its zero points' terms included
            for j, rows in enumerate(members):
                sub_x, sub_dy = (_group_codes(q, rows, scales[j, i]) for i, q in enumerate((xq, dyq)))
                d = self.gc(spec, sub_x, sub_dy, (len(rows), *x_shape[1:]), w_shape)
                dw = d if dw is None else dw.add_(d)
            return dw
        # centered once for the batch (one pass with a shift per sample): the groups' codes are
        # then signed, with a zero point per sample (zero + shift·scale)
        xq, dyq = centered(xq), centered(dyq)
        kernel = self.quantize_kernel(xq.codes)
        x_terms = dy_terms = dw = None  # Σ over groups of (zd·sx)·Σqx and zx·Σdy, float64
        for j, rows in enumerate(members):
            sx, sd = scales[j, 0].reshape(1), scales[j, 1].reshape(1)
            qx = IntCodes(_take_rows(xq.codes, rows), sx, xq.signed)
            qd = IntCodes(_take_rows(dyq.codes, rows), sd, dyq.signed)
            parts = split_codes(qd)
            if spec.kind == "conv":  # the implicit weight gradient takes dy as signed B
                parts = [signed_b(p) for p in parts]
            for part in parts:  # summed in float64 with the terms: they cancel much of it
                d = self._gc_core(spec, qx, part, (len(rows), *x_shape[1:]), w_shape).double()
                dw = d if dw is None else dw.add_(d)
            qd.zero = _group_zero(dyq, rows)
            zd = qd.zero + sum(p.zero for p in parts if p.zero is not None)
            if bool(zd != 0):  # zd·sx·Σqx: the group's code sums (exact) with its weight
                codes = qx.codes.reshape(-1, x_shape[-1]) if spec.kind == "linear" else qx.codes
                sums = _exact_sums(codes, [0], torch.float64, kernel).mul_(float(zd * sx))
                x_terms = sums if x_terms is None else x_terms.add_(sums)
            zx = _group_zero(xq, rows)
            if bool(zx != 0):  # zx·Σdy: the group's dy values (s·Σq + count·z) with its weight
                values = _gradient_values(spec, qd, kernel).double().mul_(float(zx))
                dy_terms = values if dy_terms is None else dy_terms.add_(values)
        terms = []
        if x_terms is not None:
            terms.append(x_terms if spec.kind == "linear" else _input_taps(spec, x_terms, x_shape, w_shape))
        if dy_terms is not None:
            terms.append(_gradient_taps(spec, dy_terms, x_shape, w_shape))
        for term in terms:  # rank-one terms that broadcast into dw
            dw.add_(term)
        return dw.float()


def _scale_groups(sx: torch.Tensor, sd: torch.Tensor, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The distinct ``(sx, sd)`` pairs of ``n`` samples' scales (one value, or one per sample),
    in ascending order, as ``(G, 2)``, and each pair's samples (ascending indices, one tensor per
    group): grouped on the host from the ``n`` values, read once (a batch's worth of floats), in
    place of three ``torch.unique`` calls and a ``nonzero`` per group."""
    keys = list(zip(sx.reshape(-1).expand(n).tolist(), sd.reshape(-1).expand(n).tolist()))
    groups = _host_groups(keys, sx.device)
    scales = torch.tensor([pair for pair, _ in groups], dtype=sx.dtype, device=sx.device)
    return scales, [rows for _, rows in groups]


def _group_zero(q: IntCodes, rows: torch.Tensor) -> torch.Tensor:
    """The zero point of the group ``rows`` of per-sample codes (0 without one), as one value."""
    if q.zero is None:
        return torch.zeros(())
    return q.zero.reshape(-1)[rows[0]] if q.zero.numel() > 1 else q.zero.reshape(())
