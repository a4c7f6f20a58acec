"""Kind 2: non-finite training stops at once, naming the term and the cause, and writes no
checkpoint of non-finite weights; non-finite settings are refused before anything is built."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from kd_lightning.callbacks.finished_checkpoints import KeepFinishedCheckpoints
from kd_lightning.data import DigitsTransferSet
from kd_lightning.losses import DKDLoss, SoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.methods.nonfinite import NonFiniteTraining
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import FrozenTeacher
from tests.safety.conftest import DIGITS, MLP_MODEL, TINY, run_cli, trainer

pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory.*exists and is not empty")


class NaNAfter(nn.Module):
    """A teacher whose logits become NaN from the ``start``-th call on (a corrupt input)."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.net, self.calls, self.start = MLP(hidden_sizes=[8]), 0, start

    def forward(self, x):
        self.calls += 1
        logits = self.net(x)
        return logits * float("nan") if self.calls > self.start else logits


def _finite(path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("make", "term", "cause"),
    [
        # float16 on a CPU: Adam's eps (1e-8) is 0 in float16, the first update divides by 0
        (
            lambda: Supervised(SmallCNN(width=8), optimizer=lambda p: torch.optim.Adam(p, 3e-3)),
            "weights became non-finite",
            "float16",
        ),
        (
            lambda: OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(NaNAfter(start=4))),
            "kd",
            "NaN/inf in the inputs",
        ),
        (
            lambda: Supervised(MLP(hidden_sizes=[8]), optimizer=lambda p: torch.optim.SGD(p, 1e30)),
            "ce",
            "learning rate",
        ),
    ],
    ids=["16-true on cpu", "nan teacher outputs", "huge learning rate"],
)
def test_first_non_finite_loss_stops_and_no_non_finite_checkpoint_is_written(
    tmp_path, monkeypatch, make, term, cause
):
    # 16-true on the CPU is refused at start-up (test_half_precision_on_cpu.py); the guard
    # stays the second line (float16 elsewhere): let the run start to reach it.
    monkeypatch.setattr("kd_lightning.methods.checks.UNTRAINABLE_PRECISIONS", {})
    torch.manual_seed(0)
    model = make()
    # Saves after every step into one fixed file: a NaN step would overwrite the good one.
    callback = ModelCheckpoint(
        dirpath=tmp_path, filename="run", every_n_train_steps=1, enable_version_counter=False
    )
    precision = "16-true" if cause == "float16" else "32-true"
    fit = trainer(
        tmp_path, max_epochs=2, limit_train_batches=10, enable_checkpointing=True,
        callbacks=[callback, KeepFinishedCheckpoints()], precision=precision,
    )  # fmt: skip
    with pytest.raises(NonFiniteTraining) as error:
        fit.fit(model, DigitsTransferSet(batch_size=32))
    message = str(error.value)
    assert term in message if " " in term else f"['{term}']" in message, message
    assert cause in message and "no checkpoint" in message
    assert fit.global_step < 10  # stopped in the first epoch, not at its end
    written = list(tmp_path.glob("*.ckpt"))
    assert all(_finite(p) for p in written), "a checkpoint of non-finite weights was written"


@pytest.mark.parametrize(
    "build",
    [
        lambda: LossTerm(SoftTargetKLLoss(), weight=math.nan),
        lambda: LossTerm(SoftTargetKLLoss(), weight=math.inf),
        lambda: SoftTargetKLLoss(temperature=math.inf),
        lambda: SoftTargetKLLoss(temperature=math.nan),
        lambda: DKDLoss(temperature=math.inf),
        lambda: OfflineDistillation(MLP(), FrozenTeacher(MLP()), temperature=math.inf),
    ],
    ids=["weight nan", "weight inf", "T inf", "T nan", "DKD T inf", "method T inf"],
)
def test_non_finite_settings_are_refused_when_built(build):
    with pytest.raises(ValueError, match=r"(finite|must be > 0|>= 0)"):
        build()


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_non_finite_yaml_weight_is_refused_through_the_cli(tmp_path, monkeypatch, capsys, value):
    config = yaml.safe_load((DIGITS / "student_alone.yaml").read_text())
    config["model"]["init_args"]["loss_terms"] = [
        {
            "class_path": "kd_lightning.methods.LossTerm",
            "init_args": {"loss": "kd_lightning.losses.HardLabelCrossEntropy", "weight": "VALUE"},
        }
    ]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config).replace("VALUE", value).replace("'", ""))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["fit", "-c", str(path), *TINY, MLP_MODEL], capsys)
    assert code == 2
    first = err.strip().splitlines()[0]
    assert "weight of a loss term must be >= 0" in first and "finite" in first
    assert not list(tmp_path.rglob("*.ckpt"))
