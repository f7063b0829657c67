"""cost-annotation: MACs per site from the propagated shapes.

Before: site nodes carry ``meta["frac_site"]`` (SiteInfo) with shapes but ``macs == 0``.
After:  ``SiteInfo.macs`` holds the multiply-accumulates of one forward GEMM at the captured batch
size (summed over every call of a shared module); the paper's bit-costs follow from it
(:mod:`fraccompile.cost`). The graph itself is unchanged.
"""

from __future__ import annotations

import math

from torch import fx

from ..meta_keys import MACS, META_CALL_SHAPES, META_FP_LAYER, META_SITE, META_SITE_PARTS, SITES
from .base import Pass, PassResult


def site_macs(kind: str, x: tuple[int, ...], w: tuple[int, ...], out: tuple[int, ...]) -> int:
    """Multiply-accumulates of one call: input, weight (second operand) and output shapes."""
    if not out or not w:
        return 0
    if kind == "conv":  # every output element reads Cin/groups * prod(kernel) weights
        return math.prod(out) * math.prod(w[1:])
    if kind == "linear":
        return math.prod(out) * w[-1]
    return math.prod(out) * (x[-1] if x else 0)  # matmul: K = last dim of the first operand


class CostAnnotation(Pass):
    name = "cost-annotation"
    description = "MACs per site (and per full-precision layer) from propagated shapes"
    requires = frozenset({SITES})
    ensures = frozenset({MACS})

    def run(self, gm: fx.GraphModule) -> PassResult:
        seen: set[int] = set()
        for node in gm.graph.nodes:
            info = node.meta.get(META_SITE) or node.meta.get(META_FP_LAYER)
            if info is not None:
                calls = [(info, node.meta[META_CALL_SHAPES])]
            else:  # a composite site: one entry per GEMM
                calls = node.meta.get(META_SITE_PARTS, [])
            for info, (x, w, out) in calls:
                macs = site_macs(info.kind, x, w, out)
                # a module called several times is one site: its MACs add up over the calls
                info.macs = info.macs + macs if id(info) in seen else macs
                seen.add(id(info))
        return PassResult(gm, False)
