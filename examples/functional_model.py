"""A small CNN classifier written only with functional calls.

The model owns its weights directly as ``nn.Parameter`` attributes (there are no
``nn.Conv2d`` or ``nn.Linear`` submodules) and its forward uses ``F.conv2d``,
``F.relu``, ``F.max_pool2d``, ``F.adaptive_avg_pool2d`` and ``F.linear``. It
checks that a compiler finds convolutions and linear layers as function calls
on parameters, not only as modules. Inputs are 3x32x32 images.

Layers: conv 3->32 (3x3, stride 1) -> ReLU -> 2x2 max pool (16x16)
-> conv 32->64 (3x3, stride 2, padding 1) -> ReLU (8x8)
-> grouped conv 64->64 (3x3, groups=2) -> ReLU -> global average pool
-> linear 64->128 -> ReLU -> linear 128->num_classes.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming_uniform_conv_or_linear(weight: nn.Parameter, bias: nn.Parameter) -> None:
    """The default initialisation of nn.Conv2d / nn.Linear."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    fan_in = weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(bias, -bound, bound)


class FunctionalNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1_weight = nn.Parameter(torch.empty(32, 3, 3, 3))
        self.conv1_bias = nn.Parameter(torch.empty(32))
        self.conv2_weight = nn.Parameter(torch.empty(64, 32, 3, 3))
        self.conv2_bias = nn.Parameter(torch.empty(64))
        self.conv3_weight = nn.Parameter(torch.empty(64, 64 // 2, 3, 3))  # groups=2
        self.conv3_bias = nn.Parameter(torch.empty(64))
        self.fc1_weight = nn.Parameter(torch.empty(128, 64))
        self.fc1_bias = nn.Parameter(torch.empty(128))
        self.fc2_weight = nn.Parameter(torch.empty(num_classes, 128))
        self.fc2_bias = nn.Parameter(torch.empty(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
            _kaiming_uniform_conv_or_linear(getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.conv1_weight, self.conv1_bias, padding=1))
        x = F.max_pool2d(x, 2)
        x = F.relu(F.conv2d(x, self.conv2_weight, self.conv2_bias, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.conv3_weight, self.conv3_bias, padding=1, groups=2))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = F.relu(F.linear(x, self.fc1_weight, self.fc1_bias))
        return F.linear(x, self.fc2_weight, self.fc2_bias)


def model() -> FunctionalNet:
    """The default example model: FunctionalNet for 10 classes."""
    return FunctionalNet()
