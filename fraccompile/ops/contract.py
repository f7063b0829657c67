"""The site-level backend contract: everything a kernel backend receives for one call of a site.

A site module (:class:`~fraccompile.ops.modules.FracOp`) owns the *state* of a site (its spec,
weights, running activation ranges, epilogue); for each call it describes the work as a
:class:`SiteCall` and hands it, with the operands, to a backend's ``run_site``. A backend reads
nothing else: not the module, not the controller, not the gates. So the semantics a backend must
meet are exactly these fields plus the quantization contract in ``docs/contract.md``:

* ``prec``: the site's bits (``a``, ``w``, ``g``; 0 keeps that tensor in full precision);
* ``scheme``: ``"sbm"`` (asymmetric codes with a float zero point) or ``"symmetric"``;
* ``weight_scale``: each GEMM its own weight ranges (``"gemm"``, the default: per output channel
  for the forward, and the error backprop reads the weight quantized again per input channel),
  one range per output channel for every GEMM (``"channel"``), or one per tensor;
* ``rounding_noise``: how the gradient's stochastic rounding draws its noise;
* ``x_range`` / ``y_range``: the grid ranges of the input and, for a matmul, of its second operand
  (the batch's in training, the running one in eval; None: the batch's, computed by the backend);
* ``rows``: per-sample precisions of a DFQ-routed site (:class:`GateDecision`), else None;
* ``epilogue_norm`` / ``epilogue``: what follows the GEMM in the graph and is applied to its output
  (a backend may fuse it; the reference applies it as ordinary autograd ops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .quantizers import DEFAULT_WEIGHT_SCALE
from .spec import Precision, SiteSpec


@dataclass
class GateDecision:
    """A gated site's precision for one forward: sample ``i`` takes candidate ``choice[i]``, which
    has ``a[k]`` activation and ``g[k]`` gradient bits; the weight has ``w`` bits for every sample.
    ``onehot`` is the gate's (straight-through) one-hot of ``choice``; ``mode`` is ``"routed"`` (each
    sample at its own precision) or ``"dense"`` (every candidate on the whole batch, mixed)."""

    onehot: torch.Tensor
    choice: torch.Tensor
    a: tuple[int, ...]
    g: tuple[int, ...]
    w: int
    mode: str

    def row_bits(self, which: str) -> torch.Tensor:
        """Bits per sample of ``which`` (``"a"`` or ``"g"``), an int64 ``(N,)`` tensor."""
        return torch.tensor(getattr(self, which), device=self.choice.device)[self.choice]

    @property
    def widest(self) -> Precision:
        """The largest candidate bits: what a backend must be able to run for every sample."""
        return Precision(max(self.a), self.w, max(self.g))


@dataclass(frozen=True, eq=False)
class SiteCall:
    """One call of a site, as a backend receives it (see the module docstring)."""

    site: str
    spec: SiteSpec
    prec: Precision
    scheme: str = "sbm"
    weight_scale: str = DEFAULT_WEIGHT_SCALE
    rounding_noise: str = "counter"
    weight_shape: tuple[int, ...] | None = None
    x_range: tuple[torch.Tensor, torch.Tensor] | None = None
    y_range: tuple[torch.Tensor, torch.Tensor] | None = None
    rows: GateDecision | None = None
    epilogue: tuple[str, str] | None = None
    epilogue_norm: nn.Module | None = field(default=None, repr=False)

    @property
    def bits(self) -> Precision:
        """The widest precision of the call (per-sample rows included)."""
        return self.rows.widest if self.rows is not None else self.prec
