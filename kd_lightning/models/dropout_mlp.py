"""The dropout net of Hinton et al. (2012): an MLP with input and hidden dropout and max-norm.

Hinton, Srivastava, Krizhevsky, Sutskever & Salakhutdinov, "Improving neural networks by
preventing co-adaptation of feature detectors", arXiv:1207.0580, 2012; Srivastava et al.,
"Dropout: A Simple Way to Prevent Neural Networks from Overfitting", JMLR 2014. Hinton, Vinyals
& Dean (2015, section 3) train their MNIST teacher (784-1200-1200-10, ReLU) this way.

Max-norm: the incoming weight vector ``w_j`` of every hidden unit is kept within a ball,
``||w_j||_2 <= c``; after an update that leaves the ball it is rescaled onto it,
``w_j <- w_j * c / ||w_j||_2`` (a projection). Here the projection runs before every forward
pass in training mode and when the model leaves training mode, so every training step and every
evaluation sees projected weights; it runs under ``no_grad`` and rows already within
``c * (1 + 1e-5)`` are left bit for bit unchanged, so projecting is idempotent.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.spec import records_init_args

MAX_NORM_TOLERANCE = 1e-5
"""Relative slack before a row is rescaled (a rescaled row's norm is c up to rounding)."""


@records_init_args
class DropoutMLP(nn.Module):
    """Flatten -> Dropout(input) -> [Linear -> ReLU -> Dropout] x depth -> Linear, with max-norm.

    With ``input_dropout=0``, ``dropout=0`` and ``max_norm=None`` this is a plain ReLU MLP (the
    paper's unregularised small net, 784-800-800-10). Hookable layers: ``hidden.<i>`` and
    ``classifier``.

    Args:
        num_classes: number of output logits.
        in_features: flattened input size (784 for 28x28 images).
        hidden_sizes: widths of the hidden layers (the paper: [1200, 1200] teacher, [800, 800]
            student).
        input_dropout: dropout probability on the input pixels (Hinton et al. 2012: 0.2).
        dropout: dropout probability after each hidden layer (Hinton et al. 2012: 0.5).
        max_norm: bound ``c`` on the L2 norm of each hidden unit's incoming weights (None: no
            constraint). The output layer is not constrained.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 784,
        hidden_sizes: list[int] = [1200, 1200],  # noqa: B006 - never mutated; jsonargparse needs a literal
        input_dropout: float = 0.0,
        dropout: float = 0.0,
        max_norm: float | None = None,
    ) -> None:
        super().__init__()
        for name, p in (("input_dropout", input_dropout), ("dropout", dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None (no constraint), got {max_norm}")
        if not hidden_sizes:
            raise ValueError("hidden_sizes must name at least one hidden layer, e.g. [800, 800]")
        self.num_classes = num_classes
        self.max_norm = max_norm
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
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

    @torch.no_grad()
    def apply_max_norm(self) -> None:
        """Project every hidden unit's incoming weights onto ``||w_j|| <= max_norm``."""
        if self.max_norm is None:
            return
        for block in self.hidden:
            weight = block[0].weight  # (out, in): row j holds unit j's incoming weights
            norms = weight.norm(dim=1, keepdim=True)
            over = norms > self.max_norm * (1 + MAX_NORM_TOLERANCE)
            if over.any():
                weight.mul_(torch.where(over, self.max_norm / norms, torch.ones_like(norms)))

    def train(self, mode: bool = True) -> DropoutMLP:
        if self.training and not mode:
            self.apply_max_norm()  # the weights evaluated are the constrained ones
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.apply_max_norm()  # projects the previous optimizer step's update
        return self.classifier(self.hidden(self.input_dropout(x.flatten(1))))
