"""Pass infrastructure: a pass has a ``name`` and ``run(gm) -> PassResult``; shared facts travel in
``node.meta`` under the keys below."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..config import FracConfig

__all__ = ["META_FP_LAYER", "META_SITE", "Pass", "PassResult", "SiteInfo", "node_shape"]

# node.meta keys written by the passes
META_SITE = "frac_site"  # SiteInfo, on the node that calls a FracOp
META_FP_LAYER = "frac_fp_layer"  # SiteInfo (full_precision=True), on a layer the config keeps in fp32
META_PRECISION_NODE = "frac_precision_node"  # site name, on a precision-control node
META_CALL_SHAPES = "frac_call_shapes"  # (input, weight, output) shapes of one site call


@dataclass
class SiteInfo:
    """One quantizable op of the graph (a site, or a layer kept in full precision)."""

    name: str
    kind: str  # "conv" | "linear" | "matmul"
    op: str  # human-readable op, e.g. "conv2d s=2"
    source: str  # "module" | "functional" | "aten" | "method"
    module_path: str  # where the FracOp (or the kept layer) lives in the graph module
    input_shape: tuple[int, ...] = ()
    weight_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    macs: int = 0
    calls: int = 1
    full_precision: bool = False
    backend: str = "reference"
    fallback_reason: str | None = None
    extra: dict = field(default_factory=dict)


def node_shape(node) -> tuple[int, ...] | None:
    """Static shape of a node's tensor output from capture's shape propagation, if known."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    val = node.meta.get("val")
    if val is not None and hasattr(val, "shape"):
        try:
            return tuple(int(s) for s in val.shape)
        except TypeError:  # symbolic sizes
            return None
    return None


def node_dtype(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


class Pass(ABC):
    """A graph transformation. Subclasses set ``name`` and implement ``run``; ``run`` may mutate
    ``gm`` in place and returns ``PassResult(gm, modified)``."""

    name: str = ""
    description: str = ""

    def __init__(self, config: FracConfig | None = None):
        self.config = config or FracConfig()

    @abstractmethod
    def run(self, gm: fx.GraphModule) -> PassResult: ...

    def __repr__(self) -> str:
        return f"<pass {self.name}>"
