"""channels-last: the 2-D convs kept in full precision read channels-last inputs (tvm backend).

The ``tvm`` backend's conv sites read their codes channels-last and write their outputs
channels-last, the layout oneDNN's fp32 convs on x86 are fastest in too. A conv kept in fp32
(``full_precision``, e.g. the first conv) on an NCHW input writes NCHW, and from it on every
elementwise op between the sites (BatchNorm, ReLU, residual sums) and their backward ops mix two
layouts, which torch runs in strided loops: in ResNet-20 the backward of the first quantized
conv's error backprop took more than twice as long on a channels-last gradient into an NCHW
layout as in one layout.

Before: ``y = conv(x)`` on a kept 2-D conv. After: ``y = conv(x.contiguous(memory_format=
torch.channels_last))``. Values are the same up to the summation order of oneDNN's fp32 kernel in
the other layout; the pass runs only for a backend with the ``CHANNELS_LAST`` capability
(:func:`fraccompile.ops.backend.capabilities`: ``tvm``).
"""

from __future__ import annotations

import torch
from torch import fx

from ..meta_keys import CHANNELS_LAST_INPUTS, META_CALL_SHAPES, META_FP_LAYER, SITES, TENSOR_META, VAL
from ..ops.backend import CHANNELS_LAST, capabilities
from .base import Pass, PassResult


class ChannelsLast(Pass):
    name = "channels-last"
    description = "2-D convs kept in fp32 read channels-last inputs (tvm: its conv sites' layout)"
    requires = frozenset({SITES})
    ensures = frozenset({CHANNELS_LAST_INPUTS})

    def run(self, gm: fx.GraphModule) -> PassResult:
        if CHANNELS_LAST not in capabilities(self.config):
            return PassResult(gm, False)
        modified = False
        for node in list(gm.graph.nodes):
            info = node.meta.get(META_FP_LAYER)
            if info is None or info.kind != "conv" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            x_shape, w_shape, _ = node.meta.get(META_CALL_SHAPES, ((), (), ()))
            if len(x_shape) != 4 or len(w_shape) != 4:
                continue
            with gm.graph.inserting_before(node):
                cl = gm.graph.call_method(
                    "contiguous", (node.args[0],), {"memory_format": torch.channels_last}
                )
            cl.meta.update({k: v for k, v in node.args[0].meta.items() if k in (TENSOR_META, VAL)})
            node.args = (cl, *node.args[1:])
            modified = True
        return PassResult(gm, modified)
