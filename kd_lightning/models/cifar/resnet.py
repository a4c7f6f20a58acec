"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2).

The 6n+2-layer networks of the paper's CIFAR-10 experiments, in the configuration used by the
CRD benchmark (Tian et al., "Contrastive Representation Distillation", ICLR 2020): a 3x3 stem,
three stages of ``n`` basic blocks at 32x32, 16x16 and 8x8, global average pooling and a linear
classifier. Shortcuts that change shape are 1x1 convolution + BatchNorm (option B). The ``x4``
variants (``resnet8x4``, ``resnet32x4``) use four times the channels: widths 32/64/128/256
instead of 16/16/32/64 (so their first stage already changes width and has a projection
shortcut).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.models.cifar._common import conv_bn_relu, global_pool, init_weights
from kd_lightning.models.spec import records_init_args


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; ReLU after the addition."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


@records_init_args
class CifarResNet(nn.Module):
    """A 6n+2-layer CIFAR ResNet of any depth and width.

    Hook points (dotted module paths, output shapes for a 32x32 input):

    - ``stem``: conv3x3-BN-ReLU, (B, widths[0], 32, 32)
    - ``layer1``: (B, widths[1], 32, 32)
    - ``layer2``: (B, widths[2], 16, 16)
    - ``layer3``: (B, widths[3], 8, 8)
    - ``pool``: the embedding before the classifier, (B, widths[3])
    - ``classifier``: the logits, (B, num_classes)

    Every stage output is post-ReLU; ``layer3.<n-1>.bn2`` is the last block's
    pre-residual, pre-activation response. ``stage_names`` lists the stage outputs in order.

    Args:
        depth: total number of weighted layers, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        widths: channels of the stem and of the three stages.
        num_classes: number of output logits.
    """

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int = 20,
        widths: Sequence[int] = (16, 16, 32, 64),
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(
                f"widths must give 4 channel counts (stem, layer1, layer2, layer3), got {widths}"
            )
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.stem = conv_bn_relu(3, widths[0])
        self.layer1 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.pool = global_pool()
        self.classifier = nn.Linear(widths[3], num_classes)
        init_weights(self)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(self.pool(x))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@records_init_args
class ResNet8(CifarResNet):
    """CIFAR ResNet-8 (1 block per stage, widths 16/16/32/64). Hook points: see CifarResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=8, widths=_NARROW, num_classes=num_classes)


@records_init_args
class ResNet14(CifarResNet):
    """CIFAR ResNet-14 (2 blocks per stage, widths 16/16/32/64). Hook points: see CifarResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=14, widths=_NARROW, num_classes=num_classes)


@records_init_args
class ResNet20(CifarResNet):
    """CIFAR ResNet-20 (3 blocks per stage, widths 16/16/32/64). Hook points: see CifarResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=20, widths=_NARROW, num_classes=num_classes)


@records_init_args
class ResNet32(CifarResNet):
    """CIFAR ResNet-32 (5 blocks per stage, widths 16/16/32/64). Hook points: see CifarResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=32, widths=_NARROW, num_classes=num_classes)


@records_init_args
class ResNet44(CifarResNet):
    """CIFAR ResNet-44 (7 blocks per stage, widths 16/16/32/64). Hook points: see CifarResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=44, widths=_NARROW, num_classes=num_classes)


@records_init_args
class ResNet56(CifarResNet):
    """CIFAR ResNet-56 (9 blocks per stage, widths 16/16/32/64). Hook points: see CifarResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=56, widths=_NARROW, num_classes=num_classes)


@records_init_args
class ResNet110(CifarResNet):
    """CIFAR ResNet-110 (18 blocks per stage, widths 16/16/32/64). Hook points: see CifarResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=110, widths=_NARROW, num_classes=num_classes)


@records_init_args
class ResNet8x4(CifarResNet):
    """CRD's ResNet-8x4: ResNet-8 with 4x channels (widths 32/64/128/256).

    Hook points: ``stem``, ``layer1`` (B, 64, 32, 32), ``layer2`` (B, 128, 16, 16),
    ``layer3`` (B, 256, 8, 8), ``pool`` (B, 256), ``classifier``. There is no ``layer4``.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=8, widths=_WIDE, num_classes=num_classes)


@records_init_args
class ResNet32x4(CifarResNet):
    """CRD's ResNet-32x4: ResNet-32 with 4x channels (widths 32/64/128/256).

    Hook points: ``stem``, ``layer1`` (B, 64, 32, 32), ``layer2`` (B, 128, 16, 16),
    ``layer3`` (B, 256, 8, 8), ``pool`` (B, 256), ``classifier``. There is no ``layer4``.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=32, widths=_WIDE, num_classes=num_classes)
