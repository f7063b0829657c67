"""Bit-operation cost as FracTrain counts it.

Per site and training step, with precisions ``a`` (activation), ``w`` (weight), ``g`` (gradient) and
full precision counted as 32 bits::

    FW = MACs·a·w / (32·32)     forward GEMM
    EB = MACs·g·w / (32·32)     error backprop  dx = dy·w
    GC = MACs·a·g / (32·32)     weight gradient dw = x·dy

so each term is in "fp32 MAC equivalents"; the cost ratio ``cp`` is ``(FW + EB + GC) / (3·MACs)``.
Layers kept in full precision count at 32 bits (cp 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from .ops.spec import Precision

FULL = 32
# what a DFQ cost target is a fraction of: fp32 training of the whole model, or of the gated sites
CP_SCOPES = ("model", "gated")


def _bits(b: int) -> int:
    return b if b else FULL


@dataclass(frozen=True)
class SiteCost:
    name: str
    macs: int
    a: int
    w: int
    g: int
    fw: float
    eb: float
    gc: float
    full_precision: bool = False

    @property
    def total(self) -> float:
        return self.fw + self.eb + self.gc

    @property
    def cp(self) -> float:
        return self.total / (3 * self.macs) if self.macs else 1.0


def site_cost(
    name: str, macs: int, prec: Precision | tuple[int, int, int], full_precision: bool = False
) -> SiteCost:
    prec = Precision(*prec)
    a, w, g = (_bits(b) for b in prec)
    scale = FULL * FULL
    return SiteCost(
        name,
        macs,
        prec.a,
        prec.w,
        prec.g,
        macs * a * w / scale,
        macs * g * w / scale,
        macs * a * g / scale,
        full_precision,
    )


def mixed_site_cost(name: str, macs: int, mixture, full_precision: bool = False) -> SiteCost:
    """Expected cost of a gated site: ``mixture`` lists (share of samples, precision) pairs. The
    row's a/w/g are the share-weighted mean precisions."""
    parts = [(float(share), site_cost(name, macs, prec)) for share, prec in mixture]
    mean = [
        sum(share * float(b) for share, b in zip((s for s, _ in parts), bits))
        for bits in zip(*(Precision(*prec) for _, prec in mixture))
    ]
    return SiteCost(
        name,
        macs,
        *mean,
        sum(s * c.fw for s, c in parts),
        sum(s * c.eb for s, c in parts),
        sum(s * c.gc for s, c in parts),
        full_precision,
    )


@dataclass(frozen=True)
class CostReport:
    """Per-site costs of one training step at the captured batch size, and totals."""

    rows: tuple[SiteCost, ...]

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def fw(self) -> float:
        return sum(r.fw for r in self.rows)

    @property
    def eb(self) -> float:
        return sum(r.eb for r in self.rows)

    @property
    def gc(self) -> float:
        return sum(r.gc for r in self.rows)

    @property
    def total(self) -> float:
        return self.fw + self.eb + self.gc

    @property
    def fp32_total(self) -> float:
        return 3.0 * self.macs

    @property
    def cp(self) -> float:
        """Cost ratio against fp32 training of the same model (1.0 = no saving)."""
        return self.total / self.fp32_total if self.macs else 1.0

    @property
    def bitops(self) -> float:
        """Bit-operations of one step: ``total`` converted back from fp32-MAC units."""
        return self.total * FULL * FULL

    def summary(self) -> str:
        return (
            f"MACs/step (fwd) {self.macs:,}; FW {self.fw:,.0f} EB {self.eb:,.0f} "
            f"GC {self.gc:,.0f} (fp32-MAC units); cp = {self.cp:.4f} "
            f"({100 * self.cp:.2f}% of fp32 training)"
        )

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) | {"cp": r.cp} for r in self.rows],
            "macs": self.macs,
            "fw": self.fw,
            "eb": self.eb,
            "gc": self.gc,
            "cp": self.cp,
        }


def cost_report(entries: Iterable[tuple[str, int, Precision, bool]]) -> CostReport:
    return CostReport(tuple(site_cost(*e) for e in entries))


@dataclass
class CostMeter:
    """Cumulative bit-cost of a training run, next to what fp32 and static 8/8/8 (SBM) training
    would have spent on the same steps (all in fp32-MAC units)."""

    steps: int = 0
    fw: float = 0.0
    eb: float = 0.0
    gc: float = 0.0
    fp32: float = 0.0
    sbm: float = 0.0

    @property
    def total(self) -> float:
        return self.fw + self.eb + self.gc

    def add(self, step: CostReport, sbm: CostReport) -> None:
        self.steps += 1
        self.fw += step.fw
        self.eb += step.eb
        self.gc += step.gc
        self.fp32 += step.fp32_total
        self.sbm += sbm.total

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
