"""Quantizers, autograd Functions, site modules and kernel backends."""

from .backend import KernelBackend, ReferenceBackend, get_backend
from .modules import FracOp, PrecisionReader
from .spec import Precision, SiteSpec

__all__ = [
    "FracOp",
    "KernelBackend",
    "Precision",
    "PrecisionReader",
    "ReferenceBackend",
    "SiteSpec",
    "get_backend",
]
