"""FracModel: the compiled module. A ``torch.fx.GraphModule`` whose graph contains the sites,
precision-control nodes and (later) gates, plus views of them for people and tools."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import fx

from .config import FracConfig
from .control.controller import PrecisionController
from .cost import CostMeter, CostReport, cost_report, mixed_site_cost, site_cost
from .ops.modules import FracOp
from .ops.spec import Precision
from .passes.base import META_FP_LAYER, META_PRECISION_NODE, META_SITE, SiteInfo
from .passes.composite_sites import META_SITE_PARTS
from .passes.coverage import GM_FP32_OPS, Fp32Op
from .passes.gating_insertion import META_GATE
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
    epilogue: str = ""  # what the tvm backend fused after the op, e.g. "BatchNorm2d+relu"


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
            infos = [info] if info is not None else \
                [i for i, _ in node.meta.get(META_SITE_PARTS, [])]
            for info in infos:
                seen.setdefault(info.name, info)
        return list(seen.values())

    @property
    def fp32_ops(self) -> list[Fp32Op]:
        """Every GEMM-like op that runs in fp32 and why (layers kept by the config, ops no site
        takes, GEMMs inside opaque leaf modules or functions): the coverage table."""
        return list(self.meta.get(GM_FP32_OPS, []))

    @property
    def sites(self) -> list[Site]:
        """Every quantizable op in graph order; ``full_precision`` ones are not quantized."""
        ctrl = self.precision
        ops = {m.site: m for m in self.modules() if isinstance(m, FracOp)}
        out = []
        for i in self._infos():
            prec = Precision() if i.full_precision else ctrl[i.name]
            backend, reason = "torch", None
            if not i.full_precision:
                backend, reason = (ops[i.name].kernel_status(prec) if i.name in ops
                                   else (i.backend, i.fallback_reason))
            out.append(Site(i.name, i.kind, i.op, i.input_shape, i.weight_shape, i.output_shape,
                            i.macs, prec, i.full_precision, backend, reason,
                            i.module_path, i.source, i.calls, i.extra.get("epilogue", "")))
        return out

    def cost(self) -> CostReport:
        """FW/EB/GC bit-cost of one training step at the captured batch size, per site and total
        (layers kept in full precision included at 32 bits). Gated (DFQ) sites count at the
        candidates chosen in the latest forward, weighted by their share of the batch."""
        bank, regions = self._gates(), self._site_regions()
        rows = []
        for s in self.sites:
            region = regions.get(s.name)
            if bank is not None and region in bank.last:
                shares = bank.fractions(region).detach().tolist()
                mixture = [(f, (a, s.precision.w, g)) for f, a, g in zip(shares, bank.a, bank.g)]
                rows.append(mixed_site_cost(s.name, s.macs, mixture))
            else:
                rows.append(site_cost(s.name, s.macs, s.precision, s.full_precision))
        return CostReport(tuple(rows))

    def gate_cp(self) -> torch.Tensor:
        """The expected cost ratio ``cp`` of the latest forward as a differentiable function of the
        gates' decisions (straight-through), for the DFQ cost regularizer."""
        bank, regions = self._gates(), self._site_regions()
        if bank is None or not bank.last:
            raise RuntimeError("gate_cp() needs a model compiled with pipeline='dfq' and a forward")
        total, fixed = 0.0, 0.0
        terms = []
        for s in self.sites:
            total += 3 * s.macs
            region = regions.get(s.name)
            if region in bank.last:
                w = s.precision.w or 32
                per_candidate = torch.tensor([(a * w + g * w + a * g) / 1024
                                              for a, g in zip(bank.a, bank.g)])
                terms.append(s.macs * (bank.fractions(region) * per_candidate).sum())
            else:
                fixed += site_cost(s.name, s.macs, s.precision).total
        return (sum(terms) + fixed) / total

    def _gates(self):
        return getattr(self, "frac_gates", None)

    def _site_regions(self) -> dict[str, str]:
        """site -> region of the gate feeding its precision node (DFQ), from the graph. Cached:
        cost() runs every training step and the graph does not change after compile."""
        key = (id(self.graph), len(self.graph.nodes))
        cached = self.__dict__.get("_site_regions_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        out = {}
        for node in self.graph.nodes:
            site = node.meta.get(META_PRECISION_NODE)
            if site is not None and len(node.args) > 1 and node.args[1] is not None:
                out[site] = node.args[1].meta[META_GATE]
        self.__dict__["_site_regions_cache"] = (key, out)
        return out

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
        res.__class__.__name__ = type(self).__name__
        res.frac_config = replace(self.frac_config)
        res.frac_schedule = copy.deepcopy(self.frac_schedule, memo)
        res.frac_iteration = self.frac_iteration
        res.frac_meter.load_state_dict(self.frac_meter.state_dict())
        return res
