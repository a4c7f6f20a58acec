"""ProgressiveDistillation: stages in one fit, frozen assistants, per-stage optimizers, resume."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from kd_lightning.cli import build_cli
from kd_lightning.data import DigitsTransferSet
from kd_lightning.losses import HardLabelCrossEntropy, SoftTargetKLLoss
from kd_lightning.methods.progressive import ProgressiveDistillation
from kd_lightning.models import MLP
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import PretrainedTeacher, load_student
from tests.conftest import fast_trainer


def _chain(ckpt, stage_epochs=(2, 3), assistant_classes=10):
    torch.manual_seed(1)
    return ProgressiveDistillation(
        MLP(hidden_sizes=[8]),
        PretrainedTeacher(str(ckpt)),
        assistants=[MLP(num_classes=assistant_classes, hidden_sizes=[32])],
        stage_epochs=list(stage_epochs),
    )


class Record(Callback):
    """The stage seen by every training batch, and the optimizer's parameters per epoch."""

    def __init__(self) -> None:
        self.stages: dict[int, set[int]] = {}
        self.optimised: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.stages.setdefault(trainer.current_epoch, set()).add(module.stage)
        params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.optimised[trainer.current_epoch] = params


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _trainer(**kwargs):
    return fast_trainer(max_epochs=5, limit_train_batches=4, limit_val_batches=1, **kwargs)


def _data():
    return DigitsTransferSet(batch_size=32, shuffle_seed=0)


def test_stages_switch_models_and_optimizers(mlp_teacher_checkpoint):
    module = _chain(mlp_teacher_checkpoint)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    record = Record()
    trainer = _trainer(callbacks=[record])
    trainer.fit(module, _data())
    assert record.stages == {0: {0}, 1: {0}, 2: {1}, 3: {1}, 4: {1}}
    assistant = {id(p) for p in module.assistants[0].parameters()}
    student = {id(p) for p in module.student.parameters()}
    assert record.optimised[0] == assistant and record.optimised[2] == student
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])
    metrics = trainer.callback_metrics
    assert {"val/acc_stage1", "val/acc_stage2", "val/acc", "val/agreement"} <= set(metrics)


@pytest.mark.filterwarnings(
    # the resumed trainer deliberately has no ModelCheckpoint: nothing is saved after the resume
    "ignore:Be aware that when using `ckpt_path`:UserWarning"
)
def test_resume_mid_stage_two_continues_stage_two_and_matches(mlp_teacher_checkpoint, tmp_path):
    # Uninterrupted run.
    full = _chain(mlp_teacher_checkpoint)
    _trainer().fit(full, _data())

    # The same run, stopped after epoch 2 (the first of stage 2's three epochs)...
    interrupted = _chain(mlp_teacher_checkpoint)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(callbacks=[StopAfter(2), checkpoint], enable_checkpointing=True).fit(
        interrupted, _data()
    )
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert saved["kd_lightning"]["stage"] == 1
    assert any(k.startswith("assistants.0.") for k in saved["state_dict"])
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assistant_at_stop = {k: v.clone() for k, v in interrupted.assistants[0].state_dict().items()}

    # ... and resumed in a new process-like setting: fresh modules, weights from the checkpoint.
    L.seed_everything(123, verbose=False)  # resume must not depend on the global RNG
    resumed = _chain(mlp_teacher_checkpoint)
    record = Record()
    _trainer(callbacks=[record]).fit(resumed, _data(), ckpt_path=checkpoint.last_model_path)
    assert record.stages == {3: {1}, 4: {1}}, "the resumed run must continue stage 2"
    for key, value in resumed.assistants[0].state_dict().items():
        assert torch.equal(value, assistant_at_stop[key]), "a finished assistant changed"
    for key, value in full.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key
    for key, value in full.assistants[0].state_dict().items():
        assert torch.equal(resumed.assistants[0].state_dict()[key], value), key


def test_export_is_the_final_student(mlp_teacher_checkpoint, tmp_path):
    module = _chain(mlp_teacher_checkpoint, stage_epochs=(1, 1))
    trainer = fast_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, _data())
    trainer.save_checkpoint(tmp_path / "takd.ckpt")
    x = torch.randn(3, 64)
    module.eval()
    assert torch.equal(load_student(tmp_path / "takd.ckpt")(x), module.student(x))


def test_bad_chains_fail_at_start_up(mlp_teacher_checkpoint):
    module = _chain(mlp_teacher_checkpoint, assistant_classes=7)
    with pytest.raises(ValueError, match=r"assistant0 \(assistants.0\) outputs 7 logits"):
        _trainer().fit(module, _data())
    with pytest.raises(
        ValueError, match=r"set trainer.max_epochs to 5 \(the sum of stage_epochs\)"
    ):
        fast_trainer(max_epochs=3).fit(_chain(mlp_teacher_checkpoint), _data())
    with pytest.raises(ValueError, match="stage_epochs must list 2 positive epoch counts"):
        _chain(mlp_teacher_checkpoint, stage_epochs=(2,))
    with pytest.raises(ValueError, match="stage_epochs is required"):
        ProgressiveDistillation(MLP(), None, assistants=[MLP()])


def _kl(p_logits, q_logits, t):
    p = F.softmax(p_logits / t, -1)
    return (p * (p.log() - F.log_softmax(q_logits / t, -1))).sum(-1).mean() * t * t


def test_each_stage_runs_its_trainee_and_its_frozen_teacher(mlp_teacher_checkpoint):
    torch.manual_seed(0)
    teacher = PretrainedTeacher(str(mlp_teacher_checkpoint))
    module = ProgressiveDistillation(
        MLP(hidden_sizes=[8]), teacher, assistants=[MLP(hidden_sizes=[16], dropout=0.5)],
        stage_epochs=[1, 1], temperature=2.0, alpha=0.75,
    )  # fmt: skip
    x, y = torch.randn(6, 64), torch.tensor([0, 1, 2, 3, -1, 5])
    batch = {"input": x, "target": y}
    module.train()
    knowledge = module.forward_knowledge(batch, "train")
    assert "student" not in knowledge  # training an assistant leaves the student untouched
    torch.testing.assert_close(knowledge["stage_teacher"], teacher(x))
    assert knowledge["trainee"] is knowledge["assistant0"] and knowledge["trainee"].requires_grad
    # The default objective by hand: 0.75 * T^2 KL(teacher || assistant) + 0.25 * CE.
    losses = module.compute_losses(knowledge, batch, "train")
    z, labeled = knowledge["trainee"], y >= 0
    torch.testing.assert_close(losses["kd"], _kl(knowledge["stage_teacher"], z, 2.0))
    torch.testing.assert_close(losses["ce"], F.cross_entropy(z[labeled], y[labeled]))
    torch.testing.assert_close(losses["loss"], 0.75 * losses["kd"] + 0.25 * losses["ce"])
    # Stage 2: the assistant teaches in eval mode (dropout off) and without gradients.
    module.set_stage(1)
    knowledge = module.forward_knowledge(batch, "train")
    assert module.assistants[0].training  # its own mode is restored after teaching
    module.assistants[0].eval()
    torch.testing.assert_close(knowledge["stage_teacher"], module.assistants[0](x))
    assert not knowledge["stage_teacher"].requires_grad
    assert knowledge["trainee"] is knowledge["student"] and "teacher" not in knowledge
    # Validation runs the exported student and the original teacher at every stage.
    module.set_stage(0)
    assert {"student", "teacher", "trainee", "stage_teacher"} <= set(
        module.forward_knowledge(batch, "val")
    )


def test_terms_see_the_progress_of_their_own_stage(mlp_teacher_checkpoint):
    module = _chain(mlp_teacher_checkpoint)
    seen = []

    class Progress(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                seen.append((module.progress.epoch, module.progress.max_epochs))

    _trainer(callbacks=[Progress()]).fit(module, _data())
    assert seen == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]


def test_arguments_are_never_silently_ignored(mlp_teacher_checkpoint):
    def chain(**kwargs):
        return ProgressiveDistillation(
            MLP(), None, assistants=[MLP()], stage_epochs=[2, 2], **kwargs
        )

    mine = [LossTerm(HardLabelCrossEntropy(), student="trainee")]
    with pytest.raises(ValueError, match="temperature and alpha only build the default objective"):
        chain(loss_terms=mine, alpha=0.5)
    with pytest.raises(ValueError, match=r"reads \['student', 'teacher'\].*`student: trainee`"):
        chain(loss_terms=[LossTerm(SoftTargetKLLoss())])
    with pytest.raises(ValueError, match="hooked layers are not supported"):
        chain(loss_terms=[LossTerm(SoftTargetKLLoss(), student="fc1", teacher="stage_teacher")])
    staged = [LossTerm(HardLabelCrossEntropy(), name="a", student="trainee", pretrain_epochs=2),
              LossTerm(SoftTargetKLLoss(), name="b", student="trainee", teacher="stage_teacher")]  # fmt: skip
    with pytest.raises(ValueError, match="pretrain_epochs=2.*never train the other terms"):
        chain(loss_terms=staged)
    module = _chain(mlp_teacher_checkpoint)
    module.teacher = None  # e.g. loaded for inference, then fitted without a teacher
    with pytest.raises(ValueError, match="first stage needs the original teacher"):
        _trainer().fit(module, _data())


def test_multi_process_strategies_that_cannot_rewrap_are_refused(mlp_teacher_checkpoint):
    module = _chain(mlp_teacher_checkpoint)
    module.trainer = SimpleNamespace(
        max_epochs=5, fast_dev_run=False, world_size=2, strategy=FSDPStrategy()
    )
    with pytest.raises(ValueError, match="FSDPStrategy sets up .* use strategy: ddp"):
        module.setup("fit")


class RankAgreement(Callback):
    """Rank 0 writes whether every rank ends with the same trained weights."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, module):
        flat = torch.cat(
            [p.detach().flatten() for p in module.parameters() if p.dtype.is_floating_point]
        )
        gathered = trainer.strategy.all_gather(flat)
        if trainer.is_global_zero:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            self.path.write_text(f"{same} {len(gathered)}")


@pytest.mark.slow
def test_ddp_ranks_train_the_same_models_in_every_stage(mlp_teacher_checkpoint, tmp_path):
    module = _chain(mlp_teacher_checkpoint, stage_epochs=(1, 1))
    trainer = fast_trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2,
        limit_train_batches=3, limit_val_batches=1, callbacks=[RankAgreement(tmp_path / "r")],
    )  # fmt: skip
    trainer.fit(module, _data())
    assert (tmp_path / "r").read_text() == "True 2"


class SoftCrossEntropy(nn.Module):
    """A user's loss, only in this file: H(softmax(teacher), softmax(student)), teacher detached."""

    uses_teacher = True

    def forward(self, *, student, teacher, target=None):
        p = teacher.detach().float().softmax(-1)
        return -(p * student.float().log_softmax(-1)).sum(-1).mean()


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_yaml_chain_trains_with_a_loss_defined_in_this_file(mlp_teacher_checkpoint, tmp_path):
    mlp = {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden_sizes": [8]}}
    term = {"class_path": "kd_lightning.objective.LossTerm", "init_args": {
        "loss": {"class_path": f"{SoftCrossEntropy.__module__}.SoftCrossEntropy"},
        "name": "soft", "student": "trainee", "teacher": "stage_teacher"}}  # fmt: skip
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "kd_lightning.methods.progressive.ProgressiveDistillation",
                  "init_args": {
            "student": mlp, "assistants": [mlp | {"init_args": {"hidden_sizes": [16]}}],
            "teacher": {"class_path": "kd_lightning.teachers.PretrainedTeacher",
                        "init_args": {"checkpoint_path": str(mlp_teacher_checkpoint)}},
            "stage_epochs": [1, 1], "loss_terms": [term]}},
        "data": {"class_path": "kd_lightning.data.DigitsTransferSet",
                 "init_args": {"batch_size": 16}},
    }  # fmt: skip
    (tmp_path / "takd.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["-c", str(tmp_path / "takd.yaml")], run=False)
    module = cli.model
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert module.stage == 1 and "train/loss_soft" in cli.trainer.callback_metrics
    for prefix, changed in (("assistants.0.", True), ("student.", True), ("teacher.", False)):
        keys = [k for k in before if k.startswith(prefix)]
        assert (
            keys
            and any(not torch.equal(before[k], module.state_dict()[k]) for k in keys) == changed
        )
    # In stage 2 the YAML term is H(assistant, student), read from the knowledge it names.
    x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
    module.eval()
    losses = module.compute_losses(
        module.forward_knowledge({"input": x, "target": y}, "val"), {}, "val"
    )
    z_s, z_a = module.student(x), module.assistants[0](x)
    torch.testing.assert_close(
        losses["soft"], -(z_a.softmax(-1) * z_s.log_softmax(-1)).sum(-1).mean()
    )
