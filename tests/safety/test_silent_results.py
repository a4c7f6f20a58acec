"""Silent results: a constant objective, a NaN only in validation, a KL below 0 or stuck at 0,
an overflowing weight named as ``loss``. Each now stops (or is refused) naming the cause."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.data import DigitsTransferSet
from kd_lightning.functional.soft_target import soft_target_kl
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.methods.nonfinite import NonFiniteGuard, NonFiniteTraining
from kd_lightning.models import MLP
from kd_lightning.objective import LossTerm, Objective, Progress
from kd_lightning.teachers import FrozenTeacher
from tests.safety.conftest import trainer, unchanged, weights


# ------------------------------------------------------------------ (a) constant objective
@pytest.mark.parametrize(
    "zero_weights",
    [[0.0, 0.0], [0], [0, 0.0, 0], [0.0]],
    ids=["kd+ce", "one term", "three terms", "one float"],
)
def test_objective_whose_every_weight_is_zero_is_refused(zero_weights):
    losses = [SoftTargetKLLoss, HardLabelCrossEntropy, SoftTargetKLLoss]
    terms = [LossTerm(losses[i](), weight=w, name=f"t{i}") for i, w in enumerate(zero_weights)]
    with pytest.raises(ValueError, match=r"weight 0.*trains nothing.*weight > 0"):
        Objective(terms)


def test_method_with_zero_weight_terms_is_refused_before_training():
    terms = [LossTerm(SoftTargetKLLoss(), weight=0.0, name="kd"),
             LossTerm(HardLabelCrossEntropy(), weight=0.0, name="ce")]  # fmt: skip
    with pytest.raises(ValueError, match="every loss term has weight 0"):
        OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP()), loss_terms=terms)
    # one weight > 0 is an objective that trains
    terms[1] = LossTerm(HardLabelCrossEntropy(), weight=0.1, name="ce")
    OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP()), loss_terms=terms)


# ------------------------------------------------------------------ (b) NaN in evaluation only
class CorruptEvaluation(DigitsTransferSet):
    """Digits whose ``split`` inputs hold ``value`` in one sample (training inputs are clean)."""

    def __init__(self, split: str, value: float) -> None:
        super().__init__(batch_size=32)
        self.corrupt, self.value = split, value

    def load_split(self, split):
        inputs, targets = super().load_split(split)
        if split == self.corrupt:
            inputs = inputs.clone()
            inputs[3, 0, 2, 2] = self.value
        return inputs, targets


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("sanity", [2, 0], ids=["sanity check", "no sanity check"])
def test_non_finite_validation_loss_stops_the_fit_and_writes_no_checkpoint(tmp_path, value, sanity):
    torch.manual_seed(0)
    module = Supervised(MLP(hidden_sizes=[8]))
    before = weights(module)
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    fit = trainer(tmp_path, num_sanity_val_steps=sanity, limit_val_batches=None,
                  enable_checkpointing=True, callbacks=[save])  # fmt: skip
    with pytest.raises(NonFiniteTraining, match=r"the validation loss became non-finite") as err:
        fit.fit(module, CorruptEvaluation("val", value))
    assert "'ce'" in str(err.value) and "validation split" in str(err.value)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
    if sanity:  # stopped by the sanity check: not one step taken
        assert unchanged(before, module)


def test_non_finite_test_loss_is_refused_naming_the_test_split(tmp_path):
    module = Supervised(MLP(hidden_sizes=[8]))
    with pytest.raises(NonFiniteTraining, match=r"the test loss became non-finite.*test split"):
        trainer(tmp_path).test(module, CorruptEvaluation("test", math.nan))


# ------------------------------------------------------------------ (c) KL >= 0, useful T only
def high_temperature_limit(student, teacher):
    """T^2 KL as T -> inf (Hinton et al. 2015, sec. 2.1): 1/(2C) sum_i (dv_i - dz_i)^2 with
    the logits centred per row (zero mean), averaged over rows; derived by expanding the
    softmax to first order in 1/T."""
    centred = (teacher - teacher.mean(-1, keepdim=True)) - (
        student - student.mean(-1, keepdim=True)
    )
    return (centred.double() ** 2).sum(-1).mean() / (2 * student.shape[-1])


@pytest.mark.parametrize("temperature", [1e3, 3e3, 1e4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_target_kl_at_high_temperature_is_the_logit_matching_limit(temperature, seed):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(32, 10, generator=g) * 3, torch.randn(32, 10, generator=g) * 3
    value = SoftTargetKLLoss(temperature)(student=student, teacher=teacher)
    limit = high_temperature_limit(student, teacher)
    assert value.dtype == torch.float32
    assert value.item() >= 0
    assert value.item() == pytest.approx(limit.item(), rel=2e-3)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 100.0, 1e4, 1e6])
def test_soft_target_kl_is_never_negative_and_zero_for_identical_logits(temperature):
    torch.manual_seed(0)
    logits = torch.randn(16, 100) * 5
    other = logits + 1e-3 * torch.randn(16, 100)
    assert soft_target_kl(logits, logits.clone(), temperature).item() == pytest.approx(0, abs=1e-6)
    assert soft_target_kl(other, logits, temperature).item() >= 0


@pytest.mark.parametrize("temperature", [1e-30, 1e-3, 0.009, 1.5e4, 1e6, 1e30])
def test_temperatures_outside_the_useful_range_are_refused(temperature):
    with pytest.raises(ValueError, match=r"temperature must be in \[0.01, 10000\].*LogitMatching"):
        SoftTargetKLLoss(temperature)


@pytest.mark.parametrize("temperature", [0.01, 0.5, 20.0, 1e4])
def test_temperatures_inside_the_range_are_kept(temperature):
    assert SoftTargetKLLoss(temperature).temperature == temperature


# ------------------------------------------------------------------ (d) overflowing weight
def _guard_message(weights_by_term: dict[str, float], per_unit: bool = False) -> str:
    """The guard's message after one step; ``per_unit``: weights are what weight x value is."""
    terms = [LossTerm(SoftTargetKLLoss(4.0), weight=weights_by_term["kd"], name="kd"),
             LossTerm(HardLabelCrossEntropy(), weight=weights_by_term["ce"], name="ce")]  # fmt: skip
    objective = Objective(terms)
    torch.manual_seed(0)
    knowledge = {"student": torch.randn(8, 10), "teacher": torch.randn(8, 10) * 4}
    batch = {"target": torch.randint(0, 10, (8,))}
    losses = objective.evaluate(knowledge, batch, ["student", "teacher"], Progress())
    if per_unit:  # weight = target product / unweighted value
        for term in objective:
            term.weight = weights_by_term[term.name] / losses[term.name].item()
        losses = objective.evaluate(knowledge, batch, ["student", "teacher"], Progress())
    guard = NonFiniteGuard()
    guard.record(losses, "train", SimpleNamespace(objective=objective, progress=Progress()))
    with pytest.raises(NonFiniteTraining) as err:
        guard.raise_if_tripped(1)
    return str(err.value)


@pytest.mark.parametrize(
    ("weights_by_term", "named"),
    [
        ({"kd": 1e39, "ce": 0.1}, "kd"),
        ({"kd": 0.9, "ce": 3e38}, "ce"),
        ({"kd": 2e38, "ce": 1.0}, "kd"),
    ],
)
def test_a_weight_that_overflows_names_its_term_and_the_weight(weights_by_term, named):
    message = _guard_message(weights_by_term)
    assert f"term(s) ['{named}']" in message
    assert f"term '{named}' is finite but weight x value overflows" in message
    assert f"{weights_by_term[named]:g}" in message
    assert "likely causes" not in message  # the cause is known: the weight, not the data


def test_terms_each_finite_whose_sum_overflows_say_so():
    # each weighted value 2e38 < float32's 3.4e38; their sum 4e38 is not
    message = _guard_message({"kd": 2e38, "ce": 2e38}, per_unit=True)
    assert "their sum overflowed" in message


def test_fit_with_an_overflowing_weight_names_the_term(tmp_path):
    torch.manual_seed(0)
    terms = [LossTerm(SoftTargetKLLoss(4.0), weight=1e39, name="kd"),
             LossTerm(HardLabelCrossEntropy(), weight=0.1, name="ce")]  # fmt: skip
    module = OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP()), loss_terms=terms)
    with pytest.raises(NonFiniteTraining, match=r"term\(s\) \['kd'\].*weight 1e\+39"):
        trainer(tmp_path, limit_val_batches=0).fit(module, DigitsTransferSet(batch_size=32))
    # with validation, the sanity check already stops it (before any step), naming the term
    module = OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP()), loss_terms=terms)
    before = weights(module)
    with pytest.raises(NonFiniteTraining, match=r"validation loss.*\['kd'\].*weight 1e\+39"):
        trainer(tmp_path).fit(module, DigitsTransferSet(batch_size=32))
    assert unchanged(before, module)


@pytest.mark.parametrize("weight", [1e-50, 5e-324, 1e-39])
def test_a_weight_that_is_zero_in_float32_is_refused(weight):
    from kd_lightning.losses import SoftTargetKLLoss
    from kd_lightning.objective import LossTerm

    with pytest.raises(ValueError, match="rounds to 0"):
        LossTerm(SoftTargetKLLoss(4.0), weight=weight, name="kd")
    LossTerm(SoftTargetKLLoss(4.0), weight=1e-30, name="kd")  # small but representable: kept
