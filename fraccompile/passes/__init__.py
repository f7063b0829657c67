"""Graph passes (one per file) and named pipelines."""

from .base import META_FP_LAYER, META_SITE, Pass, PassResult, SiteInfo
from .cost_annotation import CostAnnotation
from .pipeline import PASSES, PIPELINES, get_pass, get_pipeline, run_passes
from .quantize_insertion import QuantizeInsertion

__all__ = ["META_FP_LAYER", "META_SITE", "PASSES", "PIPELINES", "CostAnnotation", "Pass",
           "PassResult", "QuantizeInsertion", "SiteInfo", "get_pass", "get_pipeline", "run_passes"]
