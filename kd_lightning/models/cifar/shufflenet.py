"""ShuffleNet V1 and V2 for 32x32 inputs, in the CRD benchmark's configuration.

- V1: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
  Devices", CVPR 2018. CIFAR layout: a stride-1 1x1 stem with 24 channels (no max-pool), then
  stages of 4/8/4 units (stride 2 in each stage's first unit, whose output concatenates a 3x3
  average-pooled shortcut) with 240/480/960 channels for 3 groups.
- V2: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
  ECCV 2018. CIFAR layout: a stride-1 1x1 stem with 24 channels (no max-pool), three stages of a
  down-sampling unit plus 3/7/3 channel-split units with 116/232/464 channels (1.0x), a 1x1
  convolution to 1024 channels.

Both reach 4x4 before global average pooling on 32x32 inputs. Where the CRD benchmark's models
differ from the papers, these follow CRD (the models its published numbers were measured on):
V1 applies a ReLU after the depthwise convolution, and both stems are 1x1 convolutions.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.cifar._common import (
    channel_shuffle,
    conv_bn_relu,
    global_pool,
    init_weights,
)
from kd_lightning.models.spec import records_init_args

_STEM_CHANNELS = 24


class ShuffleV1Unit(nn.Module):
    """1x1 group conv-BN-ReLU, channel shuffle, 3x3 depthwise-BN-ReLU, 1x1 group conv-BN.

    Stride 1: ReLU(out + x). Stride 2: ReLU(cat[out, avgpool3x3(x)]), so ``out`` has
    ``out_channels - in_channels`` channels. The first unit after the 24-channel stem uses an
    ungrouped first convolution (24 channels are too few to split), as in the paper.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        branch_channels = out_channels - in_channels if stride == 2 else out_channels
        mid = branch_channels // 4
        self.first_groups = 1 if in_channels == _STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu_dw = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, branch_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_channels)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = self.relu_dw(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        merged = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return self.relu2(merged)


@records_init_args
class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 (1x) for 32x32 inputs; the defaults are the CRD table's "ShuffleNetV1".

    Hook points (dotted module paths, shapes for a 32x32 input with 3 groups):

    - ``stem``: conv1x1-BN-ReLU, (B, 24, 32, 32)
    - ``layer1``: (B, 240, 16, 16)
    - ``layer2``: (B, 480, 8, 8)
    - ``layer3``: (B, 960, 4, 4)
    - ``pool``: the embedding before the classifier, (B, 960)
    - ``classifier``: the logits, (B, num_classes)

    Args:
        num_classes: number of output logits.
        groups: groups of the 1x1 convolutions; 2 (200/400/800 channels) or 3 (240/480/960).
    """

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3")

    WIDTHS: dict[int, tuple[int, int, int]] = {2: (200, 400, 800), 3: (240, 480, 960)}
    UNITS: tuple[int, int, int] = (4, 8, 4)

    def __init__(self, num_classes: int = 100, groups: int = 3) -> None:
        super().__init__()
        if groups not in self.WIDTHS:
            raise ValueError(f"groups must be one of {sorted(self.WIDTHS)}, got {groups}")
        self.num_classes = num_classes
        widths = self.WIDTHS[groups]
        self.stem = conv_bn_relu(3, _STEM_CHANNELS, kernel_size=1)
        in_channels = _STEM_CHANNELS
        stages = []
        for width, units in zip(widths, self.UNITS, strict=True):
            layers = [ShuffleV1Unit(in_channels, width, 2, groups)]
            layers += [ShuffleV1Unit(width, width, 1, groups) for _ in range(units - 1)]
            stages.append(nn.Sequential(*layers))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = global_pool()
        self.classifier = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(self.pool(x))


class ShuffleV2Unit(nn.Module):
    """Channel split: half passes through, half goes 1x1-BN-ReLU, 3x3 dw-BN, 1x1-BN-ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.split = half
        self.branch = nn.Sequential(
            conv_bn_relu(half, half, kernel_size=1),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            conv_bn_relu(half, half, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passthrough, processed = x[:, : self.split], x[:, self.split :]
        return channel_shuffle(torch.cat([passthrough, self.branch(processed)], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 unit: both branches see the whole input and each emits half the outputs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, 2, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            conv_bn_relu(in_channels, mid, kernel_size=1),
        )
        self.right = nn.Sequential(
            conv_bn_relu(in_channels, mid, kernel_size=1),
            nn.Conv2d(mid, mid, 3, 2, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            conv_bn_relu(mid, mid, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


@records_init_args
class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 for 32x32 inputs; the defaults are the CRD table's "ShuffleNetV2" (1.0x).

    Hook points (dotted module paths, shapes for a 32x32 input at 1.0x):

    - ``stem``: conv1x1-BN-ReLU, (B, 24, 32, 32)
    - ``layer1``: (B, 116, 16, 16)
    - ``layer2``: (B, 232, 8, 8)
    - ``layer3``: (B, 464, 4, 4)
    - ``head``: conv1x1-BN-ReLU, (B, 1024, 4, 4)
    - ``pool``: the embedding before the classifier, (B, 1024)
    - ``classifier``: the logits, (B, num_classes)

    Args:
        num_classes: number of output logits.
        net_size: width multiplier; one of 0.5, 1.0, 1.5, 2.0.
    """

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3", "head")

    #: Stage widths and head width per net size (Table 5 of the paper).
    WIDTHS: dict[float, tuple[int, int, int, int]] = {
        0.5: (48, 96, 192, 1024),
        1.0: (116, 232, 464, 1024),
        1.5: (176, 352, 704, 1024),
        2.0: (244, 488, 976, 2048),
    }
    UNITS: tuple[int, int, int] = (4, 8, 4)

    def __init__(self, num_classes: int = 100, net_size: float = 1.0) -> None:
        super().__init__()
        if net_size not in self.WIDTHS:
            raise ValueError(f"net_size must be one of {sorted(self.WIDTHS)}, got {net_size}")
        self.num_classes = num_classes
        widths = self.WIDTHS[net_size]
        self.stem = conv_bn_relu(3, _STEM_CHANNELS, kernel_size=1)
        in_channels = _STEM_CHANNELS
        stages = []
        for width, units in zip(widths[:3], self.UNITS, strict=True):
            layers: list[nn.Module] = [ShuffleV2DownUnit(in_channels, width)]
            layers += [ShuffleV2Unit(width) for _ in range(units - 1)]
            stages.append(nn.Sequential(*layers))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.head = conv_bn_relu(widths[2], widths[3], kernel_size=1)
        self.pool = global_pool()
        self.classifier = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(self.pool(self.head(x)))
