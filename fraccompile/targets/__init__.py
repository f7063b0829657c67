"""Lowering through Apache TVM. This package is the only place that imports ``tvm``.

Importing ``fraccompile.targets`` itself stays cheap: the submodules import tvm when they are used.

* :mod:`.host` — detect the CPU and build the TVM target (AVX-512 VNNI, AVX-512 BW or AVX2);
* :mod:`.intrin` — the VNNI dot-product tensor intrinsic that builds with TVM's bundled LLVM 22;
* :mod:`.gemm` — the integer GEMM every site role lowers to: ``C[g] = A[g] · B[g]ᵀ``, u8 × s8 → s32;
* :mod:`.cache` — the on-disk kernel cache (atomic, shared by processes);
* :mod:`.codes` — integer codes (scale, zero point, offset) and the fused quantizer's call;
* :mod:`.affine` — the terms zero points add to an integer GEMM's exact product;
* :mod:`.site_gemm` — the autograd Function of a site on the integer kernels;
* :mod:`.gemm_runtime` — the integer GEMMs and implicit convs a backend runs, operand packers;
* :mod:`.roles` — a site's forward / error backprop / weight gradient from codes, per op kind;
* :mod:`.backend` — the ``tvm`` backend: its state, a site call's codes, the roles on the kernels.
"""

from __future__ import annotations

import functools
import os
import pathlib

from ..ops.backend import register_backend


@functools.lru_cache(maxsize=None)
def tvm_unavailable_reason() -> str | None:
    """None when TVM imports and can build for this host, else a one-line reason."""
    try:
        from . import host  # noqa: F401  (imports tvm)
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"TVM is not usable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def cache_dir() -> pathlib.Path:
    """Where compiled kernels are cached (CPU libraries and CUDA cubins):
    ``$FRACCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fraccompile/kernels``, else
    ``~/.cache/fraccompile/kernels``."""
    env = os.environ.get("FRACCOMPILE_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fraccompile" / "kernels"


def _make_tvm_backend(options: dict):
    from .backend import make_tvm_backend  # imports tvm

    return make_tvm_backend(options)


register_backend("tvm", _make_tvm_backend, tvm_unavailable_reason, options=True)
