"""Arguments that only build a method's default objective (``temperature``, ``alpha``) are
refused beside ``loss_terms`` instead of being ignored: the message names the ones to drop. They
default to ``None`` (unset), so only values the user gave count; a checkpoint of an earlier
version that recorded both reloads with its loss terms (the values never acted there)."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods import BornAgain, LossTerm, OfflineDistillation
from kd_lightning.models import MLP
from kd_lightning.teachers import FrozenTeacher
from tests.safety.conftest import DIGITS, TINY, run_cli


def _terms() -> list[LossTerm]:
    return [LossTerm(SoftTargetKLLoss(2.0), name="kd"), LossTerm(HardLabelCrossEntropy())]


@pytest.mark.parametrize("method", [OfflineDistillation, BornAgain])
@pytest.mark.parametrize(
    "given",
    [{"temperature": 8.0}, {"alpha": 0.5}, {"temperature": 4.0, "alpha": 0.9}, {"alpha": 0.0}],
    ids=["temperature", "alpha", "both at the old defaults", "alpha 0"],
)
def test_default_objective_arguments_beside_loss_terms_are_refused(method, given):
    with pytest.raises(ValueError) as error:
        method(MLP(), FrozenTeacher(MLP()), loss_terms=_terms(), **given)
    message = str(error.value)
    assert f"leave {sorted(given)} unset" in message and "loss_terms replaces it" in message


@pytest.mark.parametrize(
    ("method", "given", "temperature", "kd_weight"),
    [
        (OfflineDistillation, {}, 4.0, 0.9),
        (OfflineDistillation, {"temperature": 2.0}, 2.0, 0.9),
        (BornAgain, {}, 1.0, 1.0),
        (BornAgain, {"alpha": 0.5, "temperature": 3.0}, 3.0, 0.5),
    ],
)
def test_without_loss_terms_they_build_the_default_objective(method, given, temperature, kd_weight):
    module = method(MLP(), FrozenTeacher(MLP()), **given)
    kd = next(t for t in module.objective if t.name == "kd")
    assert kd.loss.temperature == temperature and kd.weight == kd_weight
    custom = method(MLP(), FrozenTeacher(MLP()), loss_terms=_terms())  # terms alone: accepted
    assert [t.loss.temperature for t in custom.objective if t.name == "kd"] == [2.0]


def test_the_cli_refuses_the_combination_before_anything_runs(
    tmp_path, monkeypatch, capsys, supervised_checkpoint
):
    monkeypatch.chdir(tmp_path)
    teacher = f"--model.init_args.teacher.init_args.checkpoint_path={supervised_checkpoint}"
    config = ["fit", "-c", str(DIGITS / "hinton_kd.yaml"), *TINY, teacher]
    code, err = run_cli([*config, "--model.init_args.temperature=2.0"], capsys)
    first = err.strip().splitlines()[0]
    assert code == 2 and "['temperature']" in first and "leave ['temperature'] unset" in first
    assert not (tmp_path / "runs").exists()


def test_an_earlier_checkpoint_with_both_reloads_with_its_loss_terms(tmp_path):
    module = OfflineDistillation(MLP(hidden_sizes=[16]), None, loss_terms=_terms())
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    checkpoint["hyper_parameters"].update(temperature=7.0, alpha=0.3)  # an earlier version's
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    reloaded = OfflineDistillation.load_from_checkpoint(tmp_path / "earlier.ckpt")
    ours = [(t.name, getattr(t.loss, "temperature", None)) for t in module.objective]
    assert ours[0] == ("kd", 2.0)
    assert [(t.name, getattr(t.loss, "temperature", None)) for t in reloaded.objective] == ours


@pytest.mark.parametrize(
    "given",
    [
        {"temperature": 4.0},
        {"hard_label_weight": 0.0},
        {"temperature": 2.0, "hard_label_weight": 1},
    ],
)
def test_data_free_refuses_its_default_objective_arguments_beside_loss_terms(given):
    from kd_lightning.methods import DataFreeDistillation

    with pytest.raises(ValueError, match=rf"leave {sorted(given)!r} unset".replace("[", r"\[")):
        DataFreeDistillation(MLP(), FrozenTeacher(MLP()), loss_terms=_terms(), **given)
    default = DataFreeDistillation(
        MLP(), FrozenTeacher(MLP()), temperature=2.0, hard_label_weight=0.5
    )
    assert {
        t.name: (t.weight, getattr(t.loss, "temperature", None)) for t in default.objective
    } == {"kd": (1.0, 2.0), "ce": (0.5, None)}
