"""MobileNetV2 (Sandler et al., 2018), CIFAR-10 variant.

The common adaptation for 32x32 inputs: the stem is a 3x3 stride-1 convolution
with 32 channels, and the first two strided stages of the ImageNet table use
stride 1, so the network downsamples 32 -> 4 before the final 1x1 convolution
to 1280 channels, global average pooling and a linear classifier.

Each inverted residual block is: 1x1 expansion conv (skipped when t = 1),
3x3 depthwise conv (``groups=channels``), 1x1 linear projection, each followed
by BatchNorm, with ReLU6 after the first two. The input is added back when the
stride is 1 and the channel count is unchanged.
"""

import torch
from torch import nn


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
    CONFIG = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),  # stride 2 in the ImageNet model
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers = [
            nn.Conv2d(3, 32, 3, stride=1, padding=1, bias=False),  # stride 2 in the ImageNet model
            nn.BatchNorm2d(32),
            nn.ReLU6(inplace=True),
        ]
        in_channels = 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t))
                in_channels = c
        layers += [
            nn.Conv2d(in_channels, 1280, 1, bias=False),
            nn.BatchNorm2d(1280),
            nn.ReLU6(inplace=True),
        ]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def model() -> MobileNetV2:
    """The default example model: MobileNetV2 for CIFAR-10."""
    return MobileNetV2()
