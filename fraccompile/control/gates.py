"""DFQ gates: per-sample, per-region choice of (activation, gradient) precision.

One :class:`GateBank` per compiled model holds a small feature extractor per region, one LSTM cell
shared by every gate and one output head. In the graph each gate reads the region's input and the
previous gate's output (so the LSTM state flows through the regions in order and starts empty at
every forward)::

    gate_region0 = self.frac_gates('region0', relu, None)
    prec_layer1_0_conv1 = self.frac_precision('layer1.0.conv1', gate_region0)

The choice is hard in the forward pass (one-hot of the arg-max) with a straight-through gradient to
the softmax probabilities. Execution modes (``GateBank.mode``): ``"dense"`` computes every candidate
and mixes them with the one-hot (FracTrain's public code), ``"routed"`` runs each sample only at its
chosen precision (see :mod:`fraccompile.ops.modules`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import Function

from ..config import check_bits
from ..errors import ConfigError
from ..ops.contract import GateDecision

GATE_MODES = ("dense", "routed")
FRACTRAIN_A = (3, 4, 4, 6, 6)  # FracTrain's CIFAR candidates
FRACTRAIN_G = (6, 6, 8, 8, 12)


class HardOneHot(Function):
    """Forward: the exact one-hot of ``choice``; backward: the gradient goes to ``probs``."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, choice: torch.Tensor):
        return torch.zeros_like(probs).scatter_(1, choice[:, None], 1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@dataclass
class GateOutput:
    """What a gate node produces: the decision for its region and the LSTM state for the next."""

    region: str
    onehot: torch.Tensor  # (B, K), exact 0/1 forward, straight-through backward
    choice: torch.Tensor  # (B,) candidate index per sample
    state: tuple[torch.Tensor, torch.Tensor]
    bank: GateBank


class GateBank(nn.Module):
    def __init__(
        self,
        regions: dict[str, tuple[int, int]],
        a: tuple[int, ...] = FRACTRAIN_A,
        g: tuple[int, ...] = FRACTRAIN_G,
        hidden: int = 32,
        mode: str = "routed",
    ):
        """``regions`` maps a region name to (feature dim of its input, that dim's index)."""
        super().__init__()
        if len(a) != len(g) or not a:
            raise ConfigError(f"gate candidates a={a} and g={g} must be non-empty and pair up")
        for bits in (*a, *g):
            if not check_bits("gate candidate", bits):
                raise ConfigError("gate candidates must be quantized precisions (not 0)")
        self.a, self.g = tuple(a), tuple(g)
        self.mode = mode
        self.forced: int | None = None  # force every gate to one candidate (tests, ablations)
        self.feature_dim = {r: d for r, (_, d) in regions.items()}
        self.proj = nn.ModuleDict({r: nn.Linear(c, hidden) for r, (c, _) in regions.items()})
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, len(self.a))
        self.last: dict[str, GateOutput] = {}  # decisions of the latest forward, per region

    def __getstate__(self):  # the latest decisions hold autograd graphs: never copy or pickle them
        state = self.__dict__.copy()
        state["last"] = {}
        return state

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in GATE_MODES:
            raise ConfigError(f"gate mode {value!r}: choose {' or '.join(GATE_MODES)}")
        self._mode = value

    def extra_repr(self) -> str:
        return f"candidates a={self.a} g={self.g}, mode={self.mode}"

    def forward(self, region: str, x: torch.Tensor, prev: GateOutput | None) -> GateOutput:
        dim = self.feature_dim[region]
        reduce = [d for d in range(1, x.dim()) if d != dim % x.dim()]
        feat = (x.mean(reduce) if reduce else x).detach()  # gates do not steer the features
        h, c = self.lstm(torch.relu(self.proj[region](feat)), None if prev is None else prev.state)
        logits = self.head(h)
        probs = torch.softmax(logits, dim=1)
        if self.forced is not None:
            choice = torch.full((x.shape[0],), self.forced, dtype=torch.long, device=x.device)
        else:
            choice = logits.argmax(1)
        out = GateOutput(region, HardOneHot.apply(probs, choice), choice, (h, c), self)
        self.last[region] = out
        return out

    def decision(self, gate: GateOutput, w: int) -> GateDecision:
        return GateDecision(gate.onehot, gate.choice, self.a, self.g, w, self.mode)

    def fractions(self, region: str) -> torch.Tensor:
        """Share of the latest batch that chose each candidate (differentiable, STE)."""
        return self.last[region].onehot.mean(0)
