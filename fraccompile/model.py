"""FracModel: the compiled module. A ``torch.fx.GraphModule`` whose graph contains the sites,
precision-control nodes and (later) gates, plus views of them for people and tools."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import fx

from .config import FracConfig
from .control.controller import PrecisionController
from .cost import CostMeter, CostReport, cost_report
from .ops.spec import Precision
from .passes.base import META_FP_LAYER, META_SITE, SiteInfo
from .passes.quantize_insertion import PRECISION_MODULE


@dataclass(frozen=True)
class Site:
    """A read-only view of one site with its current precision."""

    name: str
    kind: str
    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    precision: Precision
    full_precision: bool
    backend: str
    fallback_reason: str | None
    module_path: str
    source: str
    calls: int


class FracModel(fx.GraphModule):
    """The result of :func:`fraccompile.compile`: an ``nn.Module`` that trains with FracTrain
    semantics. Its parameters are the original model's (shared, not copied).

    * ``.precision`` — the :class:`PrecisionController` every site reads at run time;
    * ``.sites`` — the sites (and the layers kept in full precision) with MACs and precisions;
    * ``.cost()`` — the paper's FW/EB/GC bit-cost of one training step;
    * ``.code`` — the transformed forward as Python source.
    """

    frac_config: FracConfig
    frac_schedule = None  # set by use_schedule
    frac_iteration = 0  # training iterations counted by frac_step

    @property
    def precision(self) -> PrecisionController:
        return self.get_submodule(PRECISION_MODULE).controller

    def _infos(self) -> list[SiteInfo]:
        seen: dict[str, SiteInfo] = {}
        for node in self.graph.nodes:
            info = node.meta.get(META_SITE) or node.meta.get(META_FP_LAYER)
            if info is not None and info.name not in seen:
                seen[info.name] = info
        return list(seen.values())

    @property
    def sites(self) -> list[Site]:
        """Every quantizable op in graph order; ``full_precision`` ones are not quantized."""
        ctrl = self.precision
        out = []
        for i in self._infos():
            prec = Precision() if i.full_precision else ctrl[i.name]
            out.append(Site(i.name, i.kind, i.op, i.input_shape, i.weight_shape, i.output_shape,
                            i.macs, prec, i.full_precision,
                            "torch" if i.full_precision else i.backend, i.fallback_reason,
                            i.module_path, i.source, i.calls))
        return out

    def cost(self) -> CostReport:
        """FW/EB/GC bit-cost of one training step at the captured batch size, per site and total
        (layers kept in full precision included at 32 bits)."""
        return cost_report((s.name, s.macs, s.precision, s.full_precision) for s in self.sites)

    def sbm_cost(self) -> CostReport:
        """Cost of one step of static 8/8/8 training (FracTrain's SBM baseline) of this model."""
        sbm = Precision(8, 8, 8)
        return cost_report((s.name, s.macs, Precision() if s.full_precision else sbm,
                            s.full_precision) for s in self.sites)

    # -- training-time hooks ----------------------------------------------------------------------
    @property
    def frac_meter(self) -> CostMeter:
        if "_frac_meter" not in self.__dict__:
            self.__dict__["_frac_meter"] = CostMeter()
        return self.__dict__["_frac_meter"]

    def use_schedule(self, schedule) -> FracModel:
        """Let ``schedule`` (see :mod:`fraccompile.control.schedules`) drive the precisions; it is
        applied now for iteration ``frac_iteration``."""
        if not (hasattr(schedule, "apply") and hasattr(schedule, "observe")):
            raise TypeError(f"{type(schedule).__name__} is not a schedule: it needs "
                            "apply(controller, iteration) and observe(iteration, loss)")
        self.frac_schedule = schedule
        schedule.apply(self.precision, self.frac_iteration)
        return self

    def frac_step(self, loss) -> list[dict]:
        """Call once per training iteration, after the step: counts the step's bit-cost at the
        precision it ran with, feeds the loss to the schedule and applies the schedule for the next
        iteration. Returns the schedule's events (e.g. PFQ turning points)."""
        self.frac_meter.add(self.cost(), self._sbm_cost())
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().item()
        events: list[dict] = []
        if self.frac_schedule is not None:
            events = self.frac_schedule.observe(self.frac_iteration, float(loss))
        self.frac_iteration += 1
        if self.frac_schedule is not None:
            self.frac_schedule.apply(self.precision, self.frac_iteration)
        return events

    def _sbm_cost(self) -> CostReport:
        cached = self.__dict__.get("_sbm_cost_cache")
        if cached is None:
            cached = self.__dict__["_sbm_cost_cache"] = self.sbm_cost()
        return cached

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.frac_config = replace(self.frac_config)
        res.frac_schedule = copy.deepcopy(self.frac_schedule, memo)
        res.frac_iteration = self.frac_iteration
        res.frac_meter.load_state_dict(self.frac_meter.state_dict())
        return res
