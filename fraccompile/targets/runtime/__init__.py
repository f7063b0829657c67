"""Runtime: where the compiled kernels come from and how they run.

``host`` (the CPU, its TVM target, TVM's thread settings made before tvm is imported), ``cache``
(the on-disk kernel cache), ``library`` (kernel names, :class:`~.library.KernelRef`; the provider
that builds on first use, :class:`~.library.JitKernels`; the :class:`~.library.Recorder` of what
a run asks for), ``exported`` (the provider over an exported kernel library), ``tuning_db`` (the
tiles ``fraccompile tune`` chose), ``threads`` (the kernels' parallel loops on torch's OpenMP
threads), ``cuda_driver`` (cubins launched through the CUDA driver API), ``cuda_conv`` (the
implicit-GEMM conv launched the same way), ``cuda_epilogue`` (the dequantized GEMM in one fused
kernel where it applies), ``cuda_quant`` (the CUDA quantization kernels, the same way),
``memory`` (freed memory kept for the next step: glibc's thresholds, set once per process).

Imports: of ``fraccompile.targets`` only these modules and :mod:`..kernels`, never the backend or
the tools. This file imports nothing, and none of ``threads``, ``cuda_driver``, ``cuda_conv``,
``cuda_epilogue``, ``cuda_quant`` and ``memory`` imports tvm at import time.
"""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """Where compiled kernels are cached (CPU libraries and CUDA cubins):
    ``$FRACCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fraccompile/kernels``, else
    ``~/.cache/fraccompile/kernels``."""
    env = os.environ.get("FRACCOMPILE_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fraccompile" / "kernels"
