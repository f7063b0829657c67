"""The coverage table: every GEMM-like op of the graph that is not a quantized site, and why.

Run at the end of quantize-insertion (``gm.meta["frac_fp32_ops"]``, a list of :class:`Fp32Op`):
layers kept in full precision by the config, GEMM-like ops no site takes (transposed convs,
recurrent layers, ``einsum`` forms that are not one GEMM, ``addmm`` with ``alpha``/``beta``, ...)
with the reason the matcher recorded, and opaque calls (leaf modules, ``torch.fx.wrap``'d
functions) whose run during capture's shape propagation called GEMM-like ops
(``node.meta["frac_gemm_calls"]``). fx capture traces wrapped functions that call GEMM-like ops
through; one whose body does not trace stays opaque, with the tracer's reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..meta_keys import (
    GM_OPAQUE_FNS,
    META_FP_LAYER,
    META_GEMM_CALLS,
    META_NOT_SITE,
    META_SITE,
    META_SITE_PARTS,
    NN_MODULE_STACK,
)

__all__ = ["GEMM_LIKE", "Fp32Op", "GemmCallRecorder", "find_fp32_ops", "op_name"]

# names (function __name__, aten op name or method) of the GEMM-like ops
GEMM_LIKE = frozenset(
    {
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "bilinear",
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "mm",
        "bmm",
        "addmm",
        "addbmm",
        "baddbmm",
        "addmv",
        "mv",
        "einsum",
        "tensordot",
        "scaled_dot_product_attention",
        "multi_head_attention_forward",
        "lstm",
        "gru",
        "rnn_tanh",
        "rnn_relu",
        "chain_matmul",
        "multi_dot",
    }
)
_GEMM_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Bilinear,
    nn.MultiheadAttention,
    nn.RNNBase,
)
_DEFAULT_REASONS = {
    "conv_transpose1d": "transposed convolution (not a FracTrain site)",
    "conv_transpose2d": "transposed convolution (not a FracTrain site)",
    "conv_transpose3d": "transposed convolution (not a FracTrain site)",
    "bilinear": "bilinear layer (no site form)",
    "lstm": "recurrent layer (its GEMMs run inside one op)",
    "gru": "recurrent layer (its GEMMs run inside one op)",
    "rnn_tanh": "recurrent layer (its GEMMs run inside one op)",
    "rnn_relu": "recurrent layer (its GEMMs run inside one op)",
    "multi_head_attention_forward": "functional multi-head attention (use nn.MultiheadAttention)",
}
_DEFAULT_REASONS.update({f"ConvTranspose{n}d": _DEFAULT_REASONS["conv_transpose1d"] for n in (1, 2, 3)})
_DEFAULT_REASONS["Bilinear"] = _DEFAULT_REASONS["bilinear"]


@dataclass(frozen=True)
class Fp32Op:
    """One GEMM-like op that runs in fp32: graph node, op, module path and the reason."""

    node: str
    op: str
    module_path: str
    reason: str


def op_name(target) -> str:
    """The plain name of a call target: ``linear`` for ``F.linear``, ``aten.linear.default``,
    ``nn.Linear`` or the method ``"linear"``."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, type):
        return target.__name__
    return getattr(target, "__name__", str(target))


class GemmCallRecorder(torch.overrides.TorchFunctionMode):
    """Counts the GEMM-like torch functions called while active (capture runs opaque nodes under
    it)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if name in GEMM_LIKE:
            self.calls["matmul" if name in ("__matmul__", "__rmatmul__") else name] += 1
        return func(*args, **(kwargs or {}))


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get(NN_MODULE_STACK)
    if node.op == "call_module":
        return str(node.target)
    return list(stack.values())[-1][0] if stack else ""


def _leaf_reason(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> str:
    what = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(calls.items()))
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return f"inside leaf module {node.target!r} ({type(mod).__name__}): {what}"
    why = gm.meta.get(GM_OPAQUE_FNS, {}).get(op_name(node.target))
    why = f"; not traced through: {why}" if why else ""
    return f"inside opaque function {op_name(node.target)!r} (e.g. torch.fx.wrap): {what}{why}"


def find_fp32_ops(gm: fx.GraphModule) -> list[Fp32Op]:
    """Every GEMM-like op of ``gm`` that is not a quantized site, with the reason."""
    out: list[Fp32Op] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if META_SITE in node.meta:
            continue
        parts = node.meta.get(META_SITE_PARTS)
        if parts:
            out += [
                Fp32Op(
                    node.name,
                    info.op,
                    _module_path(node),
                    "kept in full precision (FracConfig.full_precision)",
                )
                for info, _ in parts
                if info.full_precision
            ]
            continue
        fp = node.meta.get(META_FP_LAYER)
        if fp is not None:
            out.append(
                Fp32Op(
                    node.name, fp.op, _module_path(node), "kept in full precision (FracConfig.full_precision)"
                )
            )
            continue
        name = _own_name(gm, node)
        if name is not None:
            reason = node.meta.get(META_NOT_SITE) or _DEFAULT_REASONS.get(name) or "no site matches this call"
            out.append(Fp32Op(node.name, name, _module_path(node), reason))
            continue
        calls = node.meta.get(META_GEMM_CALLS)
        if calls:
            out.append(
                Fp32Op(
                    node.name,
                    op_name(node.target)
                    if node.op != "call_module"
                    else type(gm.get_submodule(str(node.target))).__name__,
                    _module_path(node),
                    _leaf_reason(gm, node, calls),
                )
            )
    return out


def _own_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op name when ``node`` itself is a GEMM-like call (not an opaque one)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.RNNBase):
            return mod.mode.lower()
        if isinstance(mod, nn.MultiheadAttention):
            return "MultiheadAttention"
        if isinstance(mod, _GEMM_MODULES):
            return type(mod).__name__
        return None
    name = op_name(node.target)
    return name if name in GEMM_LIKE else None
