"""Matching for the sites of quantize-insertion that are not one conv/linear/matmul call.

* ``addmm(bias, x, W)`` with ``W`` a parameter (HF GPT-2's ``Conv1D``): a *linear* site of weight
  ``Wᵀ`` (op ``addmm``: at precision 0 it calls ``torch.addmm`` on the original operands);
* composite sites (:mod:`fraccompile.ops.attention`): ``scaled_dot_product_attention`` (two matmul
  sites, ``….sdpa.qk`` and ``….sdpa.av``), ``baddbmm``, a two-operand ``einsum`` that is one GEMM,
  and ``nn.MultiheadAttention`` modules (``….q/k/v/qk/av/out``).

A composite node carries ``meta["frac_site_parts"]``: ``[(SiteInfo, call shapes), ...]``, one per
child site, instead of ``meta["frac_site"]``. GEMM-like ops that are left in fp32 get
``meta["frac_not_site"]`` with the reason (the coverage table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..meta_keys import META_NOT_SITE
from ..ops.attention import einsum_plan, supported_mha
from ..ops.spec import SiteSpec
from .base import node_dtype, node_shape

aten = torch.ops.aten

_SDPA_SIG = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_BADDBMM_SIG = ("input", "batch1", "batch2", "beta", "alpha")
_ADDMM_SIG = ("input", "mat1", "mat2", "beta", "alpha")
_COMPOSITE_FUNCTIONS = {
    F.scaled_dot_product_attention: "sdpa",
    aten.scaled_dot_product_attention.default: "sdpa",
    torch.baddbmm: "baddbmm",
    aten.baddbmm.default: "baddbmm",
    torch.addmm: "addmm",
    aten.addmm.default: "addmm",
    torch.einsum: "einsum",
    aten.einsum.default: "einsum",
}
_COMPOSITE_METHODS = {"baddbmm": "baddbmm", "addmm": "addmm"}


@dataclass
class Part:
    """One child site of a composite: its local name, spec and call shapes."""

    suffix: str
    kind: str
    spec: SiteSpec
    shapes: tuple
    info: object = None  # SiteInfo, set by quantize-insertion


@dataclass
class CompositeMatch:
    node: fx.Node
    op: str  # "sdpa" | "baddbmm" | "einsum" | "mha"
    operands: list  # graph values before the precisions
    parts: list[Part]
    extra: dict = field(default_factory=dict)
    name: str = ""
    module: nn.Module | None = None  # the nn.MultiheadAttention


def _args(node: fx.Node, sig: tuple[str, ...], defaults: dict | None = None) -> dict:
    args = dict(defaults or {})
    args.update(zip(sig, node.args))
    args.update(node.kwargs)
    return args


def _matmul_shapes(x, y) -> tuple | None:
    xs, ys = node_shape(x), node_shape(y)
    if xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
        return None
    return xs, ys


def _floating(node: fx.Node) -> bool:
    dtype = node_dtype(node)
    return dtype is None or dtype.is_floating_point


def not_site(node: fx.Node, reason: str) -> None:
    node.meta[META_NOT_SITE] = reason


def match_addmm(node: fx.Node, kinds) -> tuple | None:
    """``(x, W, bias)`` of an ``addmm`` that is a linear layer, else None (reason recorded)."""
    a = _args(node, _ADDMM_SIG)  # the method form's self is the input
    bias, x, w = a.get("input"), a.get("mat1"), a.get("mat2")
    if "linear" not in kinds:
        return not_site(node, "op kind 'linear' not in FracConfig.ops")
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return not_site(node, "addmm with beta/alpha other than 1")
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)) or not _floating(node):
        return not_site(node, "addmm on non-float or constant operands")
    if w.op != "get_attr":
        return not_site(node, "addmm of two activations (its second operand is not a parameter)")
    bs, ws = node_shape(bias), node_shape(w)
    if bs is None or ws is None or len(ws) != 2 or bs != (ws[1],):
        return not_site(node, "addmm whose input is not a bias vector")
    return x, w, bias


def match_composite(gm: fx.GraphModule, node: fx.Node, kinds) -> CompositeMatch | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.MultiheadAttention):
            return _match_mha(node, mod, kinds)
        return None
    if node.op == "call_function":
        op = _COMPOSITE_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        op = _COMPOSITE_METHODS.get(str(node.target))
    else:
        return None
    if op in (None, "addmm"):
        return None
    if "matmul" not in kinds:
        return not_site(node, "op kind 'matmul' not in FracConfig.ops")
    if not _floating(node):
        return not_site(node, f"{op} on a non-float dtype")
    if op == "sdpa":
        return _match_sdpa(node)
    if op == "baddbmm":
        a = dict(zip(_BADDBMM_SIG, node.args)) | dict(node.kwargs)
        b1, b2 = a.get("batch1"), a.get("batch2")
        shapes = _matmul_shapes(b1, b2) if isinstance(b1, fx.Node) and isinstance(b2, fx.Node) else None
        if shapes is None:
            return not_site(node, "baddbmm operands without known shapes")
        out = node_shape(node) or ()
        return CompositeMatch(
            node,
            "baddbmm",
            [a["input"], b1, b2, a.get("beta", 1), a.get("alpha", 1)],
            [Part("", "matmul", SiteSpec("matmul", "bmm"), (*shapes, out))],
        )
    return _match_einsum(node)


def _match_sdpa(node: fx.Node) -> CompositeMatch | None:
    a = _args(node, _SDPA_SIG, _SDPA_DEFAULTS)
    q, k, v = a["query"], a["key"], a["value"]
    qs, ks, vs = node_shape(q), node_shape(k), node_shape(v)
    if qs is None or ks is None or vs is None or len(qs) < 2:
        return not_site(node, "scaled_dot_product_attention operands without known shapes")
    L, S = qs[-2], ks[-2]
    kt = (*qs[:-2], ks[-1], S)  # kᵀ, GQA heads repeated as q's
    scores = (*qs[:-2], L, S)
    out = node_shape(node) or (*qs[:-2], L, vs[-1])
    parts = [
        Part("qk", "matmul", SiteSpec("matmul", "matmul"), (qs, kt, scores)),
        Part("av", "matmul", SiteSpec("matmul", "matmul"), (scores, (*qs[:-2], S, vs[-1]), out)),
    ]
    return CompositeMatch(
        node,
        "sdpa",
        [q, k, v, a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"], a["enable_gqa"]],
        parts,
    )


def _match_einsum(node: fx.Node) -> CompositeMatch | None:
    equation, *operands = node.args
    if node.target is aten.einsum.default or (len(operands) == 1 and isinstance(operands[0], (list, tuple))):
        operands = list(operands[0])
    if node.kwargs.get("path") is not None or not isinstance(equation, str):
        return not_site(node, "einsum with a contraction path or a computed equation")
    if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        return not_site(node, f"einsum of {len(operands)} operands (one GEMM takes two)")
    a_sh, b_sh = node_shape(operands[0]), node_shape(operands[1])
    if a_sh is None or b_sh is None:
        return not_site(node, "einsum operands without known shapes")
    plan = einsum_plan(equation, len(a_sh), len(b_sh))
    if plan is None:
        return not_site(node, f"einsum {equation!r} is not one batched GEMM")
    nb, nm, nk, nn_ = plan["sizes"]
    pa = [a_sh[i] for i in plan["a"]]
    pb = [b_sh[i] for i in plan["b"]]
    M, K = _prod(pa[nb : nb + nm]), _prod(pa[nb + nm :])
    N = _prod(pb[nb + nk :])
    batch = tuple(pa[:nb])
    shapes = ((*batch, M, K), (*tuple(pb[:nb]), K, N), (*batch, M, N))
    match = CompositeMatch(
        node, "einsum", list(operands), [Part("", "matmul", SiteSpec("matmul", "matmul"), shapes)]
    )
    match.extra = {"equation": equation, "plan": plan}
    return match


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


_MHA_SIG = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
_MHA_DEFAULTS = {
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "average_attn_weights": True,
    "is_causal": False,
}


def _match_mha(node: fx.Node, mod: nn.MultiheadAttention, kinds) -> CompositeMatch | None:
    if not {"linear", "matmul"} <= set(kinds):
        return not_site(node, "MultiheadAttention needs op kinds 'linear' and 'matmul'")
    reason = supported_mha(mod)
    if reason is not None:
        return not_site(node, reason)
    a = _args(node, _MHA_SIG, _MHA_DEFAULTS)
    qs, ks = node_shape(a["query"]), node_shape(a["key"])
    if qs is None or ks is None or len(qs) != 3:
        return not_site(node, "MultiheadAttention on unbatched or unknown-shape inputs")
    if mod.batch_first:
        (N, L, E), S = qs, ks[1]
    else:
        (L, N, E), S = qs, ks[0]
    H, D = mod.num_heads, mod.head_dim
    lin = SiteSpec("linear", "linear")
    mm = SiteSpec("matmul", "matmul")
    parts = [
        Part("q", "linear", lin, ((L * N, E), (E, E), (L * N, E))),
        Part("k", "linear", lin, ((S * N, mod.kdim), (E, mod.kdim), (S * N, E))),
        Part("v", "linear", lin, ((S * N, mod.vdim), (E, mod.vdim), (S * N, E))),
        Part("qk", "matmul", mm, ((N, H, L, D), (N, H, D, S), (N, H, L, S))),
        Part("av", "matmul", mm, ((N, H, L, S), (N, H, S, D), (N, H, L, D))),
        Part("out", "linear", lin, ((L * N, E), (E, E), (L * N, E))),
    ]
    ops = [a[k] for k in _MHA_SIG]
    return CompositeMatch(node, "mha", ops, parts, module=mod)
