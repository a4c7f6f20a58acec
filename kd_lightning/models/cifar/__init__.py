"""The CIFAR model zoo of the CRD benchmark (Tian et al., "Contrastive Representation
Distillation", ICLR 2020), written for this library.

Every model takes 32x32 RGB images, returns logits, exposes its stages as plain named submodules
(listed in ``stage_names`` and in each class docstring) for forward hooks, calls its pooled
pre-classifier embedding ``pool`` and its last layer ``classifier``. Each model is a class, so a
LightningCLI config can name it in ``class_path``; :data:`CIFAR_MODELS` maps the CRD names
(``resnet8x4``, ``wrn_40_2``, ``mobilenetv2`` for CRD's ``mobile_half``, ...) to those classes.
"""

from __future__ import annotations

from torch import nn

from kd_lightning.models.cifar.mobilenetv2 import MobileNetV2
from kd_lightning.models.cifar.resnet import (
    CifarResNet,
    ResNet8,
    ResNet8x4,
    ResNet14,
    ResNet20,
    ResNet32,
    ResNet32x4,
    ResNet44,
    ResNet56,
    ResNet110,
)
from kd_lightning.models.cifar.shufflenet import ShuffleNetV1, ShuffleNetV2
from kd_lightning.models.cifar.vgg import VGG8, VGG13, CifarVGG
from kd_lightning.models.cifar.wrn import WideResNet, WRN16x2, WRN40x1, WRN40x2

#: CRD's model names -> classes (each builds with ``cls(num_classes=...)``).
CIFAR_MODELS: dict[str, type[nn.Module]] = {
    "resnet8": ResNet8,
    "resnet14": ResNet14,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet44": ResNet44,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "resnet8x4": ResNet8x4,
    "resnet32x4": ResNet32x4,
    "wrn_16_2": WRN16x2,
    "wrn_40_1": WRN40x1,
    "wrn_40_2": WRN40x2,
    "vgg8": VGG8,
    "vgg13": VGG13,
    "mobilenetv2": MobileNetV2,
    "shufflenetv1": ShuffleNetV1,
    "shufflenetv2": ShuffleNetV2,
}


def cifar_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build a zoo model by its CRD name (``"resnet8x4"``, ``"wrn_40_2"``, ...).

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown CIFAR model {name!r}; choose one of {sorted(CIFAR_MODELS)}")
    return CIFAR_MODELS[name](num_classes=num_classes)


__all__ = [
    "CIFAR_MODELS",
    "VGG8",
    "VGG13",
    "CifarResNet",
    "CifarVGG",
    "MobileNetV2",
    "ResNet8",
    "ResNet8x4",
    "ResNet14",
    "ResNet20",
    "ResNet32",
    "ResNet32x4",
    "ResNet44",
    "ResNet56",
    "ResNet110",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "WRN16x2",
    "WRN40x1",
    "WRN40x2",
    "WideResNet",
    "cifar_model",
]
