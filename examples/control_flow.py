"""Models with Python control flow that ``torch.fx.symbolic_trace`` cannot capture.

``ShapeAdaptiveNet`` (the default, returned by ``model()``) branches on the
input's spatial size: inputs wider than 32 pixels first pass through a strided
convolution. Symbolic tracing fails because the shape is a Proxy, not an int;
``torch.export.export(..., strict=False)`` succeeds by specialising the branch to
the example input's shape, so this model needs the export fallback.

``ValueBranchNet`` contains a ``ValueGate`` submodule that branches on a tensor
*value* (its mean magnitude). Neither fx nor export can capture that branch
(export refuses data-dependent control flow); the model is captured by treating
the gate as an opaque leaf module, e.g. ``leaf_modules=["ValueGate"]``, while
its convolutions and linear layer outside the gate stay visible.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ShapeAdaptiveNet(nn.Module):
    """A small CNN that downsamples inputs larger than 32x32 before the main body."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.down = nn.Conv2d(3, 3, kernel_size=3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 32:  # shape-dependent branch: fx fails, export specialises
            x = self.down(x)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class ValueGate(nn.Module):
    """Halves activations whose mean magnitude exceeds 1 (a data-dependent branch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().mean() > 1.0:  # value-dependent branch: neither fx nor export can trace it
            x = x * 0.5
        return x


class ValueBranchNet(nn.Module):
    """A small CNN with a ValueGate between its convolutions; capture it with leaf_modules=["ValueGate"]."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.gate = ValueGate()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.gate(x)
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def model() -> ShapeAdaptiveNet:
    """The default example model: ShapeAdaptiveNet."""
    return ShapeAdaptiveNet()
