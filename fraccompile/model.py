"""FracModel: the compiled module. A ``torch.fx.GraphModule`` whose graph contains the sites,
precision-control nodes and (later) gates, plus views of them for people and tools."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import fx

from .config import FracConfig
from .control.controller import PrecisionController
from .cost import CostReport, cost_report
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

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.frac_config = replace(self.frac_config)
        return res
