"""The backend interface: the three GEMMs of a site.

A site ``y = op(x, w)`` needs, per training step, the forward GEMM ``y = x·w``, the error-backprop GEMM
``dx = dy·w`` and the weight-gradient GEMM ``dw = x·dy``. The autograd Function in
:mod:`fraccompile.ops.functions` quantizes the operands and calls a backend for these three; a
backend never changes the quantization, only how the products are computed (``ReferenceBackend``:
torch fp32 on fake-quantized values; the TVM backend: integer kernels).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .spec import CONV_FNS, SiteSpec


class KernelBackend(ABC):
    name: str = "abstract"

    def unsupported_reason(self, spec: SiteSpec, prec=None, scheme: str = "sbm",
                           weight_shape=None) -> str | None:
        """Why this backend cannot run ``spec`` at precision ``prec`` with ``scheme`` (None when it
        can). Sites it cannot run go through the float methods below (the reference semantics)."""
        return None

    # A backend is a process-wide service (the TVM one holds compiled kernels): copies and pickles
    # of a model share it, and unpickling looks it up by name.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return get_backend, (self.name,)

    @abstractmethod
    def forward(self, spec: SiteSpec, x: torch.Tensor, w: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def grad_input(self, spec: SiteSpec, dy: torch.Tensor, x: torch.Tensor,
                   w: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def grad_weight(self, spec: SiteSpec, x: torch.Tensor, dy: torch.Tensor,
                    w: torch.Tensor) -> torch.Tensor: ...

    @staticmethod
    def grad_bias(spec: SiteSpec, dy: torch.Tensor) -> torch.Tensor:
        if spec.kind == "conv":
            return dy.sum(dim=[d for d in range(dy.dim()) if d != 1])
        return dy.reshape(-1, dy.shape[-1]).sum(0)


class ReferenceBackend(KernelBackend):
    """torch ops in the operands' dtype: the semantics every other backend is checked against."""

    name = "reference"

    def forward(self, spec, x, w, bias):
        if spec.kind == "conv":
            return CONV_FNS[spec.conv_dims](x, w, bias, spec.stride, spec.gemm_padding(w.shape),
                                            spec.dilation, spec.groups)
        if spec.kind == "linear":
            return torch.nn.functional.linear(x, w, bias)
        return torch.matmul(x, w)

    def _conv_backward(self, spec, dy, x, w, mask):
        n = spec.conv_dims
        return torch.ops.aten.convolution_backward(
            dy, x, w, None, list(spec.stride), list(spec.gemm_padding(w.shape)), list(spec.dilation),
            False, [0] * n, spec.groups, mask)

    def grad_input(self, spec, dy, x, w):
        if spec.kind == "conv":
            return self._conv_backward(spec, dy, x, w, [True, False, False])[0]
        if spec.kind == "linear":
            return dy.matmul(w)
        return dy.matmul(w.mT).sum_to_size(x.shape)

    def grad_weight(self, spec, x, dy, w):
        if spec.kind == "conv":
            return self._conv_backward(spec, dy, x, w, [False, True, False])[1]
        if spec.kind == "linear":
            return dy.reshape(-1, dy.shape[-1]).mT.matmul(x.reshape(-1, x.shape[-1]))
        return x.mT.matmul(dy).sum_to_size(w.shape)


class UnavailableBackend(ReferenceBackend):
    """Stands in for a backend that cannot load (TVM missing or broken): every site runs on the
    reference backend and reports ``reason``."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def unsupported_reason(self, spec, prec=None, scheme="sbm", weight_shape=None):
        return self.reason


_BACKENDS: dict = {"reference": ReferenceBackend()}


def get_backend(name: str, options: dict | None = None, **kwargs) -> KernelBackend:
    """The backend called ``name``, one per distinct ``options`` (``tvm``: ``kernels``,
    ``tuning_db``, ``kernels_fallback``; see :class:`~fraccompile.FracConfig`). ``tvm`` is created
    on first use (this imports TVM)."""
    opts = tuple(sorted({**(options or {}), **kwargs}.items()))
    key = (name, opts) if opts else name
    if name == "tvm" and key not in _BACKENDS:
        from ..targets import tvm_unavailable_reason
        reason = tvm_unavailable_reason()
        if reason is None:
            from ..targets.backend import make_tvm_backend
            _BACKENDS[key] = make_tvm_backend(dict(opts))
        else:
            _BACKENDS[key] = UnavailableBackend(name, reason)
    if opts and name != "tvm":
        raise ValueError(f"backend {name!r} takes no options (got {dict(opts)})")
    try:
        return _BACKENDS[key]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: available reference, tvm") from None
