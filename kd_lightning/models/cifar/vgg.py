"""VGG with BatchNorm for 32x32 inputs, as in the CRD benchmark.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, adapted to CIFAR by the CRD benchmark (Tian et al., ICLR 2020): five blocks of 3x3
conv(+bias)-BN-ReLU layers separated by 2x2 max-pooling after the first three blocks (the last
two blocks run at 4x4), global average pooling and a single linear classifier (no 4096-wide
fully connected layers). VGG-8 has one conv per block (64/128/256/512/512), VGG-13 has two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.models.cifar._common import global_pool, init_weights
from kd_lightning.models.spec import records_init_args

#: Channels per conv layer of each of the five blocks.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def _block(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


@records_init_args
class CifarVGG(nn.Module):
    """VGG-BN for 32x32 inputs.

    Hook points (dotted module paths, output shapes for a 32x32 VGG-8/13 input):

    - ``block0``: (B, 64, 32, 32)
    - ``block1``: (B, 128, 16, 16)
    - ``block2``: (B, 256, 8, 8)
    - ``block3``: (B, 512, 4, 4)
    - ``block4``: (B, 512, 4, 4)
    - ``pool``: the embedding before the classifier, (B, 512)
    - ``classifier``: the logits, (B, num_classes)

    Block outputs are post-ReLU; the last BatchNorm of a block (``block2.4`` in VGG-13,
    ``block2.1`` in VGG-8) gives the pre-activation response. ``maxpool0`` .. ``maxpool2``
    sit between the first blocks. ``stage_names`` lists the stage outputs in order.

    Args:
        config: one of ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``.
        num_classes: number of output logits.
    """

    stage_names: tuple[str, ...] = ("block0", "block1", "block2", "block3", "block4")

    def __init__(self, config: str = "vgg13", num_classes: int = 100) -> None:
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
        blocks = VGG_CONFIGS[config]
        self.num_classes = num_classes
        self.block0 = _block(3, blocks[0])
        self.maxpool0 = nn.MaxPool2d(2, 2)
        self.block1 = _block(blocks[0][-1], blocks[1])
        self.maxpool1 = nn.MaxPool2d(2, 2)
        self.block2 = _block(blocks[1][-1], blocks[2])
        self.maxpool2 = nn.MaxPool2d(2, 2)
        self.block3 = _block(blocks[2][-1], blocks[3])
        self.block4 = _block(blocks[3][-1], blocks[4])
        self.pool = global_pool()
        self.classifier = nn.Linear(blocks[4][-1], num_classes)
        init_weights(self)
        # The CRD VGG draws its classifier from N(0, 0.01).
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool0(self.block0(x))
        x = self.maxpool1(self.block1(x))
        x = self.maxpool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(self.pool(x))


@records_init_args
class VGG8(CifarVGG):
    """VGG-8 with BatchNorm (one conv per block). Hook points: see CifarVGG.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(config="vgg8", num_classes=num_classes)


@records_init_args
class VGG13(CifarVGG):
    """VGG-13 with BatchNorm (two convs per block). Hook points: see CifarVGG.

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(config="vgg13", num_classes=num_classes)
