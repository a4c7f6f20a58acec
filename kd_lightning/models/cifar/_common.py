"""Pieces shared by the CIFAR zoo: weight initialisation and the pooled-embedding head."""

from __future__ import annotations

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
    """He (fan-out) initialisation for convolutions, identity BatchNorm, zero linear biases.

    The scheme the CIFAR ResNet/WRN/VGG papers train with; it is applied uniformly to the zoo so
    that every model starts from the same kind of initialisation.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def global_pool() -> nn.Sequential:
    """Global average pooling then flatten: (B, C, H, W) -> (B, C), the pre-classifier embedding.

    Adaptive pooling equals the papers' fixed ``AvgPool2d(8)`` / ``avg_pool2d(4)`` on 32x32
    inputs and keeps the models usable at other resolutions.
    """
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (B, g*n, H, W) -> reshape (g, n) -> transpose -> flatten."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )
