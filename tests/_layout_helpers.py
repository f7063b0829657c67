"""Shared by the tests of the precision-0 promise: the original model in the compiled model's fp32
layout, where precision 0 is bit-identical (``FracModel.fp32_memory_format``)."""

from __future__ import annotations


def in_fp32_layout(model, x, fm):
    """``model`` and ``x`` in the memory format ``fm``'s fp32 convs run in (channels-last where
    the default ``auto`` backend picks tvm); ``x`` unchanged unless it is 4-D."""
    fmt = fm.fp32_memory_format
    return model.to(memory_format=fmt), x.contiguous(memory_format=fmt) if x.dim() == 4 else x
