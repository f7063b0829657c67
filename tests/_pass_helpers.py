"""Shared by the tests/test_passes_*.py files: capture a Before module and run passes on it, and a
backend that has every capability the passes adapt to (named so no pass can recognise it)."""

from __future__ import annotations

import torch

from fraccompile import FracConfig
from fraccompile.capture import capture
from fraccompile.ops import backend as ob
from fraccompile.passes import get_pass, run_passes

CAPABLE = "capable-test-backend"


class CapableBackend(ob.ReferenceBackend):
    """The reference semantics with the INTEGER_KERNELS and CHANNELS_LAST capabilities."""

    name = CAPABLE
    capabilities = frozenset({ob.INTEGER_KERNELS, ob.CHANNELS_LAST})


def register_capable(monkeypatch) -> str:
    """Registers :class:`CapableBackend` for one test (the registry is restored after it)."""
    monkeypatch.setattr(ob, "_FACTORIES", dict(ob._FACTORIES))
    backend = CapableBackend()
    ob.register_backend(CAPABLE, lambda options: backend)
    return CAPABLE


def graph(model, *inputs, passes=(), config: FracConfig | None = None):
    """``model`` captured on ``inputs`` with the named ``passes`` run on it."""
    config = config or FracConfig()
    gm = capture(model, inputs if len(inputs) != 1 else inputs[0])
    return run_passes(gm, [get_pass(n, config) for n in passes])


def seeded(model_cls, *args):
    torch.manual_seed(0)
    return model_cls(*args)
