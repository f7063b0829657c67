"""The torch-facing ``tvm`` backend: a site call's work on the integer kernels.

``tvm_backend`` (:class:`TVMBackend`: its state, a site call's codes, dispatch; the factory
:func:`make_tvm_backend`), ``codes`` (integer codes and the fused quantizer's call),
``device_codes`` (the codes of CUDA tensors from the CUDA quantization kernels), ``affine``
(the terms zero points add to an exact integer product), ``gemm_runtime`` (the integer GEMMs,
implicit convs and operand packers), ``roles`` (a site's forward / error backprop / weight
gradient from codes, per op kind), ``site_gemm`` (the autograd Function of a site).

Imports: of ``fraccompile.targets`` only these modules, :mod:`..runtime` and :mod:`..kernels`,
never the tools.
"""

from __future__ import annotations

from .codes import IntCodes, _to_codes
from .tvm_backend import TVMBackend, make_tvm_backend

__all__ = ["IntCodes", "TVMBackend", "_to_codes", "make_tvm_backend"]
