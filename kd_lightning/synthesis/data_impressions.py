r"""Data Impressions: inputs whose softened teacher output matches a sampled soft target.

Nayak, Mopuri, Shaj, Babu & Chakraborty (2019), "Zero-Shot Knowledge Distillation in Deep
Networks" (ICML). The teacher's final layer holds one weight vector (template) :math:`w_k`
per class; their cosine similarities, min-max normalised per row, form the class similarity
matrix

.. math::
    C(i, j) = \frac{w_i^\top w_j}{\lVert w_i \rVert \lVert w_j \rVert},\qquad
    \tilde C(i, :) = \frac{C(i, :) - \min_j C(i, j)}{\max_j C(i, j) - \min_j C(i, j)} \in [0, 1].

The softmax outputs of class :math:`k` are modelled as :math:`s \sim \mathrm{Dir}(K,\
\beta\,\tilde C(k, :))`: the concentration of class :math:`k` is its row of the similarity
matrix scaled by :math:`\beta` (the paper uses two scales, 1.0 and 0.1, half the impressions
each: a large :math:`\beta` spreads the mass over similar classes, a small one makes peaked
targets). For each sampled :math:`y` an input is optimised, from uniform noise, to minimise
the cross-entropy between :math:`y` and the teacher's softmax at temperature :math:`\tau`
(20 in the paper):

.. math:: \min_x\; -\sum_i y_i \log \mathrm{softmax}\big(f_T(x) / \tau\big)_i

The row minimum of :math:`\tilde C` is 0, and a Dirichlet concentration must be positive, so
entries are floored at ``min_similarity`` before scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.synthesis.base import InputSynthesiser
from kd_lightning.synthesis.deep_inversion import balanced_classes, l2_prior, total_variation
from kd_lightning.teachers import output_logits


def class_similarity_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Row-wise min-max normalised cosine similarity of the class templates ``weight`` (K, D).

    Returns a (K, K) float32 matrix with entries in [0, 1], 1 on the diagonal (a template is
    most similar to itself) and 0 at each row's least similar class.
    """
    if weight.dim() != 2 or weight.shape[0] < 2:
        raise ValueError(
            f"class templates must have shape (num_classes >= 2, features), got {tuple(weight.shape)}"
        )
    templates = F.normalize(weight.detach().float(), dim=1)
    cosine = templates @ templates.T
    low = cosine.min(dim=1, keepdim=True).values
    high = cosine.max(dim=1, keepdim=True).values
    return (cosine - low) / (high - low).clamp_min(torch.finfo(torch.float32).eps)


def dirichlet_concentration(
    similarity: torch.Tensor, beta: float, min_similarity: float = 1e-3
) -> torch.Tensor:
    r"""Concentration :math:`\alpha^k = \beta \max(\tilde C(k, :), \epsilon)` of every class (rows)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not min_similarity > 0:
        raise ValueError(f"min_similarity must be > 0, got {min_similarity}")
    return beta * similarity.clamp_min(min_similarity)


def sample_dirichlet(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Dirichlet sample per row of ``concentration``, reproducible from ``generator``.

    Drawn in float64 (Gamma variates of a small concentration underflow float32) from a forked
    RNG seeded by ``generator``, so the global random state is untouched.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gammas = torch._standard_gamma(concentration.double())
    sums = gammas.sum(dim=-1, keepdim=True)
    if bool(
        (sums <= 0).any()
    ):  # pragma: no cover - needs every Gamma variate of a row to underflow
        raise FloatingPointError("a Dirichlet sample underflowed; raise beta or min_similarity")
    return (gammas / sums).float()


def find_classifier(model: nn.Module, num_classes: int, layer: str | None = None) -> nn.Linear:
    """The final fully connected layer: ``layer`` (a module path) or the last ``nn.Linear`` with ``num_classes`` outputs."""
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"{type(model).__name__} has no layer {layer!r}; its linear layers are {linear}"
            )
        module = modules[layer]
        if not isinstance(module, nn.Linear) or module.out_features != num_classes:
            raise ValueError(
                f"classifier_layer {layer!r} must be an nn.Linear with {num_classes} outputs, got "
                f"{module}"
            )
        return module
    candidates = [
        m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear with {num_classes} outputs, whose weights "
            "Data Impressions read as class templates: set classifier_layer to the module path of "
            "the final layer (an nn.Linear), or use DeepInversion"
        )
    return candidates[-1]


class DataImpressions(InputSynthesiser):
    """Data Impressions (Nayak et al. 2019); see the module docstring for the method.

    Args:
        betas: the concentration scales; the impressions of each class are split equally
            between them (the paper: 1.0 and 0.1).
        temperature: :math:`\\tau` of the teacher's softmax during the optimisation.
        min_similarity: floor of the normalised similarity (concentrations must be > 0).
        classifier_layer: module path of the teacher's final ``nn.Linear``; default: the last
            ``nn.Linear`` with ``num_classes`` outputs.
        tv_weight: optional total-variation prior (0 in the paper).
        l2_weight: optional mean-squared-input prior (0 in the paper).
        batch_size: impressions optimised together (they do not interact).
        steps: optimisation steps per batch (the paper: 1500).
        lr: Adam learning rate on the inputs.
        input_range: ``[low, high]`` of valid inputs (clamped after each step), or ``None``.
        init: ``"uniform"`` (the paper) or ``"normal"`` starting inputs.
        seed: seed of the soft targets and starting inputs (``None``: the run's seed).
    """

    method = "data_impressions"

    def __init__(
        self,
        betas: Sequence[float] = (1.0, 0.1),
        temperature: float = 20.0,
        min_similarity: float = 1e-3,
        classifier_layer: str | None = None,
        tv_weight: float = 0.0,
        l2_weight: float = 0.0,
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
        betas = [float(b) for b in betas]
        if not betas or any(not b > 0 for b in betas):
            raise ValueError(f"betas must be a non-empty list of positive scales, got {betas}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if tv_weight < 0 or l2_weight < 0:
            raise ValueError("tv_weight and l2_weight must be >= 0")
        self.betas, self.temperature = betas, float(temperature)
        self.min_similarity = min_similarity
        self.classifier_layer = classifier_layer
        self.tv_weight, self.l2_weight = tv_weight, l2_weight

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "betas": list(self.betas),
            "temperature": self.temperature,
            "min_similarity": self.min_similarity,
            "classifier_layer": self.classifier_layer,
            "tv_weight": self.tv_weight,
            "l2_weight": self.l2_weight,
        }

    def similarity(self, teacher: nn.Module, num_classes: int) -> torch.Tensor:
        """The teacher's normalised class similarity matrix (K, K)."""
        classifier = find_classifier(teacher, num_classes, self.classifier_layer)
        return class_similarity_matrix(classifier.weight)

    def draw_targets(
        self, teacher: nn.Module, num_samples: int, num_classes: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        similarity = self.similarity(teacher, num_classes).cpu()
        classes = balanced_classes(num_samples, num_classes, generator)
        # Within each class, impressions alternate between the scales: an equal split.
        rank_in_class = torch.zeros(num_samples, dtype=torch.long)
        for k in range(num_classes):
            members = (classes == k).nonzero().flatten()
            rank_in_class[members] = torch.arange(len(members))
        betas = torch.tensor(self.betas)[rank_in_class % len(self.betas)]
        concentration = (
            betas.unsqueeze(1)
            * dirichlet_concentration(similarity, beta=1.0, min_similarity=self.min_similarity)[
                classes
            ]
        )
        return {
            "class": classes,
            "soft_target": sample_dirichlet(concentration, generator),
            "beta": betas,
        }

    def objective(
        self, teacher: nn.Module, inputs: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        logits = output_logits(teacher(inputs)).float()
        log_probs = F.log_softmax(logits / self.temperature, dim=1)
        ce = -(targets["soft_target"] * log_probs).sum(dim=1).mean()
        loss = ce
        terms = {"ce": ce}
        if self.tv_weight > 0 and inputs.dim() >= 3:
            terms["tv"] = total_variation(inputs)
            loss = loss + self.tv_weight * terms["tv"]
        if self.l2_weight > 0:
            terms["l2"] = l2_prior(inputs)
            loss = loss + self.l2_weight * terms["l2"]
        return {"loss": loss, **terms}
