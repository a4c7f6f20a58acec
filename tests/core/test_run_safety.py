"""Runs stop at the first non-finite loss, start-up checks change no state, resume is exact."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.methods.nonfinite import NonFiniteTraining
from kd_lightning.models import MLP
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import FrozenTeacher


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class NaNInputs(DigitsTransferSet):
    """Clean example batch (start-up passes); NaN inputs in every training batch."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        for batch in loader:
            batch["input"] = batch["input"] * float("nan")
            yield batch


class ScaledByNaN(nn.Module):
    def forward(self, *, student, teacher, target=None):
        return (student * float("nan")).mean()


@pytest.mark.parametrize("case", ["nan_inputs", "nan_loss_term"])
def test_first_non_finite_loss_stops_the_run_and_no_checkpoint_is_written(tmp_path, case):
    torch.manual_seed(0)
    if case == "nan_inputs":
        model, data = Supervised(MLP(hidden_sizes=[8])), NaNInputs(batch_size=32)
        term = "ce"
    else:
        terms = [LossTerm(ScaledByNaN(), name="broken")]
        model = OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(MLP()), loss_terms=terms)
        data, term = DigitsTransferSet(batch_size=32), "broken"
    trainer = _trainer(tmp_path)
    with pytest.raises(NonFiniteTraining, match=term):
        trainer.fit(model, data)
    assert trainer.global_step <= 1
    assert not list(tmp_path.rglob("*.ckpt"))


class FrozenBackboneStudent(nn.Module):
    """A user's student whose BatchNorm backbone is deliberately kept in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_start_up_checks_keep_every_module_mode_and_buffer(tmp_path):
    torch.manual_seed(0)
    student = FrozenBackboneStudent()
    model = Supervised(student)
    model.train()
    student.backbone.eval()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    data = DigitsTransferSet(batch_size=32)
    data.setup("fit")
    model.check_example(data.example_batch())
    assert student.training and not student.backbone.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_resume_with_dropout_is_bitwise_exact(tmp_path):
    def run(max_epochs, ckpt=None, root=tmp_path / "a"):
        L.seed_everything(0)
        model = Supervised(MLP(hidden_sizes=[16], dropout=0.5))
        trainer = _trainer(root, max_epochs=max_epochs, limit_train_batches=4,
                           enable_checkpointing=True)  # fmt: skip
        trainer.fit(model, DigitsTransferSet(batch_size=32), ckpt_path=ckpt)
        return model, trainer

    straight, _ = run(2, root=tmp_path / "straight")
    _, first = run(1, root=tmp_path / "first")
    ckpt = first.checkpoint_callback.best_model_path
    resumed, _ = run(2, ckpt=ckpt, root=tmp_path / "resumed")
    pairs = zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name
