"""MobileNetV2 for 32x32 inputs, in the CRD benchmark's configuration.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018. The CRD
benchmark (Tian et al., ICLR 2020) uses the ImageNet layout unchanged on 32x32 images (a stride-2
stem and strides 1, 1, 2, 2, 1, 2, 1 in the seven bottleneck stages, so the last feature map is
2x2) with width multiplier 0.5 applied to the stem and the bottlenecks (not to the 1280-channel
last convolution) and expansion ratio 6. Every inverted residual keeps its 1x1 expansion
convolution, also in the first stage whose expansion ratio is 1.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.cifar._common import conv_bn_relu, global_pool, init_weights
from kd_lightning.models.spec import records_init_args


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 linear projection-BN (+ identity)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            conv_bn_relu(in_channels, hidden, kernel_size=1),
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


@records_init_args
class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs; the defaults are the CRD table's "MobileNetV2" (width 0.5).

    Hook points (dotted module paths, shapes for a 32x32 input at width 0.5):

    - ``stem``: conv3x3 stride 2-BN-ReLU, (B, 16, 16, 16)
    - ``blocks.0`` .. ``blocks.6``: the seven bottleneck stages; the last stage at each
      resolution is ``blocks.1`` (B, 12, 16, 16), ``blocks.2`` (B, 16, 8, 8),
      ``blocks.4`` (B, 48, 4, 4) and ``blocks.6`` (B, 160, 2, 2)
    - ``head``: conv1x1-BN-ReLU to 1280 channels, (B, 1280, 2, 2)
    - ``pool``: the embedding before the classifier, (B, 1280)
    - ``classifier``: the logits, (B, num_classes)

    Bottleneck outputs are linear (no ReLU), as in the paper. ``stage_names`` lists the
    per-resolution stage outputs in order.

    Args:
        num_classes: number of output logits.
        width_mult: channel multiplier of the stem and bottlenecks (0.5 in CRD).
        expand_ratio: expansion ratio t of stages 2-7 (6 in the paper and CRD).
    """

    stage_names: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4", "blocks.6", "head")

    #: (expansion ratio or None for "use expand_ratio", channels, repeats, first stride)
    SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )

    def __init__(
        self, num_classes: int = 100, width_mult: float = 0.5, expand_ratio: int = 6
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if expand_ratio < 1:
            raise ValueError(f"expand_ratio must be >= 1, got {expand_ratio}")
        self.num_classes = num_classes
        channels = int(32 * width_mult)
        self.stem = conv_bn_relu(3, channels, kernel_size=3, stride=2)
        stages = []
        for ratio, base_channels, repeats, first_stride in self.SETTINGS:
            out_channels = int(base_channels * width_mult)
            layers = []
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                layers.append(
                    InvertedResidual(channels, out_channels, stride, ratio or expand_ratio)
                )
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*stages)
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.head = conv_bn_relu(channels, last_channels, kernel_size=1)
        self.pool = global_pool()
        self.classifier = nn.Linear(last_channels, num_classes)
        init_weights(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.head(self.blocks(self.stem(x)))))
