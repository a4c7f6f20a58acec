"""Exact resume for every method: epoch 1 of 2 -> ``last.ckpt`` -> resume == 2 epochs straight.

Bitwise on the whole module state (every trained weight, BatchNorm statistics, EMA copies, CRD
memory banks, PS-KD's stored predictions, fake-quant observers). The cases draw random numbers
in their steps (dropout, CRD negatives from the global generator, CS-KD partners) or carry step
state (EMA with gradient accumulation, TAKD's stage switch at the resume point, PS-KD's past
predictions, QAT observers), which is what an inexact resume gets wrong. A study killed after
epoch 1 resumes from its ``last.ckpt`` to the table and final weights of an unbroken study.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning.bench import study as study_module
from kd_lightning.bench.study import run_study
from kd_lightning.callbacks import QuantizationAwareTraining
from kd_lightning.data import DigitsTransferSet
from kd_lightning.data.synthesised import SynthesisedTransferSet
from kd_lightning.losses import CRDLoss, SoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.methods.data_free import DataFreeDistillation
from kd_lightning.methods.offline import BornAgain
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.methods.progressive import ProgressiveDistillation
from kd_lightning.methods.self_distillation import (
    CSKD,
    PSKD,
    BranchSelfDistillation,
    MeanTeacherDistillation,
)
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.objective import LossTerm
from kd_lightning.synthesis import SynthesisedSet
from kd_lightning.teachers import PermutedTeacher, PretrainedTeacher, TeacherEnsemble

pytestmark = [
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

TRAIN_SAMPLES = 1257  # digits: 1797 - 180 validation - 360 test


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """An MLP(64-64-10) trained on a few batches: a teacher checkpoint in a second."""
    L.seed_everything(0, verbose=False)
    module = Supervised(MLP(hidden_sizes=[64]), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DigitsTransferSet(batch_size=64))
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def saved_set(teacher_ckpt, tmp_path_factory) -> str:
    """A synthesised transfer set on disk (random inputs with the teacher's logits)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(64, 1, 8, 8, generator=generator) * 16
    with torch.no_grad():
        logits = PretrainedTeacher(teacher_ckpt)(inputs)
    path = tmp_path_factory.mktemp("synthesised") / "set.kdts"
    SynthesisedSet(inputs, logits, logits.argmax(1), {"method": "test"}).save(path)
    return str(path)


@dataclass
class Run:
    module: L.LightningModule
    data: L.LightningDataModule = field(default_factory=lambda: DigitsTransferSet(batch_size=32))
    callbacks: list[Callback] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)


def _mlp(width: int = 16, dropout: float = 0.0) -> MLP:
    return MLP(hidden_sizes=[width], dropout=dropout)


def _crd_terms() -> list[LossTerm]:
    crd = CRDLoss(16, 64, n_data=TRAIN_SAMPLES, feat_dim=8, num_negatives=64)
    return [
        LossTerm(SoftTargetKLLoss(4.0), weight=0.9, name="kd"),
        LossTerm(crd, weight=0.8, student="hidden", teacher="hidden", name="crd"),
    ]


CASES: dict[str, Callable[[str, str], Run]] = {
    "supervised_dropout": lambda t, s: Run(Supervised(_mlp(dropout=0.5))),
    "supervised_dropout_two_workers": lambda t, s: Run(
        Supervised(_mlp(dropout=0.5)), data=DigitsTransferSet(batch_size=32, num_workers=2)
    ),
    "offline_crd": lambda t, s: Run(
        OfflineDistillation(_mlp(), PretrainedTeacher(t), loss_terms=_crd_terms())
    ),
    "offline_dropout_student": lambda t, s: Run(
        OfflineDistillation(_mlp(dropout=0.5), PretrainedTeacher(t))
    ),
    "multi_teacher": lambda t, s: Run(
        OfflineDistillation(
            _mlp(),
            TeacherEnsemble(
                [PretrainedTeacher(t), PermutedTeacher(t)],
                weighting="confidence",
                purify="both",
                purify_entropy=0.9,
            ),
        )
    ),  # fmt: skip
    "born_again": lambda t, s: Run(BornAgain(_mlp(64, dropout=0.3), PretrainedTeacher(t))),
    "dml": lambda t, s: Run(MutualDistillation([_mlp(dropout=0.3), _mlp(8)], temperature=2.0)),
    "takd_stage_switch_at_resume": lambda t, s: Run(
        ProgressiveDistillation(
            _mlp(8), PretrainedTeacher(t), assistants=[_mlp(32, dropout=0.3)], stage_epochs=[1, 1]
        )
    ),  # fmt: skip
    "byot": lambda t, s: Run(
        BranchSelfDistillation(SmallCNN(width=4), branches=["stage1"], feature_layer="pool")
    ),
    "mean_teacher_accumulation": lambda t, s: Run(
        MeanTeacherDistillation(_mlp(dropout=0.3), decay=0.9),
        trainer={"accumulate_grad_batches": 2, "limit_train_batches": 5},
    ),
    "pskd": lambda t, s: Run(PSKD(_mlp(dropout=0.3))),
    "cskd": lambda t, s: Run(CSKD(_mlp())),
    "qat_callback": lambda t, s: Run(
        Supervised(MLP(hidden_sizes=[8])),
        callbacks=[QuantizationAwareTraining(example_shape=[2, 64])],
    ),
    "data_free_saved_set": lambda t, s: Run(
        DataFreeDistillation(student=_mlp(dropout=0.3), num_samples=64),
        data=SynthesisedTransferSet(DigitsTransferSet(batch_size=32), path=s),
    ),
}


class StopAfterFirstEpoch(Callback):
    """Ends the run after epoch 1 of 2 (an interrupted run: the schedule still sees 2 epochs)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _fit(make: Callable[[], Run], root: Path, ckpt: Path | None = None, interrupt: bool = False):
    L.seed_everything(0, verbose=False)  # the same command again: same seed, same config
    run = make()
    stop = [StopAfterFirstEpoch()] if interrupt else []
    settings = dict(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True), *run.callbacks, *stop],
    )  # fmt: skip
    settings.update(run.trainer)
    L.Trainer(**settings).fit(run.module, run.data, ckpt_path=ckpt)
    return run.module


def _differences(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    theirs = b.state_dict()
    assert set(theirs) == set(a.state_dict())
    return [k for k, v in a.state_dict().items() if not torch.equal(v, theirs[k])]


@pytest.mark.parametrize("name", list(CASES))
def test_resume_after_one_epoch_is_bitwise_the_unbroken_run(
    name, teacher_ckpt, saved_set, tmp_path
):
    make = lambda: CASES[name](teacher_ckpt, saved_set)  # noqa: E731
    straight = _fit(make, tmp_path / "straight")
    first = _fit(make, tmp_path / "split", interrupt=True)
    resumed = _fit(make, tmp_path / "split", ckpt=tmp_path / "split" / "last.ckpt")
    assert _differences(straight, resumed) == []
    # The second epoch trained (the comparison is not between two copies of epoch 1).
    assert _differences(first, straight) != []


# ----------------------------------------------------------------------- a study killed mid-run
STUDY_CONFIG = {
    "seed_everything": 3,
    "trainer": {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 2,
                "logger": False, "enable_checkpointing": False},
    "model": {
        "class_path": "kd_lightning.methods.Supervised",
        "init_args": {"model": {"class_path": "kd_lightning.models.MLP",
                                "init_args": {"hidden_sizes": [16], "dropout": 0.5}}},
    },
    "data": {"class_path": "kd_lightning.data.DigitsTransferSet",
             "init_args": {"batch_size": 32}},
}  # fmt: skip


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way handles it."""


def _study(tmp_path: Path, out: str) -> Path:
    config = tmp_path / "dropout.yaml"
    config.write_text(yaml.safe_dump(STUDY_CONFIG))
    spec = {"name": "resume", "seeds": [0], "output_dir": str(tmp_path / out),
            "runs": [{"name": "dropout", "config": str(config)}]}  # fmt: skip
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_study_killed_mid_run_resumes_to_the_unbroken_table_and_weights(tmp_path, monkeypatch):
    class KillInEpochTwo(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                raise _Killed  # mid-epoch 2: `last.ckpt` holds epoch 1

    real_execute = study_module.execute_run

    def killed_execute(config, run_dir, callbacks=(), *args, **kwargs):
        return real_execute(config, run_dir, [*callbacks, KillInEpochTwo()], *args, **kwargs)

    killed = _study(tmp_path, "killed")
    monkeypatch.setattr(study_module, "execute_run", killed_execute)
    with pytest.raises(_Killed):
        run_study(killed, echo=False)
    monkeypatch.undo()
    run_dir = next((tmp_path / "killed" / "runs" / "dropout").rglob("seed0"))
    assert (run_dir / "last.ckpt").is_file() and not (run_dir / "result.json").exists()

    resumed = run_study(killed, echo=False)
    unbroken = run_study(_study(tmp_path, "unbroken"), echo=False)
    assert resumed[0]["resumed"] and not unbroken[0]["resumed"]
    timing = {"seconds", "seconds_per_run", "resumed", "checkpoint", "latency_ms"}
    for got, expected in zip(resumed.rows, unbroken.rows, strict=True):
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in expected.items() if k not in timing
        }
    same = ("test_acc", "test_acc_best_val", "best_epoch", "val_acc_curve", "epochs")
    assert {k: resumed[0][k] for k in same} == {k: unbroken[0][k] for k in same}
    weights = [torch.load(Path(r["checkpoint"]), weights_only=True)["state_dict"]
               for r in (resumed[0], unbroken[0])]  # fmt: skip
    assert [k for k, v in weights[0].items() if not torch.equal(v, weights[1][k])] == []
    assert json.loads((run_dir / "result.json").read_text())["resumed"] is True
