"""epilogue-fusion: an elementwise activation right after a site becomes the site's epilogue,
and the other ReLUs keep a mask, not their output.

Before: ``z = act(site(x))`` where the site's output has no other user (``act``: GELU, ReLU or
SiLU, as a module, a function, a method or an aten op). After: ``z = site(x)`` with
``FracOp.epilogue`` set, and the activation node gone. Every other ReLU becomes
:func:`~fraccompile.ops.functions.masked_relu`, which saves a 1-byte mask for backward where
autograd's ReLU saves its fp32 output (an in-place ReLU only when nothing else reads its input).

What it buys is memory. Autograd keeps the activation's fp32 input for its backward; a fused site
keeps nothing beyond the int8 codes it saves anyway, and the ``tvm`` backend recomputes the
pre-activation output from those codes in backward (one more forward GEMM of that site) before
applying the activation's own backward op (``aten.gelu_backward`` …, the one autograd calls).
Values and gradients are those of the unfused graph, bit for bit. Both run in place on the GEMM's
fresh output (the forward's activation, and the backward op's result written over the recomputed
pre-activation): the same elementwise kernels, without a new tensor's first touch. On other
backends, and whenever a site runs off the integer kernels, the epilogue is the activation applied
to the output, so autograd sees the unfused graph.

On the ``tvm`` backend a site saves int8 codes of its input, not the fp32 tensor, so once the
activations stop saving theirs too, the fp32 tensor is freed after the forward use.

With ``FracConfig(recompute="norms")`` a BatchNorm right after a site (and an activation right
after the BatchNorm) joins the epilogue too: ``z = act(bn(site(x)))`` becomes ``z = site(x)`` with
``FracOp.epilogue_norm`` set to the BatchNorm module (which stays where it is in the module tree,
with its parameters and running statistics), and backward recomputes both.
``FracConfig.recompute_budget`` leaves some of the fused activations and BatchNorms unfused
(:func:`kept_sites`): those whose recompute costs the most per byte kept, up to that fraction of
all the bytes backward would keep for them unfused (fp32 inputs; a ReLU's 1-byte mask).

The pass runs for a backend with the ``INTEGER_KERNELS`` capability
(:func:`fraccompile.ops.backend.capabilities`: ``tvm``) unless ``recompute="none"``. It leaves alone sites
called more than once (a shared module), BatchNorms called more than once, and modules with hooks
(fusing their call away would skip the hooks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..meta_keys import EPILOGUES, META_CALL_SHAPES, META_SITE, REGIONS, SITES
from ..ops.backend import INTEGER_KERNELS, capabilities
from ..ops.functions import masked_relu
from ..ops.modules import FracOp
from .base import Pass, PassResult
from .cost_annotation import site_macs

_MODULES = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FUNCTIONS = {
    F.gelu: "gelu",
    F.relu: "relu",
    F.silu: "silu",
    torch.relu: "relu",
    torch.ops.aten.gelu.default: "gelu",
    torch.ops.aten.relu.default: "relu",
    torch.ops.aten.silu.default: "silu",
}
_METHODS = {"relu": "relu"}


def _activation(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
    """``(name, gelu approximation)`` when ``node`` applies a fusable activation to its first
    argument (and nothing else), else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        name = _MODULES.get(type(mod))
        if name is None or len(node.args) != 1 or node.kwargs or _hooked(mod):
            return None
        return name, getattr(mod, "approximate", "none") if name == "gelu" else ""
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        name = _METHODS.get(str(node.target))
    else:
        return None
    if name is None or len(node.args) != 1:
        return None
    kwargs = dict(node.kwargs)
    approximate = kwargs.pop("approximate", "none") if name == "gelu" else ""
    kwargs.pop("inplace", None)  # on the site's private output, in place or not is the same
    if kwargs or (name == "gelu" and approximate not in ("none", "tanh")):
        return None
    return name, approximate


class EpilogueFusion(Pass):
    name = "epilogue-fusion"
    description = "activation after a site -> the site's epilogue (recomputed in backward: tvm)"
    requires = frozenset({SITES})
    ensures = frozenset({EPILOGUES})
    invalidates = frozenset({REGIONS})  # fused and replaced nodes: regions name nodes that are gone

    def run(self, gm: fx.GraphModule) -> PassResult:
        if INTEGER_KERNELS not in capabilities(self.config) or self.config.recompute == "none":
            return PassResult(gm, False)
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        norms = self._norm_candidates(gm, calls) if self.config.recompute == "norms" else []
        acts = self._activation_candidates(gm, calls)
        budget = self.config.recompute_budget
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        sized = [(node, 4) for node, *_ in norms] + [(node, _kept_bytes(a)) for node, _, _, a in acts]
        kept = kept_sites(sorted(sized, key=lambda s: order[s[0]]), budget)
        modified = False
        for node, op, bn, norm in norms:
            if node in kept:
                node.meta[META_SITE].extra["epilogue"] = (
                    f"{type(norm).__name__} not fused (recompute_budget {budget:g})"
                )
                continue
            user, act = _sole_activation(gm, bn)
            last = user if act is not None else bn
            object.__setattr__(op, "epilogue_norm", norm)  # not a submodule: no second owner
            op.epilogue_norm_path = str(bn.target)  # fraccompile.compile keeps it there
            op.epilogue = act
            node.meta[META_SITE].extra["epilogue"] = op.describe_epilogue()
            last.replace_all_uses_with(node)
            if last is not bn:
                gm.graph.erase_node(last)
            gm.graph.erase_node(bn)
            modified = True
        for node, op, user, act in acts:
            if node in kept:
                node.meta[META_SITE].extra["epilogue"] = f"{act[0]} not fused (recompute_budget {budget:g})"
                continue
            op.epilogue = act
            node.meta[META_SITE].extra["epilogue"] = op.describe_epilogue()
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            modified = True
        for node in list(gm.graph.nodes):
            if node.target is masked_relu or not node.args or _activation(gm, node) != ("relu", ""):
                continue
            if _in_place(gm, node) and len(node.args[0].users) > 1:
                continue  # others read the input after it was overwritten: keep the in-place op
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(masked_relu, (node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)

    @staticmethod
    def _single_use_site(gm: fx.GraphModule, node: fx.Node, calls: dict) -> FracOp | None:
        """The FracOp ``node`` calls, when it is called only there and its output has one user."""
        if (
            META_SITE not in node.meta
            or node.op != "call_module"
            or len(node.users) != 1
            or calls[str(node.target)] != 1
        ):
            return None
        op = gm.get_submodule(str(node.target))
        return op if isinstance(op, FracOp) else None

    def _norm_candidates(self, gm: fx.GraphModule, calls: dict) -> list:
        """``(site node, FracOp, BatchNorm node, BatchNorm)`` for every site whose only user is a
        BatchNorm called once, in graph order."""
        found = []
        for node in gm.graph.nodes:
            op = self._single_use_site(gm, node, calls)
            if op is None or op.epilogue_norm is not None:
                continue
            (bn,) = node.users
            if bn.op != "call_module" or bn.args != (node,) or bn.kwargs or calls[str(bn.target)] != 1:
                continue
            norm = gm.get_submodule(str(bn.target))
            if type(norm) not in _NORMS or _hooked(norm):
                continue
            found.append((node, op, bn, norm))
        return found

    def _activation_candidates(self, gm: fx.GraphModule, calls: dict) -> list:
        """``(site node, FracOp, activation node, (name, approximation))`` for every site whose
        only user is a fusable activation of it, in graph order."""
        found = []
        for node in gm.graph.nodes:
            op = self._single_use_site(gm, node, calls)
            if op is None or op.epilogue is not None or op.epilogue_norm is not None:
                continue
            user, act = _sole_activation(gm, node)
            if act is not None:
                found.append((node, op, user, act))
        return found


def kept_sites(sites: list[tuple[fx.Node, int]], budget: float) -> set[fx.Node]:
    """The sites whose output backward keeps (their BatchNorm or activation not fused) under
    ``budget``, from ``(site node, bytes per element kept)`` in graph order: the fraction of all
    these bytes that backward may keep. Recomputing an output costs one forward GEMM: ``K``
    multiply-accumulates per element (``K`` the reduction length, ``Cin/groups·kh·kw`` of a
    conv), so the sites with the most MACs per byte kept go first, while their bytes fit. In
    ResNet-20 the first stage's convs have a quarter of the last stage's ``K`` and most of the
    bytes; in the Transformer the FFN's GELU input is the only candidate. Sites without
    propagated shapes are fused (not counted)."""
    if budget <= 0:
        return set()
    sized = []
    for node, nbytes in sites:
        x, w, out = node.meta.get(META_CALL_SHAPES, ((), (), ()))
        numel = math.prod(out) if out else 0
        if numel:
            k = site_macs(node.meta[META_SITE].kind, x, w, out) / numel
            sized.append((k / nbytes, numel * nbytes, node))
    room = budget * sum(size for _, size, _ in sized)
    kept = set()
    for _, size, node in sorted(sized, key=lambda s: -s[0]):  # stable: graph order on ties
        if size <= room:
            kept.add(node)
            room -= size
    return kept


def _kept_bytes(act: tuple[str, str]) -> int:
    """Bytes per element backward keeps for an unfused activation: a ReLU's 1-byte mask
    (:func:`~fraccompile.ops.functions.masked_relu`), another's fp32 input."""
    return 1 if act[0] == "relu" else 4


def _sole_activation(gm: fx.GraphModule, node: fx.Node):
    """``(user, activation)`` when ``node``'s only user is a fusable activation of it, else
    ``(None, None)``."""
    if len(node.users) != 1:
        return None, None
    (user,) = node.users
    act = _activation(gm, user) if user.args and user.args[0] is node else None
    return (user, act) if act is not None else (None, None)


def _hooked(mod: nn.Module) -> bool:
    """A module with hooks keeps its call: fusing it away would skip them."""
    return bool(
        mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks
    )


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    return bool(node.kwargs.get("inplace", False))
