r"""DeepInversion: inputs whose activations match the teacher's BatchNorm statistics.

Yin et al. (2020), "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion"
(CVPR). A BatchNorm layer remembers the per-channel mean and variance of its input over the
training data (``running_mean``, ``running_var``). A batch of synthetic inputs :math:`\hat x`
is optimised so that, at every BatchNorm layer :math:`l`, the batch's own channel statistics
match the remembered ones, while the teacher classifies each input as its chosen class
:math:`y` and simple image priors keep the inputs smooth and bounded:

.. math::
    \min_{\hat x}\; \mathrm{CE}\big(f_T(\hat x), y\big)
      + \alpha_{f} \sum_l \Big( \lVert \mu_l(\hat x) - \mathbb{E}[\mu_l] \rVert_2
                                + \lVert \sigma^2_l(\hat x) - \mathbb{E}[\sigma^2_l] \rVert_2 \Big)
      + \alpha_{tv} \mathcal{R}_{TV}(\hat x) + \alpha_{\ell_2} \mathcal{R}_{\ell_2}(\hat x)

:math:`\mu_l, \sigma^2_l` are the per-channel mean and (biased) variance of the layer's input
over the batch and every spatial position. Because the statistics are of the *batch*, each
batch mixes classes (targets are balanced and shuffled over the whole set). Random jitter (a
circular shift of a few pixels before the teacher sees the batch) is the paper's augmentation
during optimisation. The adaptive, student-aware competition term of the paper is not included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_lightning.synthesis.base import InputSynthesiser
from kd_lightning.teachers import output_logits


def total_variation(inputs: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    r"""Total-variation prior of images ``(..., H, W)``: mean difference between neighbours.

    .. math::
        \mathcal{R}_{TV}(x) = \operatorname{mean}_{i,j} |x_{i+1,j} - x_{i,j}|^p
                            + \operatorname{mean}_{i,j} |x_{i,j+1} - x_{i,j}|^p

    over every batch element and channel (``power`` p = 2: squared differences; p = 1: the
    anisotropic TV norm). 0 for a constant image.
    """
    if inputs.dim() < 2:
        raise ValueError(
            f"total_variation needs images (..., H, W), got shape {tuple(inputs.shape)}"
        )
    vertical = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().pow(power)
    horizontal = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().pow(power)
    return vertical.mean() + horizontal.mean()


def l2_prior(inputs: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathcal{R}_{\ell_2}(x) = \operatorname{mean}_b \lVert x_b \rVert_2^2 / D`: mean squared input value."""
    return inputs.float().pow(2).mean()


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``(N, C, *)`` features (over N and all positions)."""
    dims = [0, *range(2, features.dim())]
    mean = features.mean(dim=dims)
    var = features.var(dim=dims, unbiased=False)
    return mean, var


def batchnorm_statistics_distance(
    features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    r""":math:`\lVert \mu(x) - \mathbb{E}[\mu] \rVert_2 + \lVert \sigma^2(x) - \mathbb{E}[\sigma^2] \rVert_2` of one layer."""
    mean, var = channel_statistics(features.float())
    return torch.linalg.vector_norm(mean - running_mean.float()) + torch.linalg.vector_norm(
        var - running_var.float()
    )


class BatchNormStatistics:
    """Forward pre-hooks on a model's BatchNorm layers that measure DeepInversion's feature loss.

    Use as a context manager around the forward pass; the hooks exist only inside it::

        with BatchNormStatistics(teacher) as statistics:
            logits = teacher(x)
        loss = statistics.loss()

    Args:
        model: the network; every BatchNorm layer that tracks running statistics is hooked.
        first_layer_weight: multiplier of the first hooked layer's term (the official code of
            the paper weights the first layer more, as it is closest to the pixels); 1 = plain sum.

    Raises:
        ValueError: if the model has no BatchNorm layer with running statistics.
    """

    def __init__(self, model: nn.Module, first_layer_weight: float = 1.0) -> None:
        self.layers = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats
            and module.running_mean is not None
        ]  # fmt: skip
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm layer with running statistics, which "
                "DeepInversion's feature loss needs: set feature_weight to 0 (priors and class "
                "targets only) or use DataImpressions, which needs only the classifier weights"
            )
        self.first_layer_weight = first_layer_weight
        self.distances: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str, module: _BatchNorm):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.distances[name] = batchnorm_statistics_distance(
                args[0], module.running_mean, module.running_var
            )

        return hook

    def __enter__(self) -> BatchNormStatistics:
        self.distances = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook(name, module))
            for name, module in self.layers
        ]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def loss(self) -> torch.Tensor:
        """Sum over hooked layers of the statistics distance (first layer times its weight)."""
        if not self.distances:
            raise RuntimeError(
                "no BatchNorm layer ran: call loss() after a forward pass inside `with`"
            )
        names = [name for name, _ in self.layers if name in self.distances]
        total = self.distances[names[0]] * self.first_layer_weight
        for name in names[1:]:
            total = total + self.distances[name]
        return total


def balanced_classes(
    num_samples: int, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """``num_samples`` class ids, as equal per class as possible, in a random order."""
    classes = torch.arange(num_samples) % num_classes
    return classes[torch.randperm(num_samples, generator=generator)]


class DeepInversion(InputSynthesiser):
    """DeepInversion input synthesis (Yin et al. 2020); see the module docstring for the objective.

    Args:
        feature_weight: :math:`\\alpha_f`, weight of the BatchNorm-statistics term.
        first_layer_weight: extra multiplier of the first BatchNorm layer's term.
        tv_weight: :math:`\\alpha_{tv}`, weight of the total-variation prior.
        tv_power: 2 (squared differences) or 1 (absolute differences) in the TV prior.
        l2_weight: :math:`\\alpha_{\\ell_2}`, weight of the mean squared input value.
        jitter: maximal random circular shift (pixels, both axes) applied before each teacher
            pass; 0 disables it.
        batch_size: samples optimised together (the statistics are of this batch).
        steps: optimisation steps per batch.
        lr: Adam learning rate on the inputs.
        input_range: ``[low, high]`` of valid inputs (clamped after each step), or ``None``.
        init: ``"uniform"`` or ``"normal"`` starting inputs.
        seed: seed of targets, starting inputs and jitter (``None``: the run's seed).
    """

    method = "deep_inversion"

    def __init__(
        self,
        feature_weight: float = 1.0,
        first_layer_weight: float = 1.0,
        tv_weight: float = 0.0,
        tv_power: float = 2.0,
        l2_weight: float = 0.0,
        jitter: int = 0,
        batch_size: int = 256,
        steps: int = 200,
        lr: float = 0.05,
        input_range: Sequence[float] | None = (0.0, 1.0),
        init: str = "uniform",
        seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, steps=steps, lr=lr, input_range=input_range, init=init, seed=seed
        )
        for name, value in [
            ("feature_weight", feature_weight),
            ("first_layer_weight", first_layer_weight),
            ("tv_weight", tv_weight),
            ("l2_weight", l2_weight),
            ("jitter", jitter),
        ]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if tv_power not in (1, 2):
            raise ValueError(f"tv_power must be 1 or 2, got {tv_power}")
        self.feature_weight, self.first_layer_weight = feature_weight, first_layer_weight
        self.tv_weight, self.tv_power, self.l2_weight = tv_weight, tv_power, l2_weight
        self.jitter = int(jitter)
        self._jitter_generator = torch.Generator()

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "feature_weight": self.feature_weight,
            "first_layer_weight": self.first_layer_weight,
            "tv_weight": self.tv_weight,
            "tv_power": self.tv_power,
            "l2_weight": self.l2_weight,
            "jitter": self.jitter,
        }

    def draw_targets(
        self, teacher: nn.Module, num_samples: int, num_classes: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        self._jitter_generator = torch.Generator().manual_seed(self._seed + 7)
        return {"class": balanced_classes(num_samples, num_classes, generator)}

    def _jittered(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.jitter == 0 or inputs.dim() < 3:
            return inputs
        dy, dx = torch.randint(
            -self.jitter, self.jitter + 1, (2,), generator=self._jitter_generator
        ).tolist()
        return torch.roll(inputs, shifts=(dy, dx), dims=(-2, -1))

    def objective(
        self, teacher: nn.Module, inputs: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        seen = self._jittered(inputs)
        if self.feature_weight > 0:
            with BatchNormStatistics(teacher, self.first_layer_weight) as statistics:
                logits = output_logits(teacher(seen))
            feature = statistics.loss()
        else:
            logits = output_logits(teacher(seen))
            feature = logits.new_zeros(())
        ce = F.cross_entropy(logits.float(), targets["class"])
        tv = total_variation(inputs, self.tv_power) if inputs.dim() >= 3 else inputs.new_zeros(())
        l2 = l2_prior(inputs)
        loss = ce + self.feature_weight * feature + self.tv_weight * tv + self.l2_weight * l2
        return {"loss": loss, "ce": ce, "feature": feature, "tv": tv, "l2": l2}
