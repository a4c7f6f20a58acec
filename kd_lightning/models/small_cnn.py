"""A small convolutional network for 8x8 single-channel images (digits) or any small image."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.spec import records_init_args


@records_init_args
class SmallCNN(nn.Module):
    """Two conv-BN-ReLU stages, global average pooling, a linear classifier.

    Hookable layers: ``stage1`` (B, width, H, W), ``stage2`` (B, 2*width, H/2, W/2),
    ``pool`` (B, 2*width), ``classifier``.

    Args:
        num_classes: number of output logits.
        in_channels: input channels (1 for digits).
        width: channels of the first stage; the second has twice as many.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stage1 = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat 8x8 digits
            side = int(x.shape[1] ** 0.5)
            x = x.view(x.shape[0], 1, side, side)
        return self.classifier(self.pool(self.stage2(self.stage1(x))))
