"""region-discovery: find the gateable regions of a graph with networkx (DFQ).

A *residual region* is a single-entry subgraph whose output merges a block path with a shortcut by
addition: for each ``add`` node, the entry is its immediate dominator in the activation data-flow
graph, and the region is every node on a path from the entry to the add. Its sites are the sites on
those paths (a downsampling shortcut conv included). When the shortcut is the identity (one input of
the add *is* the entry), the block can be skipped. Every site not inside a residual region forms a
region of its own. Transformer sub-layers (``x + attn(ln(x))``, ``x + mlp(ln(x))``) are residual
regions too.

Before: site nodes carry ``meta["frac_site"]``.
After:  ``gm.meta["frac_regions"]`` lists :class:`Region` in graph order and every node inside a
region carries ``meta["frac_region"]`` (its name). The graph itself is unchanged.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from ..meta_keys import GM_REGIONS, META_REGION, META_SITE, META_SITE_PARTS, REGIONS, SITES
from .base import Pass, PassResult

__all__ = ["Region", "RegionDiscovery", "dataflow_graph", "find_regions", "node_sites"]

_SOURCE = "__source__"
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}


@dataclass
class Region:
    name: str
    kind: str  # "residual" | "site"
    entry: str  # node whose output feeds the region (the gate reads it)
    exit: str  # the add (residual) or the site node
    sites: list[str] = field(default_factory=list)  # site names, graph order
    skippable: bool = False  # identity shortcut: the whole block may be skipped


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Activation data flow: nodes reachable from the inputs (parameters, constants and
    precision-control nodes are left out), rooted at a virtual source."""
    g = nx.DiGraph()
    g.add_node(_SOURCE)
    live: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            g.add_edge(_SOURCE, node.name)
            live.add(node.name)
            continue
        inputs = [i.name for i in node.all_input_nodes if i.name in live]
        if inputs and node.op != "output":
            live.add(node.name)
            for i in inputs:
                g.add_edge(i, node.name)
    return g


def find_regions(gm: fx.GraphModule) -> list[Region]:
    """The regions of ``gm`` in graph order (see the module docstring); tags ``node.meta``."""
    g = dataflow_graph(gm)
    idom = nx.immediate_dominators(g, _SOURCE)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    site_of = node_sites(gm)
    first_call = {}
    for node_name, sites in site_of.items():
        for site in sites:
            first_call.setdefault(site, order[node_name])
    found: list[tuple[Region, set[str]]] = []
    covered: set[str] = set()
    for node in gm.graph.nodes:
        if node.name not in g or not _is_add(node):
            continue
        inputs = {i.name for i in node.all_input_nodes if i.name in g}
        entry = idom[node.name]
        if len(inputs) < 2 or entry == _SOURCE:
            continue
        body = (nx.descendants(g, entry) & nx.ancestors(g, node.name)) | {node.name}
        sites = sorted({s for n in body for s in site_of.get(n, ())}, key=first_call.get)
        if not sites or covered & set(sites):
            continue  # nothing to gate, or nested in a region found already
        covered |= set(sites)
        found.append((Region("", "residual", entry, node.name, sites, entry in inputs), body))
    for node in gm.graph.nodes:
        sites = [s for s in site_of.get(node.name, ()) if s not in covered]
        if sites and node.name in g:
            covered.update(sites)
            found.append((Region("", "site", node.all_input_nodes[0].name, node.name, sites), {node.name}))
    found.sort(key=lambda rb: order[rb[0].exit])
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, (region, body) in enumerate(found):
        region.name = f"region{i}"
        for n in body:
            nodes[n].meta[META_REGION] = region.name
    return [r for r, _ in found]


def node_sites(gm: fx.GraphModule) -> dict[str, list[str]]:
    """node name -> the quantized sites it calls (one, or a composite's parts)."""
    out = {}
    for n in gm.graph.nodes:
        if META_SITE in n.meta:
            out[n.name] = [n.meta[META_SITE].name]
        elif n.meta.get(META_SITE_PARTS):
            names = [i.name for i, _ in n.meta[META_SITE_PARTS] if not i.full_precision]
            if names:
                out[n.name] = names
    return out


class RegionDiscovery(Pass):
    name = "region-discovery"
    description = "residual blocks and lone sites as gateable regions (networkx dominators)"
    requires = frozenset({SITES})
    ensures = frozenset({REGIONS})

    def run(self, gm: fx.GraphModule) -> PassResult:
        gm.meta[GM_REGIONS] = find_regions(gm)
        return PassResult(gm, False)
