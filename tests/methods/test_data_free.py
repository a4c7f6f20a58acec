"""DataFreeDistillation: trains on synthesised inputs only, evaluates on real data, saves/reuses sets."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from kd_lightning.data import DigitsTransferSet
from kd_lightning.data.synthesised import SynthesisedTransferSet
from kd_lightning.methods import OfflineDistillation
from kd_lightning.methods.data_free import DataFreeDistillation
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.synthesis import DataImpressions, DeepInversion, SynthesisedSet, module_digest
from kd_lightning.teachers import PretrainedTeacher
from tests.conftest import fast_trainer


class SpyDigits(DigitsTransferSet):
    """Digits that records which splits were read."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.splits_read: list[str] = []

    def load_split(self, split):
        self.splits_read.append(split)
        return super().load_split(split)


class RecordBatches(L.Callback):
    def __init__(self):
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch["input"].detach().clone())


def _method(teacher_checkpoint, synthesiser=None, **kwargs):
    synthesiser = synthesiser or DeepInversion(batch_size=32, steps=3, seed=0)
    return DataFreeDistillation(
        student=SmallCNN(width=4),
        teacher=PretrainedTeacher(str(teacher_checkpoint)),
        synthesiser=synthesiser,
        num_samples=kwargs.pop("num_samples", 64),
        **kwargs,
    )


@pytest.mark.parametrize("synthesiser", [DeepInversion, DataImpressions])
def test_training_never_touches_a_real_training_sample(teacher_checkpoint, synthesiser):
    L.seed_everything(0)
    evaluation = SpyDigits(batch_size=64)
    data = SynthesisedTransferSet(evaluation)
    method = _method(teacher_checkpoint, synthesiser(batch_size=32, steps=3, seed=0))
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    recorder = RecordBatches()
    trainer = fast_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(method, data)
    trainer.test(method, data, verbose=False)

    # The real training split is never read, by the data module or by anyone else.
    assert "train" not in evaluation.splits_read
    assert set(evaluation.splits_read) == {"val", "test"}
    # Every training batch is a row of the synthesised set, and none is a real training image.
    seen = torch.cat(recorder.inputs)
    assert len(seen) == 64
    assert torch.equal(seen.sort(dim=0).values, data.synthesised.inputs.sort(dim=0).values)
    real_train = DigitsTransferSet().raw_split("train")[0]
    distances = torch.cdist(seen.flatten(1), real_train.flatten(1))
    assert distances.min() > 1e-3
    # Evaluation is on the real test split (360 digits), with teacher agreement.
    assert "test/acc" in trainer.callback_metrics and "test/agreement" in trainer.callback_metrics
    assert len(data.dataset("test")) == 360
    assert torch.equal(data.dataset("test").inputs, DigitsTransferSet().raw_split("test")[0])
    # The teacher did not change (no weight, no BatchNorm statistic).
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_the_loss_is_the_soft_target_kl_to_the_recorded_teacher_logits(teacher_checkpoint):
    method = _method(teacher_checkpoint, temperature=3.0, hard_label_weight=0.5)
    student = torch.randn(5, 10)
    teacher = torch.randn(5, 10)
    losses = method.compute_losses({"student": student, "teacher": teacher}, {}, "train")
    p = torch.softmax(teacher / 3, 1)
    kl = (p * (p.log() - torch.log_softmax(student / 3, 1))).sum(1).mean() * 9
    ce = torch.nn.functional.cross_entropy(student, teacher.argmax(1))
    assert losses["kd"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(kl.item() + 0.5 * ce.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*val_dataloader.*")
def test_real_training_data_is_refused(teacher_checkpoint):
    with pytest.raises(ValueError, match="SynthesisedTransferSet"):
        fast_trainer(max_steps=1).fit(_method(teacher_checkpoint), DigitsTransferSet())
    loader = DigitsTransferSet().train_dataloader()
    with pytest.raises(ValueError, match="got dataloaders"):
        fast_trainer(max_steps=1).fit(_method(teacher_checkpoint), train_dataloaders=loader)


def test_saved_set_is_reused_without_teacher_or_synthesiser(teacher_checkpoint, tmp_path):
    path = tmp_path / "synthesised.pt"
    L.seed_everything(0)
    fast_trainer(max_steps=2, max_epochs=2).fit(
        _method(teacher_checkpoint), SynthesisedTransferSet(DigitsTransferSet(), path=str(path))
    )
    saved = SynthesisedSet.load(path)
    assert len(saved) == 64 and saved.metadata["method"] == "deep_inversion"
    teacher = PretrainedTeacher(str(teacher_checkpoint))
    assert saved.teacher_digest == module_digest(teacher)
    with torch.no_grad():  # recorded logits are the teacher's on the recorded inputs
        assert torch.allclose(saved.teacher_logits, teacher(saved.inputs), atol=1e-5)

    # The same method with no teacher and no synthesiser trains from the file's logits ...
    reuse = DataFreeDistillation(student=MLP(hidden_sizes=[8]), num_samples=64)
    data = SynthesisedTransferSet(DigitsTransferSet(), path=str(path))
    trainer = fast_trainer(max_steps=2, max_epochs=2)
    trainer.fit(reuse, data)
    assert trainer.global_step == 2 and torch.equal(data.synthesised.inputs, saved.inputs)
    # ... and so does OfflineDistillation: the set is an ordinary transfer set whose training
    # batches carry cached teacher logits (its teacher only runs on the real val split).
    offline = OfflineDistillation(student=MLP(hidden_sizes=[8]), teacher=teacher)
    trainer = fast_trainer(max_steps=2, max_epochs=2)
    trainer.fit(offline, SynthesisedTransferSet(DigitsTransferSet(), path=str(path)))
    assert trainer.global_step == 2 and "val/agreement" in trainer.callback_metrics


def test_a_set_made_by_another_teacher_is_refused(teacher_checkpoint, tmp_path):
    path = tmp_path / "synthesised.pt"
    made = DeepInversion(batch_size=8, steps=1, seed=0).synthesise(
        SmallCNN(width=4).eval(), num_samples=8, num_classes=10, input_shape=(1, 8, 8)
    )
    made.save(path)
    with pytest.raises(ValueError, match="different teacher"):
        fast_trainer(max_steps=1).fit(
            _method(teacher_checkpoint), SynthesisedTransferSet(DigitsTransferSet(), path=str(path))
        )


def test_fast_dev_run_makes_a_tiny_set_and_saves_nothing(teacher_checkpoint, tmp_path):
    path = tmp_path / "synthesised.pt"
    synthesiser = DeepInversion(batch_size=16, steps=500, seed=0)
    data = SynthesisedTransferSet(DigitsTransferSet(), path=str(path))
    fast_trainer(fast_dev_run=1).fit(
        _method(teacher_checkpoint, synthesiser, num_samples=4096), data
    )
    assert len(data.synthesised) == 16
    assert data.synthesised.metadata["settings"]["steps"] == 2
    assert not path.exists()


def test_missing_synthesiser_and_file_is_a_start_up_error(teacher_checkpoint, tmp_path):
    method = DataFreeDistillation(student=SmallCNN(width=4), teacher=None)
    with pytest.raises(ValueError, match="no teacher and synthesiser"):
        fast_trainer(max_steps=1).fit(method, SynthesisedTransferSet(DigitsTransferSet()))
    data = SynthesisedTransferSet(DigitsTransferSet(), path=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="no teacher and synthesiser"):
        fast_trainer(max_steps=1).fit(method, data)


def test_validate_only_needs_no_synthesised_set(teacher_checkpoint):
    method = _method(teacher_checkpoint)
    results = fast_trainer().validate(
        method, SynthesisedTransferSet(DigitsTransferSet()), verbose=False
    )
    assert "val/acc" in results[0]


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_cli_config_checkpoint_reloads_with_its_synthesiser(teacher_checkpoint, tmp_path):
    from pathlib import Path

    import yaml

    from kd_lightning.cli import build_cli
    from kd_lightning.teachers import load_student

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "experiments/digits/data_free_deepinversion.yaml").read_text())
    init = config["model"]["init_args"]
    init["teacher"]["init_args"]["checkpoint_path"] = str(teacher_checkpoint)
    init["num_samples"] = 16
    init["synthesiser"]["init_args"].update(steps=1, batch_size=16)
    config["trainer"] = {
        "max_steps": 1,
        "logger": False,
        "enable_progress_bar": False,
        "default_root_dir": str(tmp_path),
        "enable_checkpointing": False,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["-c", str(tmp_path / "c.yaml")], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DataFreeDistillation.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.teacher is None and isinstance(loaded.synthesiser, DeepInversion)
    assert loaded.synthesiser.steps == 1
    student = load_student(tmp_path / "m.ckpt")
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(student(x), cli.model.student.eval()(x))
