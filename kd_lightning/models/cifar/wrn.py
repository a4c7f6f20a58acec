"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 3x3 stem with 16 channels, then three groups of ``n = (d - 4) / 6`` pre-activation
basic blocks (BN-ReLU-conv3x3 twice) with 16k, 32k and 64k channels at 32x32, 16x16 and 8x8, a
final BN-ReLU, global average pooling and a linear classifier. The CRD benchmark uses
WRN-16-2, WRN-40-1 and WRN-40-2 without dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.cifar._common import global_pool, init_weights
from kd_lightning.models.spec import records_init_args


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut.

    When the shape changes, the shortcut is a 1x1 convolution applied to the *activated* input,
    as in the reference WRN implementation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.projection: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        shortcut = x if self.projection is None else self.projection(activated)
        return out + shortcut


@records_init_args
class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs.

    Hook points (dotted module paths, output shapes for a 32x32 input, k = widen_factor):

    - ``stem``: conv3x3, (B, 16, 32, 32)
    - ``block1``: (B, 16k, 32, 32)
    - ``block2``: (B, 32k, 16, 16)
    - ``block3``: (B, 64k, 8, 8), pre-activation (blocks are pre-activation residual units)
    - ``relu``: the final BN-ReLU of ``block3``'s output, (B, 64k, 8, 8)
    - ``pool``: the embedding before the classifier, (B, 64k)
    - ``classifier``: the logits, (B, num_classes)

    ``stage_names`` lists the stage outputs in order.

    Args:
        depth: total depth ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: channel multiplier k.
        num_classes: number of output logits.
        dropout: dropout probability between the two convolutions of a block (0 in CRD).
    """

    stage_names: tuple[str, ...] = ("block1", "block2", "block3")

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 2,
        num_classes: int = 100,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], blocks_per_group, 1, dropout)
        self.block2 = self._make_group(widths[1], widths[2], blocks_per_group, 2, dropout)
        self.block3 = self._make_group(widths[2], widths[3], blocks_per_group, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = global_pool()
        self.classifier = nn.Linear(widths[3], num_classes)
        init_weights(self)

    @staticmethod
    def _make_group(
        in_channels: int, out_channels: int, blocks: int, stride: int, dropout: float
    ) -> nn.Sequential:
        layers = [PreActBlock(in_channels, out_channels, stride, dropout)]
        layers += [PreActBlock(out_channels, out_channels, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.classifier(self.pool(self.relu(self.bn(x))))


@records_init_args
class WRN16x2(WideResNet):
    """WRN-16-2 (2 blocks per group, widths 32/64/128). Hook points: see WideResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=16, widen_factor=2, num_classes=num_classes)


@records_init_args
class WRN40x1(WideResNet):
    """WRN-40-1 (6 blocks per group, widths 16/32/64). Hook points: see WideResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=40, widen_factor=1, num_classes=num_classes)


@records_init_args
class WRN40x2(WideResNet):
    """WRN-40-2 (6 blocks per group, widths 32/64/128). Hook points: see WideResNet.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=40, widen_factor=2, num_classes=num_classes)
