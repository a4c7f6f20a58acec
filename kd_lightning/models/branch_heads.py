"""Auxiliary exits for Be Your Own Teacher (Zhang et al., ICCV 2019).

BYOT attaches a classifier to intermediate layers of a network: each exit adapts the shallow
feature with a small "bottleneck" and classifies it. :class:`BranchHead` is one exit;
:func:`branch_heads` builds one per hooked layer from the feature shapes of one forward pass,
and the same config rebuilds them from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class BranchHead(nn.Module):
    """One exit on an intermediate feature: a small body to a ``width`` embedding, then a classifier.

    Feature maps ``(C, H, W)`` get conv3x3-BN-ReLU (BYOT's bottleneck that adapts shallow
    features) and global average pooling; token sequences ``(N, C)`` are averaged over tokens;
    vectors ``(C,)`` and token means go through Linear-ReLU.

    Args:
        feature_shape: shape of one sample's feature (without the batch dimension).
        width: size of the embedding (the deepest feature's size when a hint compares them).
        num_classes: number of logits.

    Raises:
        ValueError: a feature of another rank.
    """

    def __init__(self, feature_shape: Sequence[int], width: int, num_classes: int) -> None:
        super().__init__()
        self.feature_shape = [int(s) for s in feature_shape]
        if len(self.feature_shape) == 3:
            self.body: nn.Module = nn.Sequential(
                nn.Conv2d(self.feature_shape[0], width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        elif len(self.feature_shape) in (1, 2):
            self.body = nn.Sequential(nn.Linear(self.feature_shape[-1], width), nn.ReLU())
        else:
            raise ValueError(
                "a branch feature must be (C,), (N, C) or (C, H, W) per sample, got "
                f"{self.feature_shape}: attach the exit to another layer"
            )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding (B, width), logits (B, num_classes))``."""
        if feature.dim() == 3:  # tokens
            feature = feature.mean(dim=1)
        embedding = self.body(feature)
        return embedding, self.classifier(embedding)


def branch_heads(config: dict[str, Any]) -> nn.ModuleList:
    """One :class:`BranchHead` per entry of ``config["shapes"]``, with ``config["width"]`` and
    ``config["num_classes"]`` (the config a checkpoint records)."""
    return nn.ModuleList(
        [BranchHead(s, int(config["width"]), int(config["num_classes"])) for s in config["shapes"]]
    )
