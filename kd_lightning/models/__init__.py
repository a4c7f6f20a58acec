"""The model zoo: plain ``nn.Module``s that return logits, with named layers to hook."""

from kd_lightning.models.cifar import (
    CIFAR_MODELS,
    VGG8,
    VGG13,
    MobileNetV2,
    ResNet8,
    ResNet8x4,
    ResNet14,
    ResNet20,
    ResNet32,
    ResNet32x4,
    ResNet44,
    ResNet56,
    ResNet110,
    ShuffleNetV1,
    ShuffleNetV2,
    WRN16x2,
    WRN40x1,
    WRN40x2,
    cifar_model,
)
from kd_lightning.models.dropout_mlp import DropoutMLP
from kd_lightning.models.from_checkpoint import FromCheckpoint
from kd_lightning.models.hf import HFModel
from kd_lightning.models.hf_students import ShallowCopy, shallow_copy
from kd_lightning.models.mlp import MLP
from kd_lightning.models.small_cnn import SmallCNN
from kd_lightning.models.spec import instantiate, model_spec, records_init_args
from kd_lightning.models.text_cnn import TextCNN
from kd_lightning.models.tiny_vit import TinyViT

__all__ = [
    "CIFAR_MODELS",
    "DropoutMLP",
    "FromCheckpoint",
    "HFModel",
    "MLP",
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
    "ShallowCopy",
    "ShuffleNetV2",
    "SmallCNN",
    "TextCNN",
    "TinyViT",
    "VGG8",
    "VGG13",
    "WRN16x2",
    "WRN40x1",
    "WRN40x2",
    "cifar_model",
    "instantiate",
    "model_spec",
    "shallow_copy",
    "records_init_args",
]
