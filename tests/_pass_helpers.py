"""Shared by the tests/test_passes_*.py files: capture a Before module and run passes on it, a
backend that has every capability the passes adapt to (named so no pass can recognise it), and a
small residual network (the DFQ passes' Before module)."""

from __future__ import annotations

import torch
from torch import nn

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


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResidualNet(nn.Module):
    """A kept stem, a residual block with an identity shortcut, a lone linear (``hidden``
    outputs), a kept head."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = ResidualBlock(4)
        self.fc = nn.Linear(4, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        h = self.block(torch.relu(self.stem(x))).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))
