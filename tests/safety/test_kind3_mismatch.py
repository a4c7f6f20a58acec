"""Kind 3: parts that do not fit each other are refused at start-up, naming both sides and the
fix: a teacher cache of another teacher, top-k values read at another temperature, a dense loss
on a top-k cache, logits of different ranks, and evaluations of the wrong (or no) weights."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from kd_lightning.bench.preflight import PreflightError
from kd_lightning.bench.study import run_study
from kd_lightning.data import DigitsTransferSet, TeacherCache, TeacherCacheError
from kd_lightning.digest import module_digest
from kd_lightning.losses import SoftTargetKLLoss
from kd_lightning.losses.sparse_soft_target import SparseSoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import FrozenTeacher
from tests.safety.conftest import DIGITS, run_cli, trainer, unchanged, weights


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(hidden_sizes=[16]).eval()


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, TeacherCache]:
    """A dense and a top-k (T=4, k=3) cache, both made by teacher A (seed 0)."""
    folder = tmp_path_factory.mktemp("caches")
    common = dict(teacher=_teacher(0), progress=False, dtype="float32", splits=("train", "val"))
    built = {
        "dense": TeacherCache(str(folder / "dense.kdtc"), **common),
        "topk": TeacherCache(str(folder / "topk.kdtc"), topk=3, temperature=4.0, **common),
    }
    for cache in built.values():
        cache.ensure(DigitsTransferSet())
    return built


def _refused(tmp_path, model, data, error, match):
    before = weights(model)
    fit = trainer(tmp_path)
    with pytest.raises(error, match=match) as raised:
        fit.fit(model, data)
    assert fit.global_step == 0 and unchanged(before, model)
    return str(raised.value)


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_a_cache_of_teacher_a_with_teacher_b_configured(tmp_path, caches, kind):
    b = _teacher(1)
    terms = None if kind == "dense" else [LossTerm(SparseSoftTargetKLLoss(4.0), teacher="topk")]
    model = OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(b), loss_terms=terms)
    message = _refused(
        tmp_path, model, DigitsTransferSet(batch_size=32, teacher_cache=caches[kind]),
        TeacherCacheError, "configure the teacher the cache was built from",
    )  # fmt: skip
    assert module_digest(_teacher(0)) in message and module_digest(b) in message
    assert "rebuild the cache" in message


def test_the_cache_of_the_configured_teacher_is_accepted(tmp_path, caches):
    model = OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(_teacher(0)))
    fit = trainer(tmp_path, limit_train_batches=1)
    fit.fit(model, DigitsTransferSet(batch_size=32, teacher_cache=caches["dense"]))
    assert fit.global_step == 1


@pytest.mark.parametrize("temperature", [2.0, 1.0, 8.0])
def test_topk_values_read_at_another_temperature(tmp_path, caches, temperature):
    terms = [LossTerm(SparseSoftTargetKLLoss(temperature), teacher="topk", name="sparse")]
    model = OfflineDistillation(MLP(hidden_sizes=[8]), loss_terms=terms)
    message = _refused(
        tmp_path, model, DigitsTransferSet(batch_size=32, teacher_cache=caches["topk"]),
        TeacherCacheError, "stores the top-3 log-probabilities at temperature 4",
    )  # fmt: skip
    assert f"loss term 'sparse' uses temperature {temperature:g}" in message
    assert "set the loss temperature to 4" in message and "rebuild the cache" in message


def test_a_dense_loss_on_a_topk_cache_names_the_sparse_loss(tmp_path, caches):
    model = OfflineDistillation(MLP(hidden_sizes=[8]))  # Hinton's terms read dense logits
    message = _refused(
        tmp_path, model, DigitsTransferSet(batch_size=32, teacher_cache=caches["topk"]),
        ValueError, "top-k cache",
    )  # fmt: skip
    assert "SparseSoftTargetKLLoss" in message and "teacher='topk'" in message


class ExtraAxis(nn.Module):
    """A teacher whose logits carry an extra axis: ``(B, 1, C)``."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.net, self.axis = MLP(hidden_sizes=[8]), axis

    def forward(self, x):
        return self.net(x).unsqueeze(self.axis)


@pytest.mark.parametrize("axis", [1, 0])
def test_teacher_logits_of_another_rank(tmp_path, axis):
    model = OfflineDistillation(MLP(hidden_sizes=[8]), FrozenTeacher(ExtraAxis(axis)))
    message = _refused(tmp_path, model, DigitsTransferSet(batch_size=32), ValueError, "same shape")
    assert "loss term 'kd'" in message and "(2, 10)" in message


def test_the_loss_itself_refuses_logits_of_another_rank():
    with pytest.raises(ValueError, match=r"squeeze"):
        SoftTargetKLLoss()(student=torch.randn(4, 10), teacher=torch.randn(4, 1, 10))


@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_evaluating_the_wrong_or_no_weights_is_refused(
    command, supervised_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    config = ["-c", str(DIGITS / "hinton_kd.yaml")]
    code, err = run_cli([command, *config, f"--ckpt_path={supervised_checkpoint}"], capsys)
    first = err.strip().splitlines()[0]
    assert code == 2 and "Supervised" in first and "OfflineDistillation" in first
    code, err = run_cli([command, *config], capsys)
    first = err.strip().splitlines()[0]
    assert code == 2 and "--ckpt_path" in first and "--untrained" in first


def test_a_study_run_with_a_cache_of_another_teacher_fails_before_any_run_trains(
    tmp_path, supervised_checkpoint
):
    L.seed_everything(1, verbose=False)  # teacher B: another network than the cache's
    other = trainer(tmp_path / "b", limit_train_batches=1, limit_val_batches=0)
    other.fit(Supervised(MLP(hidden_sizes=[8])), DigitsTransferSet(batch_size=32))
    teacher_b = tmp_path / "b.ckpt"
    other.save_checkpoint(teacher_b)
    teacher_a = tmp_path / "a.ckpt"
    shutil.copy(supervised_checkpoint, teacher_a)
    cache = {
        "class_path": "kd_lightning.data.TeacherCache",
        "init_args": {"path": str(tmp_path / "a.kdtc"), "teacher_checkpoint": str(teacher_a),
                      "progress": False},
    }  # fmt: skip
    tiny = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 1}
    runs = [
        {"name": "alone", "config": str(DIGITS / "student_alone.yaml"), "overrides": tiny},
        {
            "name": "kd_cached",
            "config": str(DIGITS / "hinton_kd.yaml"),
            "overrides": {
                **tiny,
                "model.init_args.teacher.init_args.checkpoint_path": str(teacher_b),
                "data.init_args.teacher_cache": cache,
            },
        },
    ]
    spec = {"name": "c", "seeds": [0], "output_dir": str(tmp_path / "out"), "runs": runs}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(PreflightError) as error:
        run_study(path, echo=False)
    message = str(error.value)
    assert "'kd_cached'" in message and "configure the teacher the cache was built from" in message
    assert not list((tmp_path / "out").rglob("result.json"))
