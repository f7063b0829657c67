"""Graph passes (one per file) and named pipelines. The ``node.meta`` keys and the graph properties
passes require and ensure are in :mod:`fraccompile.meta_keys`."""

from .base import Pass, PassResult, SiteInfo
from .cost_annotation import CostAnnotation
from .pipeline import PASSES, PIPELINES, check_order, get_pass, get_pipeline, run_passes
from .quantize_insertion import QuantizeInsertion

__all__ = [
    "PASSES",
    "PIPELINES",
    "CostAnnotation",
    "Pass",
    "PassResult",
    "QuantizeInsertion",
    "SiteInfo",
    "check_order",
    "get_pass",
    "get_pipeline",
    "run_passes",
]
