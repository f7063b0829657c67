"""Lowering through Apache TVM. This package is the only place that imports ``tvm``.

Importing ``fraccompile.targets`` itself stays cheap: it registers the ``tvm`` backend, whose
factory imports tvm on first use. The code is in four layers, each importing only the layers
before it (the rule is in docs/architecture.md and tests/test_architecture.py):

* :mod:`.kernels` — the kernel definitions in TE/TIR: the integer GEMM, implicit-GEMM convs,
  operand packing, the fused quantizer, sub-byte storage, the gate probe, exact column sums, the
  VNNI tensor intrinsic, the CUDA GEMMs (dp4a and tensor-core mma);
* :mod:`.runtime` — where compiled kernels come from and how they run: the host and its TVM target,
  the on-disk cache, kernel names and providers (built on first use, or from an exported library;
  tiles from a tuning database), parallel loops on torch's OpenMP threads, the CUDA driver;
* :mod:`.backend` — the torch-facing ``tvm`` backend: integer codes, zero-point terms, the integer
  GEMMs and convs a site runs, its three roles, its autograd Function;
* :mod:`.tools` — kernel tooling: the tile search (``fraccompile tune``) and the export of a
  model's kernels (``fraccompile export``).
"""

from __future__ import annotations

import functools

from ..ops.backend import register_backend
from .runtime import cache_dir

__all__ = ["cache_dir", "tvm_unavailable_reason"]


@functools.lru_cache(maxsize=None)
def tvm_unavailable_reason() -> str | None:
    """None when TVM imports and can build for this host, else a one-line reason."""
    try:
        from .runtime import host  # noqa: F401  (imports tvm)
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"TVM is not usable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _make_tvm_backend(options: dict):
    from .backend import make_tvm_backend  # imports tvm

    return make_tvm_backend(options)


register_backend("tvm", _make_tvm_backend, tvm_unavailable_reason, options=True)
