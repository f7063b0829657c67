"""quantize-insertion: every conv / linear / matmul becomes a site fed by a precision-control node.

Before (module, functional and aten forms alike)::

    conv1 = self.layer1.0.conv1(relu)
    linear = torch.nn.functional.linear(flatten, self.w, self.b)
    matmul = torch.matmul(q, transpose)

After::

    prec_layer1_0_conv1 = self.frac_precision('layer1.0.conv1')
    conv1 = self.layer1.0.conv1(relu, prec_layer1_0_conv1)        # now a FracOp owning the weights
    prec_linear = self.frac_precision('linear')
    linear = self.frac_sites.linear(flatten, w, b, prec_linear)   # FracOp; parameters stay in place
    prec_attn_matmul = self.frac_precision('attn.matmul')
    matmul = self.frac_sites.attn_matmul(q, transpose, prec_attn_matmul)

``frac_precision`` is a :class:`~fraccompile.ops.PrecisionReader` over one
:class:`~fraccompile.control.PrecisionController` created here with the config's initial precisions.
Layers selected by ``config.full_precision`` stay as they were and are tagged ``meta["frac_fp_layer"]``
(the keys: :mod:`fraccompile.meta_keys`).
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import FIRST_CONV, LAST_LINEAR
from ..control.controller import PrecisionController
from ..meta_keys import (
    GM_FP32_OPS,
    META_CALL_SHAPES,
    META_FP_LAYER,
    META_PRECISION_NODE,
    META_SITE,
    META_SITE_PARTS,
    NN_MODULE_STACK,
    SHAPES,
    SITES,
)
from ..ops.attention import AttentionSite, BaddbmmSite, EinsumSite, MultiheadAttentionSite
from ..ops.backend import get_backend
from ..ops.modules import FracOp, PrecisionReader
from ..ops.spec import Precision, SiteSpec
from .base import Pass, PassResult, SiteInfo, node_dtype, node_shape
from .composite_sites import CompositeMatch, match_addmm, match_composite, not_site
from .coverage import find_fp32_ops

PRECISION_MODULE = "frac_precision"
SITES_MODULE = "frac_sites"

aten = torch.ops.aten
_CONV_SIG = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_ATEN_CONVOLUTION_SIG = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
)
_LINEAR_SIG = ("input", "weight", "bias")
_MATMUL_SIG = ("input", "other")

# callable target -> (kind, op_name, signature, source)
_FUNCTION_SITES = {
    F.conv1d: ("conv", "conv1d", _CONV_SIG, "functional"),
    F.conv2d: ("conv", "conv2d", _CONV_SIG, "functional"),
    F.conv3d: ("conv", "conv3d", _CONV_SIG, "functional"),
    F.linear: ("linear", "linear", _LINEAR_SIG, "functional"),
    torch.matmul: ("matmul", "matmul", _MATMUL_SIG, "functional"),
    operator.matmul: ("matmul", "matmul", _MATMUL_SIG, "functional"),
    torch.bmm: ("matmul", "bmm", _MATMUL_SIG, "functional"),
    torch.mm: ("matmul", "mm", _MATMUL_SIG, "functional"),
    aten.conv1d.default: ("conv", "conv1d", _CONV_SIG, "aten"),
    aten.conv2d.default: ("conv", "conv2d", _CONV_SIG, "aten"),
    aten.conv3d.default: ("conv", "conv3d", _CONV_SIG, "aten"),
    aten.convolution.default: ("conv", "convolution", _ATEN_CONVOLUTION_SIG, "aten"),
    aten.linear.default: ("linear", "linear", _LINEAR_SIG, "aten"),
    aten.matmul.default: ("matmul", "matmul", _MATMUL_SIG, "aten"),
    aten.bmm.default: ("matmul", "bmm", _MATMUL_SIG, "aten"),
    aten.mm.default: ("matmul", "mm", _MATMUL_SIG, "aten"),
}
_METHOD_SITES = {"matmul": "matmul", "__matmul__": "matmul", "bmm": "bmm", "mm": "mm"}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass
class _Match:
    node: fx.Node
    kind: str
    spec: SiteSpec
    source: str
    operands: list  # graph values passed to the FracOp before the precision (x, w[, b])
    module: nn.Module | None = None  # the nn.Conv*/nn.Linear of a module site
    name: str = ""
    transpose_weight: bool = False  # addmm: the graph's operand is Wᵀ of the linear layer


def _normalize(node: fx.Node, sig: tuple[str, ...], skip_self: bool = False) -> dict:
    args = dict(zip(sig, node.args))
    args.update(node.kwargs)
    if skip_self:
        args = {"input": node.args[0], sig[1]: node.args[1]}
    return args


def _constant(value):
    if isinstance(value, fx.Node):
        raise _NotASite("a conv hyper-parameter is computed in the graph")
    return value


def _backend(cfg):
    return get_backend(cfg.backend, **cfg.backend_options)


class _NotASite(Exception):
    pass


def _match(gm: fx.GraphModule, node: fx.Node, kinds: tuple[str, ...]) -> _Match | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        x = node.args[0] if node.args else node.kwargs.get("input")
        if isinstance(mod, _CONV_MODULES) and "conv" in kinds:
            n = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[
                next(c for c in _CONV_MODULES if isinstance(mod, c))
            ]
            if mod.padding_mode != "zeros":
                spec = SiteSpec.conv(
                    n,
                    mod.stride,
                    0,
                    mod.dilation,
                    mod.groups,
                    mod.padding_mode,
                    mod._reversed_padding_repeated_twice,
                )
            else:
                spec = SiteSpec.conv(n, mod.stride, mod.padding, mod.dilation, mod.groups)
            return _Match(node, "conv", spec, "module", [x], mod)
        if isinstance(mod, nn.Linear) and "linear" in kinds:
            return _Match(node, "linear", SiteSpec("linear", "linear"), "module", [x], mod)
        if isinstance(mod, (*_CONV_MODULES, nn.Linear)):
            kind = "linear" if isinstance(mod, nn.Linear) else "conv"
            not_site(node, f"op kind {kind!r} not in FracConfig.ops")
        return None
    if node.op == "call_function" and node.target in _FUNCTION_SITES:
        kind, op_name, sig, source = _FUNCTION_SITES[node.target]
        args = _normalize(node, sig)
    elif node.op == "call_method" and node.target in _METHOD_SITES:
        kind, op_name, sig, source = "matmul", _METHOD_SITES[node.target], _MATMUL_SIG, "method"
        args = _normalize(node, sig, skip_self=True)
    else:
        return None
    if kind not in kinds:
        return not_site(node, f"op kind {kind!r} not in FracConfig.ops")
    x, w = args["input"], args[sig[1]]
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
        return not_site(node, "an operand is a constant, not a graph value")
    dtype = node_dtype(node)
    if dtype is not None and not dtype.is_floating_point:
        return not_site(node, f"{dtype} operands (not floating point)")
    if kind == "matmul":
        xs, ws = node_shape(x), node_shape(w)
        if xs is None or ws is None:
            return not_site(node, "operand shapes unknown")
        if len(xs) < 2 or len(ws) < 2:
            return not_site(node, "a vector product (not a GEMM)")
        return _Match(node, kind, SiteSpec("matmul", op_name), source, [x, w])
    if kind == "linear":
        b = args.get("bias")
        return _Match(
            node, kind, SiteSpec("linear", "linear"), source, [x, w] + ([b] if b is not None else [])
        )
    try:
        if op_name == "convolution" and _constant(args.get("transposed", False)):
            return not_site(node, "transposed convolution (not a FracTrain site)")
        ws = node_shape(w)
        if ws is None:
            return not_site(node, "weight shape unknown")
        n = len(ws) - 2
        conv = {k: _constant(args.get(k, d)) for k, d in _CONV_DEFAULTS.items() if k != "bias"}
    except _NotASite as err:
        return not_site(node, str(err))
    spec = SiteSpec.conv(n, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    b = args.get("bias")
    return _Match(node, "conv", spec, source, [x, w] + ([b] if b is not None else []))


def _module_path_of(node: fx.Node) -> tuple[str, str | None]:
    """(innermost module path, its class name) from ``nn_module_stack``."""
    stack = node.meta.get(NN_MODULE_STACK)
    if not stack:
        return "", None
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else cls.__qualname__
    return path, name.rsplit(".", 1)[-1]


def _site_name(m: _Match | CompositeMatch, used: dict[str, int]) -> str:
    if isinstance(m, CompositeMatch) and m.op == "mha":
        return str(m.node.target)
    if not isinstance(m, CompositeMatch) and m.source == "module":
        return str(m.node.target)
    path, cls = _module_path_of(m.node)
    if isinstance(m, CompositeMatch):
        base = f"{path}.{m.op}" if path else m.op
    elif m.source == "aten" and cls in (
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "Linear",
        "LazyLinear",
        "NonDynamicallyQuantizableLinear",
    ):
        base = path  # an nn layer seen through torch.export keeps its module path as its name
    else:
        op = m.spec.op_name if m.kind != "conv" else f"conv{m.spec.conv_dims}d"
        base = f"{path}.{op}" if path else op
    count = used.get(base, 0)
    used[base] = count + 1
    return base if count == 0 else f"{base}_{count}"


def _find(gm: fx.GraphModule, node: fx.Node, kinds) -> _Match | CompositeMatch | None:
    """The site (or composite site) ``node`` is, or None (a GEMM-like op left in fp32 gets
    ``meta["frac_not_site"]``)."""
    m = _match(gm, node, kinds)
    if m is not None:
        return m
    if node.op in ("call_function", "call_method") and node.target in (
        torch.addmm,
        aten.addmm.default,
        "addmm",
    ):
        found = match_addmm(node, kinds)
        if found is None:
            return None
        x, w, b = found
        return _Match(
            node,
            "linear",
            SiteSpec("linear", "addmm"),
            "method"
            if node.op == "call_method"
            else "aten"
            if node.target is aten.addmm.default
            else "functional",
            [x, w, b],
            transpose_weight=True,
        )
    return match_composite(gm, node, kinds)


def _parts(matches) -> list:
    """Sites in graph order, composites' parts expanded: ``(name, kind)`` objects."""
    out = []
    for m in matches:
        if isinstance(m, CompositeMatch):
            out += [p.info for p in m.parts]
        else:
            out.append(m)
    return out


def _select_full_precision(matches: list, patterns: tuple[str, ...]) -> set[str]:
    keep: set[str] = set()
    for pat in patterns:
        if pat == FIRST_CONV:
            convs = [m for m in matches if m.kind == "conv"]
            if convs:
                keep.add(convs[0].name)
        elif pat == LAST_LINEAR:
            linears = [m for m in matches if m.kind == "linear"]
            if linears:
                keep.add(linears[-1].name)
        else:
            keep.update(m.name for m in matches if fnmatch.fnmatchcase(m.name, pat))
    return keep


class QuantizeInsertion(Pass):
    name = "quantize-insertion"
    description = "conv/linear/matmul -> FracOp sites fed by precision-control nodes"
    requires = frozenset({SHAPES})
    ensures = frozenset({SITES})

    def run(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        used: dict[str, int] = {}
        matches: list[_Match] = []
        for node in list(gm.graph.nodes):
            m = _find(gm, node, cfg.ops)
            if m is not None:
                m.name = _site_name(m, used)
                if isinstance(m, CompositeMatch):
                    for p in m.parts:
                        name = f"{m.name}.{p.suffix}" if p.suffix else m.name
                        p.info = SiteInfo(
                            name=name,
                            kind=p.kind,
                            op=_part_op(m, p),
                            source="composite",
                            module_path="",
                            input_shape=p.shapes[0],
                            weight_shape=p.shapes[1],
                            output_shape=p.shapes[2],
                            backend=cfg.backend,
                        )
                matches.append(m)
        keep = _select_full_precision(_parts(matches), cfg.full_precision)
        site_names = list(dict.fromkeys(m.name for m in _parts(matches) if m.name not in keep))
        controller = PrecisionController(site_names, Precision(cfg.a, cfg.w, cfg.g))
        if not hasattr(gm, PRECISION_MODULE):
            gm.add_submodule(PRECISION_MODULE, PrecisionReader(controller))
        else:  # a second run keeps one controller per model
            gm.get_submodule(PRECISION_MODULE).controller = controller
        infos: dict[str, SiteInfo] = {}
        self._replaced: dict[fx.Node, fx.Node] = {}  # erased node -> its site node
        for m in matches:
            node = m.node
            m.operands = [self._replaced.get(o, o) if isinstance(o, fx.Node) else o for o in m.operands]
            if isinstance(m, CompositeMatch):
                for p in m.parts:
                    p.info.full_precision = p.info.name in keep
                node.meta[META_SITE_PARTS] = [(p.info, p.shapes) for p in m.parts]
                if not all(p.info.full_precision for p in m.parts):
                    self._rewrite_composite(gm, m, cfg)
                continue
            weight = m.module.weight if m.module is not None else None
            shapes = (
                node_shape(m.operands[0]) or (),
                tuple(weight.shape) if weight is not None else node_shape(m.operands[1]) or (),
                node_shape(node) or (),
            )
            if m.transpose_weight:
                shapes = (shapes[0], shapes[1][::-1], shapes[2])
            node.meta[META_CALL_SHAPES] = shapes
            if m.name in infos:  # another call of a shared module
                info = infos[m.name]
                info.calls += 1
            else:
                info = infos[m.name] = SiteInfo(
                    name=m.name,
                    kind=m.kind,
                    op=m.spec.describe(),
                    source=m.source,
                    module_path=str(node.target) if m.source == "module" else "",
                    input_shape=shapes[0],
                    weight_shape=shapes[1],
                    output_shape=shapes[2],
                    full_precision=m.name in keep,
                    backend=cfg.backend,
                )
            if info.full_precision:
                node.meta[META_FP_LAYER] = info
                continue
            self._rewrite(gm, m, info, cfg)
        gm.meta[GM_FP32_OPS] = find_fp32_ops(gm)
        return PassResult(gm, bool(site_names))

    def _rewrite(self, gm: fx.GraphModule, m: _Match, info: SiteInfo, cfg) -> None:
        graph, node = gm.graph, m.node
        safe = m.name.replace(".", "_")
        with graph.inserting_before(node):
            prec = graph.create_node("call_module", PRECISION_MODULE, (m.name,), {}, name=f"prec_{safe}")
        prec.meta[META_PRECISION_NODE] = m.name
        if m.source == "module":
            if not isinstance(gm.get_submodule(node.target), FracOp):  # first call: swap it in
                op = FracOp(
                    m.name,
                    m.spec,
                    scheme=cfg.scheme,
                    momentum=cfg.act_momentum,
                    backend=_backend(cfg),
                    weight=m.module.weight,
                    bias=m.module.bias,
                    weight_scale=cfg.weight_scale,
                    rounding_noise=cfg.rounding_noise,
                )
                parent, _, leaf = str(node.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, op)
            node.args, node.kwargs = (m.operands[0], prec), {}
            node.meta[META_SITE] = info
            return
        target = f"{SITES_MODULE}.{safe}"
        gm.add_submodule(target, self._op(m.name, m.spec, cfg))
        info.module_path = target
        operands = list(m.operands)
        if m.transpose_weight:
            with graph.inserting_before(node):
                operands[1] = graph.call_method("t", (operands[1],))
        with graph.inserting_before(node):
            new = graph.create_node("call_module", target, (*operands, prec), {}, name=f"{safe}_site")
        new.meta.update(node.meta)
        new.meta[META_SITE] = info
        node.replace_all_uses_with(new)
        self._replaced[node] = new
        graph.erase_node(node)

    @staticmethod
    def _op(name: str, spec: SiteSpec, cfg) -> FracOp:
        return FracOp(
            name,
            spec,
            scheme=cfg.scheme,
            momentum=cfg.act_momentum,
            backend=_backend(cfg),
            weight_scale=cfg.weight_scale,
            rounding_noise=cfg.rounding_noise,
        )

    def _rewrite_composite(self, gm: fx.GraphModule, m: CompositeMatch, cfg) -> None:
        """The composite's node becomes a call of its site module, with one precision node per
        quantized part (a kept part reads the constant full precision)."""
        graph, node = gm.graph, m.node
        safe = m.name.replace(".", "_")
        precs = []
        for p in m.parts:
            if p.info.full_precision:
                precs.append((0, 0, 0))
                continue
            with graph.inserting_before(node):
                prec = graph.create_node(
                    "call_module",
                    PRECISION_MODULE,
                    (p.info.name,),
                    {},
                    name=f"prec_{p.info.name.replace('.', '_')}",
                )
            prec.meta[META_PRECISION_NODE] = p.info.name
            precs.append(prec)
        ops = {p.suffix: self._op(p.info.name, p.spec, cfg) for p in m.parts}
        if m.op == "sdpa":
            module = AttentionSite(ops["qk"], ops["av"])
        elif m.op == "baddbmm":
            module = BaddbmmSite(ops[""])
        elif m.op == "einsum":
            module = EinsumSite(ops[""], m.extra["equation"], m.extra["plan"])
        else:
            module = MultiheadAttentionSite(
                m.module, ops["q"], ops["k"], ops["v"], AttentionSite(ops["qk"], ops["av"]), ops["out"]
            )
            module.mha_path = str(node.target)
        target = f"{SITES_MODULE}.{safe}"
        gm.add_submodule(target, module)
        for p in m.parts:
            p.info.module_path = f"{target}.{_child_path(m.op, p.suffix)}"
        with graph.inserting_before(node):
            new = graph.create_node("call_module", target, (*m.operands, *precs), {}, name=f"{safe}_site")
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self._replaced[node] = new
        graph.erase_node(node)


def _child_path(op: str, suffix: str) -> str:
    if op == "sdpa":
        return suffix
    if op == "mha":
        return f"attn.{suffix}" if suffix in ("qk", "av") else suffix
    return "mm"


def _part_op(m: CompositeMatch, p) -> str:
    if m.op == "sdpa":
        return f"sdpa {p.suffix}"
    if m.op == "einsum":
        return f"einsum {m.extra['equation']}"
    if m.op == "mha":
        return f"MultiheadAttention {p.suffix}"
    return m.op
