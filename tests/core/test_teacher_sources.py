"""PretrainedTeacher reads every file a user is likely to hold, and none of them runs code."""

from __future__ import annotations

import os
import pickle

import lightning as L
import pytest
import torch
from torch import nn

from kd_lightning.models import MLP
from kd_lightning.teachers import PretrainedTeacher, load_student


def _outputs(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(5, 64))


def test_plain_state_dict_with_model_and_with_spec(tmp_path):
    torch.manual_seed(0)
    net = MLP(hidden_sizes=[8])
    torch.save(net.state_dict(), tmp_path / "teacher.pt")
    teacher = PretrainedTeacher(str(tmp_path / "teacher.pt"), model=MLP(hidden_sizes=[8]))
    assert torch.equal(_outputs(teacher.module), _outputs(net))
    spec = {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden_sizes": [8]}}
    from_spec = PretrainedTeacher(str(tmp_path / "teacher.pt"), model=spec)
    assert torch.equal(_outputs(from_spec.module), _outputs(net))
    assert not any(p.requires_grad for p in from_spec.parameters())


def test_plain_state_dict_without_model_names_the_fix(tmp_path):
    torch.save(MLP(hidden_sizes=[8]).state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="pass model="):
        PretrainedTeacher(str(tmp_path / "teacher.pt"))


def test_wrong_architecture_names_the_clash(tmp_path):
    torch.save(MLP(hidden_sizes=[8]).state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="do not fit a MLP"):
        PretrainedTeacher(str(tmp_path / "teacher.pt"), model=MLP(hidden_sizes=[9]), key_prefix="")


class UserModule(L.LightningModule):
    """A user's own LightningModule: the network lives under ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(hidden_sizes=[8])
        self.scale = nn.Parameter(torch.ones(()))


def test_user_lightning_checkpoint_prefix_found_and_given(tmp_path):
    torch.manual_seed(0)
    module = UserModule()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "user.ckpt")
    found = PretrainedTeacher(str(tmp_path / "user.ckpt"), model=MLP(hidden_sizes=[8]))
    given = PretrainedTeacher(
        str(tmp_path / "user.ckpt"), model=MLP(hidden_sizes=[8]), key_prefix="net."
    )
    assert torch.equal(_outputs(found.module), _outputs(module.net))
    assert torch.equal(_outputs(given.module), _outputs(module.net))


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("loader", ["teacher", "student", "teacher_with_model"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, loader):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.zeros(1)}, "extra": _RunsCode(str(marker))}
    path = tmp_path / "evil.ckpt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="would run code"):
        if loader == "teacher":
            PretrainedTeacher(str(path))
        elif loader == "student":
            load_student(str(path))
        else:
            PretrainedTeacher(str(path), model=MLP(hidden_sizes=[8]))
    assert not marker.exists()


def test_a_raw_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {}, "x": _RunsCode(str(marker))}, handle, protocol=4)
    with pytest.raises(ValueError):
        PretrainedTeacher(str(path))
    assert not marker.exists()
