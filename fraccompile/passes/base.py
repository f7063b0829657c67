"""Pass infrastructure: a pass has a ``name``, declares the graph properties it ``requires`` and
``ensures`` (:mod:`fraccompile.meta_keys`), and implements ``run(gm) -> PassResult``; shared facts
travel in ``node.meta`` under the keys of :mod:`fraccompile.meta_keys`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..config import FracConfig
from ..meta_keys import TENSOR_META, VAL

__all__ = ["Pass", "PassResult", "SiteInfo", "node_dtype", "node_shape"]


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
    meta = node.meta.get(TENSOR_META)
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    val = node.meta.get(VAL)
    if val is not None and hasattr(val, "shape"):
        try:
            return tuple(int(s) for s in val.shape)
        except TypeError:  # symbolic sizes
            return None
    return None


def node_dtype(node):
    meta = node.meta.get(TENSOR_META) if isinstance(node, fx.Node) else None
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype
    val = node.meta.get(VAL) if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


class Pass(ABC):
    """A graph transformation. Subclasses set ``name`` and implement ``run``; ``run`` may mutate
    ``gm`` in place and returns ``PassResult(gm, modified)``.

    ``requires``: the graph properties (:data:`fraccompile.meta_keys.PROPERTIES`) that must hold
    before the pass runs; ``ensures``: those that hold after it; ``invalidates``: those it may
    break. The pipeline checks them (:func:`fraccompile.passes.pipeline.check_order`)."""

    name: str = ""
    description: str = ""
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()

    def __init__(self, config: FracConfig | None = None):
        self.config = config or FracConfig()

    @abstractmethod
    def run(self, gm: fx.GraphModule) -> PassResult: ...

    def __repr__(self) -> str:
        return f"<pass {self.name}>"
