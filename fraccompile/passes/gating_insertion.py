"""gating-insertion: a DFQ gate per region, feeding the precision-control nodes of its sites.

Before (after region-discovery)::

    prec_layer1_0_conv1 = self.frac_precision('layer1.0.conv1')

After::

    gate_region0 = self.frac_gates('region0', relu, None)      # right after the region's entry
    prec_layer1_0_conv1 = self.frac_precision('layer1.0.conv1', gate_region0)
    ...
    gate_region1 = self.frac_gates('region1', relu_2, gate_region0)   # LSTM state flows on

``frac_gates`` is one :class:`~fraccompile.control.gates.GateBank` (per-region feature extractors,
one shared LSTM cell, one head). Candidates and mode come from the config (``gate_a``, ``gate_g``,
``gate_mode``).
"""

from __future__ import annotations

from torch import fx

from ..control.gates import GateBank
from ..meta_keys import (
    GATES,
    GM_REGIONS,
    META_GATE,
    META_PRECISION_NODE,
    META_SITE,
    META_SITE_PARTS,
    REGIONS,
    SITES,
)
from .base import Pass, PassResult, node_shape

GATES_MODULE = "frac_gates"


class GatingInsertion(Pass):
    name = "gating-insertion"
    description = "one DFQ gate per region, shared LSTM, feeding its sites' precision nodes"
    requires = frozenset({SITES, REGIONS})
    ensures = frozenset({GATES})

    def run(self, gm: fx.GraphModule) -> PassResult:
        regions = gm.meta[GM_REGIONS]
        if not regions:
            return PassResult(gm, False)
        nodes = {n.name: n for n in gm.graph.nodes}
        kinds = {
            n.meta[META_SITE].name: n.meta[META_SITE].kind for n in gm.graph.nodes if META_SITE in n.meta
        }
        kinds.update({i.name: i.kind for n in gm.graph.nodes for i, _ in n.meta.get(META_SITE_PARTS, [])})
        dims = {}
        for r in regions:
            shape = node_shape(nodes[r.entry]) or ()
            # channels of conv inputs are dim 1; linear/matmul features are the last dim
            dim = 1 if kinds[r.sites[0]] == "conv" else len(shape) - 1
            dims[r.name] = (shape[dim], dim)
        cfg = self.config
        gm.add_submodule(GATES_MODULE, GateBank(dims, cfg.gate_a, cfg.gate_g, cfg.gate_hidden, cfg.gate_mode))
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        prev = None
        for r in regions:
            anchor = nodes[r.entry]
            if prev is not None and order.get(prev.name, -1) > order[anchor.name]:
                anchor = prev
            with gm.graph.inserting_after(anchor):
                gate = gm.graph.create_node(
                    "call_module", GATES_MODULE, (r.name, nodes[r.entry], prev), {}, name=f"gate_{r.name}"
                )
            gate.meta[META_GATE] = r.name
            order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
            sites = set(r.sites)
            for n in gm.graph.nodes:
                if n.meta.get(META_PRECISION_NODE) in sites:
                    n.args = (n.args[0], gate)
                    if order[n.name] < order[gate.name]:  # keep the graph topologically sorted
                        gate.append(n)
                        order = {m.name: i for i, m in enumerate(gm.graph.nodes)}
            prev = gate
        return PassResult(gm, True)
