"""fraccompile: FracTrain's fractional quantized training as a PyTorch graph compiler.

>>> import fraccompile
>>> fmodel = fraccompile.compile(model, torch.randn(8, 3, 32, 32), fraccompile.FracConfig(a=4, w=4, g=8))
>>> fmodel.precision.set("layer3.*", a=6)     # precision is data: no re-compile
>>> fmodel.cost().cp                          # FracTrain's cost ratio against fp32 training
"""

from . import targets as _targets  # noqa: F401  (registers the tvm backend; imports no tvm)
from .api import compile
from .capture import capture
from .config import FracConfig
from .control import DFQ, PFQ, Cyclic, FracTrain, PrecisionController, Static
from .cost import CostReport
from .errors import CaptureError, ConfigError, FracCompileError, ModelLoadError, PassError, ShapeError
from .model import FracModel, Site
from .ops import Precision

__version__ = "0.1.0"

__all__ = [
    "DFQ",
    "PFQ",
    "CaptureError",
    "ConfigError",
    "CostReport",
    "Cyclic",
    "FracCompileError",
    "FracConfig",
    "FracModel",
    "FracTrain",
    "ModelLoadError",
    "PassError",
    "Precision",
    "PrecisionController",
    "ShapeError",
    "Site",
    "Static",
    "capture",
    "compile",
]
