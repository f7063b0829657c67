"""The backend interface and registry: how a site call is computed.

A backend receives one :class:`~fraccompile.ops.contract.SiteCall` and the operands per call of a
site (``run_site``) and returns the site's output, its epilogue applied. ``ReferenceBackend`` is the
semantics every other backend is checked against: torch ops on fake-quantized operands, in the
operands' dtype (the autograd Functions of :mod:`fraccompile.ops.functions`). A backend that cannot
run a call says why (``unsupported_reason``); the site then runs on the reference backend and
reports the reason.

Backends register themselves (:func:`register_backend`); this module never imports one. The
``tvm`` backend registers from :mod:`fraccompile.targets` without importing TVM: its factory runs
on first use.
"""

from __future__ import annotations

import functools
from abc import ABC
from typing import Callable

import torch
import torch.nn.functional as F

from .contract import GateDecision, SiteCall
from .functions import GateProbe, SiteGemm, STEQuantize, apply_epilogue
from .quantizers import (
    qparams_from_range,
    quantize_activation,
    quantize_rows,
    quantize_weight,
    quantize_weight_for_backprop,
    tensor_range,
)
from .spec import CONV_FNS, SiteSpec

# What a backend can do, for the passes that adapt the graph to it (instead of branching on names).
INTEGER_KERNELS = "integer-kernels"  # saves integer codes, so an epilogue recompute is cheap
CHANNELS_LAST = "channels-last"  # conv sites read and write channels-last


class KernelBackend(ABC):  # noqa: B024  (every method has a default; subclasses override some)
    name: str = "abstract"
    capabilities: frozenset[str] = frozenset()

    def unsupported_reason(self, call: SiteCall) -> str | None:
        """Why this backend cannot run ``call`` (None when it can); such calls run on the
        reference backend."""
        return None

    def run_site(
        self, call: SiteCall, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        """The output of one site call (``w``: the weight, or a matmul's second operand), its
        epilogue applied, differentiable w.r.t. ``x``, ``w``, ``b`` (and the epilogue norm's
        parameters) with the contract's gradients."""
        raise NotImplementedError

    # A backend is a process-wide service (the TVM one holds compiled kernels): copies and pickles
    # of a model share it, and unpickling looks it up by name.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return get_backend, (self.name,)

    # -- the three GEMMs on float operands (the reference's, and fallbacks of other backends) ----
    def forward(self, spec: SiteSpec, x, w, bias):
        if spec.kind == "conv":
            return CONV_FNS[spec.conv_dims](
                x, w, bias, spec.stride, spec.gemm_padding(w.shape), spec.dilation, spec.groups
            )
        if spec.kind == "linear":
            return F.linear(x, w, bias)
        return torch.matmul(x, w)

    def _conv_backward(self, spec, dy, x, w, mask):
        n = spec.conv_dims
        return torch.ops.aten.convolution_backward(
            dy,
            x,
            w,
            None,
            list(spec.stride),
            list(spec.gemm_padding(w.shape)),
            list(spec.dilation),
            False,
            [0] * n,
            spec.groups,
            mask,
        )

    def grad_input(self, spec: SiteSpec, dy, x, w):
        if spec.kind == "conv":
            return self._conv_backward(spec, dy, x, w, [True, False, False])[0]
        if spec.kind == "linear":
            return dy.matmul(w)
        return dy.matmul(w.mT).sum_to_size(x.shape)

    def grad_weight(self, spec: SiteSpec, x, dy, w):
        if spec.kind == "conv":
            return self._conv_backward(spec, dy, x, w, [False, True, False])[1]
        if spec.kind == "linear":
            return dy.reshape(-1, dy.shape[-1]).mT.matmul(x.reshape(-1, x.shape[-1]))
        return x.mT.matmul(dy).sum_to_size(w.shape)

    @staticmethod
    def grad_bias(spec: SiteSpec, dy: torch.Tensor) -> torch.Tensor:
        if spec.kind == "conv":
            return dy.sum(dim=[d for d in range(dy.dim()) if d != 1])
        return dy.reshape(-1, dy.shape[-1]).sum(0)


def quantize_operand(call: SiteCall, t: torch.Tensor, bits: int, which: str) -> torch.Tensor:
    """The fake-quantized ``x`` (``which="x"``) or weight / second operand (``"w"``) of ``call`` at
    ``bits``, with the straight-through estimator."""
    if not bits:
        return t
    if which == "w" and call.spec.kind != "matmul":
        return STEQuantize.apply(
            t,
            functools.partial(
                quantize_weight, bits=bits, scheme=call.scheme, per_channel=call.weight_scale != "tensor"
            ),
        )
    lo, hi = (call.x_range if which == "x" else call.y_range) or (None, None)
    return STEQuantize.apply(
        t, functools.partial(quantize_activation, bits=bits, scheme=call.scheme, lo=lo, hi=hi)
    )


def finish(call: SiteCall, y: torch.Tensor) -> torch.Tensor:
    """``y`` through the call's epilogue (norm, then activation) as autograd ops."""
    if call.epilogue_norm is not None:
        y = call.epilogue_norm(y)
    return apply_epilogue(call.epilogue, y)


class ReferenceBackend(KernelBackend):
    """torch ops in the operands' dtype on fake-quantized values: the contract's semantics."""

    name = "reference"

    def run_site(self, call, x, w, b):
        if call.rows is not None:
            return finish(call, self.run_routed(call, x, w, b))
        qx = quantize_operand(call, x, call.prec.a, "x")
        qw = quantize_operand(call, w, call.prec.w, "w")
        return finish(call, self.gemm(call, qx, qw, b, call.prec.g, w))

    def gemm(self, call: SiteCall, qx, qw, b, g_bits, w=None) -> torch.Tensor:
        """The site's GEMM on quantized operands, ``dy`` quantized at ``g_bits`` (an int, or an
        ``(N,)`` tensor of per-sample bits) in backward; ``w``: the full-precision weight, which
        ``weight_scale="gemm"`` quantizes again per input channel for the error backprop."""
        qw_eb = None
        if call.weight_scale == "gemm" and w is not None and call.spec.kind != "matmul" and qw is not w:
            qw_eb = quantize_weight_for_backprop(w.detach(), call.bits.w, call.scheme, call.spec.groups)
        spec = call.spec
        if spec.kind == "conv":
            if spec.pre_pad:
                mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
                qx = F.pad(qx, spec.pre_pad, mode=mode)
            extra = spec.same_extra_pad(tuple(qw.shape))
            if extra:
                qx = F.pad(qx, extra)
        return SiteGemm.apply(qx, qw, b, spec, g_bits, call.scheme, self, call.rounding_noise, qw_eb)

    def run_routed(self, call: SiteCall, x, w, b) -> torch.Tensor:
        """Each sample at its own (a, g) from ``call.rows`` (without the epilogue): one shared
        range, per-sample step sizes; the gate's gradient from :class:`GateProbe`."""
        d = call.rows
        lo, hi = call.x_range or tensor_range(x)
        qw = quantize_operand(call, w, d.w, "w")

        def quantize_at(t: torch.Tensor, bits: int) -> torch.Tensor:
            return quantize_activation(t, bits, call.scheme, lo=lo, hi=hi)

        a_bits = d.row_bits("a")
        qx = STEQuantize.apply(
            x, lambda t: quantize_rows(t, a_bits, lambda k: qparams_from_range(lo, hi, k, call.scheme))
        )
        qx = GateProbe.apply(qx, d.onehot, x.detach(), quantize_at, d.a)
        return self.gemm(call, qx, qw, b, d.row_bits("g"), w)


class UnavailableBackend(ReferenceBackend):
    """Stands in for a backend that cannot load (TVM missing or broken): every site runs on the
    reference backend and reports ``reason``."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def unsupported_reason(self, call):
        return self.reason


# -- the registry ----------------------------------------------------------------------------------
# name -> (factory(options) -> backend, unavailable() -> reason or None, accepts options)
_FACTORIES: dict[str, tuple[Callable[[dict], KernelBackend], Callable[[], str | None], bool]] = {}
_BACKENDS: dict = {"reference": ReferenceBackend()}
AUTO = "auto"


def register_backend(
    name: str,
    factory: Callable[[dict], KernelBackend],
    unavailable: Callable[[], str | None] = lambda: None,
    options: bool = False,
) -> None:
    """Make ``name`` a backend: ``factory(options)`` builds it on first use (so registering
    imports nothing heavy); ``unavailable()`` returns why it cannot load on this machine (then
    its sites run on the reference backend with that reason); ``options``: whether it takes
    options (:meth:`FracConfig.backend_options`)."""
    if name in ("reference", AUTO):
        raise ValueError(f"backend name {name!r} is reserved")
    _FACTORIES[name] = (factory, unavailable, options)


def backend_names() -> tuple[str, ...]:
    return ("reference", *_FACTORIES, AUTO)


def resolve_auto() -> str:
    """What ``backend="auto"`` runs: the first registered backend that can load here (``tvm``
    where TVM imports and builds for this host), else ``reference``."""
    for name, (_, unavailable, _) in _FACTORIES.items():
        if unavailable() is None:
            return name
    return "reference"


def get_backend(name: str, options: dict | None = None, **kwargs) -> KernelBackend:
    """The backend called ``name`` (``auto``: :func:`resolve_auto`), one per distinct ``options``
    (``tvm``: ``kernels``, ``tuning_db``, ``kernels_fallback``; see
    :class:`~fraccompile.FracConfig`). Registered backends are built on first use."""
    opts = tuple(sorted({**(options or {}), **kwargs}.items()))
    if name == AUTO:
        name = resolve_auto()
        if name == "reference":  # the options were for the backend that cannot load here
            opts = ()
    key = (name, opts) if opts else name
    if key in _BACKENDS:
        return _BACKENDS[key]
    if name not in _FACTORIES:
        if name == "reference":
            raise ValueError(f"backend {name!r} takes no options (got {dict(opts)})")
        raise ValueError(f"unknown backend {name!r}: available {', '.join(backend_names())}")
    factory, unavailable, takes_options = _FACTORIES[name]
    if opts and not takes_options:
        raise ValueError(f"backend {name!r} takes no options (got {dict(opts)})")
    reason = unavailable()
    _BACKENDS[key] = factory(dict(opts)) if reason is None else UnavailableBackend(name, reason)
    return _BACKENDS[key]


def capabilities(config) -> frozenset[str]:
    """The capabilities of the backend a :class:`~fraccompile.FracConfig` selects (empty where it
    cannot load: every site then runs on the reference backend)."""
    return get_backend(config.backend, **config.backend_options).capabilities


__all__ = [
    "AUTO",
    "CHANNELS_LAST",
    "INTEGER_KERNELS",
    "GateDecision",
    "KernelBackend",
    "ReferenceBackend",
    "UnavailableBackend",
    "backend_names",
    "capabilities",
    "finish",
    "get_backend",
    "quantize_operand",
    "register_backend",
    "resolve_auto",
]
