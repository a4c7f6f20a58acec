"""Kind 7: a submodule the user froze in eval mode stays in eval mode, and its BatchNorm
statistics stay where they were: through fit (library data or plain loaders), through the
start-up checks (even a failing one), and through the helpers that evaluate a live model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.bench.evaluate import predictions
from kd_lightning.compression.latency import measure_latency
from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP
from kd_lightning.modes import eval_mode
from kd_lightning.teachers import FrozenTeacher
from tests.safety.conftest import trainer


class FrozenBackboneStudent(nn.Module):
    """A student whose BatchNorm backbone the user keeps in eval mode, weights frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
        with torch.no_grad():  # statistics of a "pre-trained" backbone, far from the defaults
            self.backbone[2].running_mean.fill_(0.5)
            self.backbone[2].running_var.fill_(2.0)
        self.backbone.eval()
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _backbone_state(student: FrozenBackboneStudent) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in student.backbone.state_dict().items()}


def _loaders():
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8), torch.arange(96) % 10
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), 16)


@pytest.mark.parametrize("method", ["supervised", "offline"])
@pytest.mark.parametrize("data", ["data module", "plain loaders"])
def test_the_frozen_backbone_stays_frozen_through_fit(tmp_path, method, data):
    torch.manual_seed(0)
    student = FrozenBackboneStudent()
    model = (
        Supervised(student)
        if method == "supervised"
        else OfflineDistillation(student, FrozenTeacher(MLP(hidden_sizes=[8])))
    )
    frozen = _backbone_state(student)
    head_mean = student.head[1].running_mean.clone()
    fit = trainer(tmp_path)
    fit.fit(model, *(_loaders() if data == "plain loaders" else [DigitsTransferSet(batch_size=32)]))
    assert fit.global_step == 3
    assert not student.backbone.training and not student.backbone[2].training
    assert student.head.training  # the trained part trains
    after = student.backbone.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # statistics and weights
    assert not torch.equal(head_mean, student.head[1].running_mean)  # the head's moved


class FailingLoss(nn.Module):
    def forward(self, *, student, teacher, target=None):
        raise RuntimeError("this loss cannot run")


def test_start_up_checks_change_no_mode_no_buffer_and_no_random_draw_even_when_failing():
    from kd_lightning.objective import LossTerm

    torch.manual_seed(0)
    student = FrozenBackboneStudent()
    data = DigitsTransferSet(batch_size=32)
    data.setup("fit")
    example = data.example_batch()
    for terms in (None, [LossTerm(FailingLoss(), name="failing")]):
        model = OfflineDistillation(student, FrozenTeacher(MLP(hidden_sizes=[8])), loss_terms=terms)
        model.train()
        student.backbone.eval()
        modes, state = _modes(model), {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        if terms is None:
            model.check_example(example)
        else:
            with pytest.raises(ValueError, match="loss term 'failing'"):
                model.check_example(example)
        after = _modes(model)  # a passing check adds the metric modules: compare the others
        assert {name: after[name] for name in modes} == modes
        after_state = model.state_dict()
        assert all(torch.equal(v, after_state[k]) for k, v in state.items())
        assert torch.equal(rng, torch.get_rng_state())


def test_helpers_that_evaluate_a_live_model_restore_every_submodule_mode():
    student = FrozenBackboneStudent()
    student.train()
    student.backbone.eval()
    modes = _modes(student)
    measure_latency(student, torch.randn(4, 1, 8, 8), repeats=2, warmup=0)
    assert _modes(student) == modes
    data = DigitsTransferSet(batch_size=64)
    data.setup("test")
    predictions([student, None], data)
    assert _modes(student) == modes
    with eval_mode(student, None):
        assert not any(_modes(student).values())
    assert _modes(student) == modes
