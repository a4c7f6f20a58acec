"""A multilayer perceptron for small flat inputs (digits' 8x8 pixels)."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.spec import records_init_args


@records_init_args
class MLP(nn.Module):
    """Fully connected classifier: flatten -> [Linear -> ReLU (-> Dropout)] x depth -> Linear.

    Hookable layers: ``hidden.<i>`` (the i-th Linear+ReLU block's ``nn.Sequential``) and
    ``classifier``.

    Args:
        num_classes: number of output logits.
        in_features: flattened input size (64 for 8x8 digits).
        hidden_sizes: widths of the hidden layers.
        dropout: dropout probability after each hidden layer (0 disables it).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 64,
        hidden_sizes: list[int] = [128],  # noqa: B006 - immutable use; jsonargparse needs a literal default
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        blocks = []
        width = in_features
        for size in hidden_sizes:
            layers: list[nn.Module] = [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
            width = size
        self.hidden = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(x.flatten(1)))
