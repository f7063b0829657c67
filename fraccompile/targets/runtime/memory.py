"""Freed memory kept in the process for the next training step, instead of handed back to the OS.

A training step allocates and frees the same large tensors every step: activations, their
gradients, and on the ``tvm`` backend the integer codes, packed operands and fp32 outputs of every
site. glibc serves an allocation above its mmap threshold (128 KiB, raised to the largest block
freed so far, at most 32 MiB) with a fresh ``mmap``, and returns the free top of its heap to the OS
once it exceeds its trim threshold. Either way the next step writes into new pages, and the kernel
maps each 4 KiB page on its first touch, a page fault each (``bench/step.py`` counts them per step;
docs/tvm.md, "Freed memory kept between steps").

:func:`keep_freed_memory` sets glibc's thresholds once per process (``mallopt``): blocks up to 32 MiB
(glibc's largest mmap threshold) come from the heap, and the heap keeps up to 2 GiB of free memory
instead of trimming it. A step then reuses the pages the previous one freed; the process's
resident memory stays at its peak (a training loop reaches that peak every step anyway), as
PyTorch's CUDA caching allocator does on GPUs. Blocks above 32 MiB are still mapped and unmapped
per allocation.

It applies on Linux with glibc only (elsewhere, and under a preloaded allocator such as jemalloc
or tcmalloc, whose own caches do the same, it changes nothing). ``FRACCOMPILE_MALLOC=system``
leaves glibc's defaults alone. :func:`policy` says which is in effect and why.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("fraccompile.targets")

ENV = "FRACCOMPILE_MALLOC"
MODES = ("keep", "system")

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: 2 GiB of free heap kept

_state: str | None = None  # what policy() reports, set by the first keep_freed_memory()


def keep_freed_memory() -> str:
    """Set glibc's thresholds so that freed memory is kept for reuse (once per process; later
    calls return the first one's outcome). Returns :func:`policy`'s description."""
    global _state
    if _state is not None:
        return _state
    mode = os.environ.get(ENV, "keep")
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: choose one of {MODES}")
    if mode == "system":
        _state = f"the C library's defaults ({ENV}=system)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "the C library's defaults (not Linux with glibc)"
    else:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
            _state = f"kept (glibc heap up to {MMAP_THRESHOLD >> 20} MiB blocks, trimmed above 2 GiB free)"
        else:  # (a C library whose mallopt refuses these values)
            _state = "the C library's defaults (mallopt refused the thresholds)"
    log.debug("freed memory: %s", _state)
    return _state


def policy() -> str:
    """How freed memory is handled in this process: kept (and how), or the C library's defaults
    with the reason (before :func:`keep_freed_memory` ran: not yet set)."""
    return _state if _state is not None else "the C library's defaults (not set yet)"
