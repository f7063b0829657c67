"""Named pipelines: ordered lists of passes, checked against what each pass requires and ensures,
with a graph lint after each pass."""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx

from ..config import FracConfig
from ..errors import PassError
from ..meta_keys import CAPTURED, GM_PROPERTIES, PROPERTIES, SHAPES, TENSOR_META, VAL
from .base import Pass
from .channels_last import ChannelsLast
from .cost_annotation import CostAnnotation
from .epilogue_fusion import EpilogueFusion
from .gating_insertion import GatingInsertion
from .quantize_insertion import QuantizeInsertion
from .region_discovery import RegionDiscovery

PASSES: dict[str, type[Pass]] = {
    p.name: p
    for p in (
        QuantizeInsertion,
        CostAnnotation,
        RegionDiscovery,
        GatingInsertion,
        EpilogueFusion,
        ChannelsLast,
    )
}
PIPELINES: dict[str, tuple[str, ...]] = {
    "default": ("quantize-insertion", "cost-annotation", "epilogue-fusion", "channels-last"),
    "dfq": (
        "quantize-insertion",
        "cost-annotation",
        "region-discovery",
        "gating-insertion",
        "epilogue-fusion",
        "channels-last",
    ),
}


def get_pass(name: str, config: FracConfig | None = None) -> Pass:
    try:
        return PASSES[name](config)
    except KeyError:
        raise PassError(f"unknown pass {name!r}: valid passes are {', '.join(PASSES)}") from None


def get_pipeline(name: str, config: FracConfig | None = None) -> list[Pass]:
    """The passes of pipeline ``name``, checked (:func:`check_order`) for a captured graph."""
    try:
        names = PIPELINES[name]
    except KeyError:
        raise PassError(f"unknown pipeline {name!r}: valid pipelines are {', '.join(PIPELINES)}") from None
    passes = [get_pass(n, config) for n in names]
    check_order(passes, CAPTURED, what=f"pipeline {name!r}")
    return passes


def _missing_message(p: Pass, missing: set[str], what: str) -> str:
    providers = {prop: [n for n, cls in PASSES.items() if prop in cls.ensures] for prop in missing}
    parts = []
    for prop in sorted(missing):
        by = providers[prop]
        source = f"run {' or '.join(repr(b) for b in by)} before it" if by else "capture provides it"
        parts.append(f"{prop!r} ({PROPERTIES.get(prop, 'undeclared property')}): {source}")
    return f"{what}: pass {p.name!r} requires " + "; ".join(parts)


def check_order(
    passes: Iterable[Pass], have: Iterable[str] = CAPTURED, what: str = "pass list"
) -> frozenset[str]:
    """Walk ``passes`` from the graph properties ``have``; raise :class:`PassError` naming the
    first pass whose ``requires`` are not met and the pass that would ensure them. Returns the
    properties that hold after the last pass."""
    have = set(have)
    for p in passes:
        missing = set(p.requires) - have
        if missing:
            raise PassError(_missing_message(p, missing, what))
        have = (have - set(p.invalidates)) | set(p.ensures)
    return frozenset(have)


def graph_properties(gm: fx.GraphModule) -> frozenset[str]:
    """The properties ``gm`` holds: those recorded by earlier passes (``gm.meta``), plus
    ``shapes`` when its nodes carry shape metadata (a captured graph)."""
    have = set(gm.meta.get(GM_PROPERTIES, ()))
    if any(TENSOR_META in n.meta or VAL in n.meta for n in gm.graph.nodes if n.op != "output"):
        have.add(SHAPES)
    return frozenset(have)


def run_passes(gm: fx.GraphModule, passes: list[Pass]) -> fx.GraphModule:
    """Run ``passes`` in order: check each one's requirements against the properties the graph
    holds, lint and recompile after each one that changed the graph, and record the properties
    that hold at the end in ``gm.meta["frac_properties"]``."""
    have = graph_properties(gm)
    for p in passes:
        have = check_order([p], have, what="run_passes")
        result = p.run(gm)
        gm = result.graph_module
        try:
            gm.graph.lint()
        except Exception as err:  # noqa: BLE001
            raise PassError(f"pass {p.name!r} left an invalid graph: {err}") from err
        if result.modified:
            gm.recompile()
        gm.meta[GM_PROPERTIES] = have
    return gm
