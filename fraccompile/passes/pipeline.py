"""Named pipelines: ordered lists of passes, with a graph lint after each pass."""

from __future__ import annotations

from torch import fx

from ..config import FracConfig
from ..errors import PassError
from .base import Pass
from .channels_last import ChannelsLast
from .cost_annotation import CostAnnotation
from .epilogue_fusion import EpilogueFusion
from .gating_insertion import GatingInsertion
from .quantize_insertion import QuantizeInsertion
from .region_discovery import RegionDiscovery

PASSES: dict[str, type[Pass]] = {p.name: p for p in (QuantizeInsertion, CostAnnotation,
                                                     RegionDiscovery, GatingInsertion,
                                                     EpilogueFusion, ChannelsLast)}
PIPELINES: dict[str, tuple[str, ...]] = {
    "default": ("quantize-insertion", "cost-annotation", "epilogue-fusion", "channels-last"),
    "dfq": ("quantize-insertion", "cost-annotation", "region-discovery", "gating-insertion",
            "epilogue-fusion", "channels-last"),
    "cost-only": ("cost-annotation",),
}


def get_pass(name: str, config: FracConfig | None = None) -> Pass:
    try:
        return PASSES[name](config)
    except KeyError:
        raise PassError(f"unknown pass {name!r}: valid passes are {', '.join(PASSES)}") from None


def get_pipeline(name: str, config: FracConfig | None = None) -> list[Pass]:
    try:
        names = PIPELINES[name]
    except KeyError:
        raise PassError(f"unknown pipeline {name!r}: valid pipelines are "
                        f"{', '.join(PIPELINES)}") from None
    return [get_pass(n, config) for n in names]


def run_passes(gm: fx.GraphModule, passes: list[Pass]) -> fx.GraphModule:
    """Run ``passes`` in order; lint and recompile after each one that changed the graph."""
    for p in passes:
        result = p.run(gm)
        gm = result.graph_module
        try:
            gm.graph.lint()
        except Exception as err:  # noqa: BLE001
            raise PassError(f"pass {p.name!r} left an invalid graph: {err}") from err
        if result.modified:
            gm.recompile()
    return gm
