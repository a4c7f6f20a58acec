"""Runs built in Python reload: ``OfflineDistillation.load_from_checkpoint(path)`` alone.

Loss terms, every loss of :mod:`kd_lightning.losses`, connectors and schedules record their
init arguments, so a checkpoint of a run built in Python rebuilds its own objective, and
state-carrying parts (CRD memory banks, VID variances, connector weights, fake-quant observers)
load strictly. The catalogue below must name every loss class of the package: a new loss is
tested the moment it exists.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import kd_lightning.losses as losses_package
from kd_lightning.callbacks import QuantizationAwareTraining
from kd_lightning.connectors import Conv1x1Connector, LinearConnector
from kd_lightning.data import DigitsTransferSet
from kd_lightning.losses import (
    CRDLoss,
    FitNetsHintLoss,
    HardLabelCrossEntropy,
    SoftTargetKLLoss,
    VIDLoss,
    contrastive,
    feature,
    pseudo_label,
    relation,
    response,
    self_knowledge,
    soft_target,
    sparse_soft_target,
    token,
    token_sparse,
    transformer,
)
from kd_lightning.methods import OfflineDistillation
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.objective import LinearRamp, LinearWarmup, LossTerm, StartAt
from kd_lightning.teachers import load_student

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

# name -> (loss with non-default settings, LossTerm keyword arguments)
Entry = tuple[Callable[[], nn.Module], dict[str, Any]]
HIDDEN = {"student": "hidden", "teacher": "hidden"}
CATALOGUE: dict[str, Entry] = {
    "CRDLoss": (lambda: contrastive.CRDLoss(16, 32, n_data=40, feat_dim=4, num_negatives=7,
                                            nce_t=0.1, momentum=0.7), HIDDEN),
    "FitNetsHintLoss": (feature.FitNetsHintLoss,
                        {**HIDDEN, "connector": LinearConnector(16, 32), "pretrain_epochs": 1}),
    "AttentionTransferLoss": (lambda: feature.AttentionTransferLoss(p=3.0), HIDDEN),
    "NSTLoss": (feature.NSTLoss, HIDDEN),
    "FSPLoss": (feature.FSPLoss, {"student": ["hidden", "classifier"],
                                  "teacher": ["hidden", "classifier"]}),
    "VIDLoss": (lambda: feature.VIDLoss(16, 32, hidden_channels=8, init_variance=2.0), HIDDEN),
    "TeacherTopOneCrossEntropy": (pseudo_label.TeacherTopOneCrossEntropy, {}),
    "RKDLoss": (lambda: relation.RKDLoss(distance_weight=2.0, angle_weight=3.0), HIDDEN),
    "SimilarityPreservingLoss": (relation.SimilarityPreservingLoss, HIDDEN),
    "CorrelationCongruenceLoss": (
        lambda: relation.CorrelationCongruenceLoss(kernel="bilinear", gamma=0.3), HIDDEN),
    "PKTLoss": (lambda: relation.PKTLoss(eps=1e-6, form="authors_code"), HIDDEN),
    "DKDLoss": (lambda: response.DKDLoss(alpha=0.5, beta=2.0, temperature=3.0),
                {"warmup_epochs": 5}),
    "LogitStandardizationKDLoss": (
        lambda: response.LogitStandardizationKDLoss(temperature=3.0, unbiased=False), {}),
    "DISTLoss": (lambda: response.DISTLoss(beta=2.0, gamma=0.5, temperature=2.0), {}),
    "BranchHintLoss": (self_knowledge.BranchHintLoss, HIDDEN),
    "ConsistencyMSELoss": (self_knowledge.ConsistencyMSELoss, {"schedule": LinearRamp(0, 2)}),
    "PSKDLoss": (lambda: self_knowledge.PSKDLoss(0.6, schedule=LinearRamp(0.1, 0.6)), {}),
    "CSKDLoss": (lambda: self_knowledge.CSKDLoss(3.0), {"schedule": StartAt(2)}),
    "SoftTargetKLLoss": (lambda: soft_target.SoftTargetKLLoss(3.0, scale_by_t2=False), {}),
    "HardLabelCrossEntropy": (soft_target.HardLabelCrossEntropy, {"weight": 0.25}),
    "LogitMatchingMSELoss": (soft_target.LogitMatchingMSELoss, {}),
    "SparseSoftTargetKLLoss": (lambda: sparse_soft_target.SparseSoftTargetKLLoss(2.0),
                               {"teacher": "topk"}),
    "TokenDistillationLoss": (lambda: token.TokenDistillationLoss(
        objective="jsd", beta=0.3, temperature=2.0, reduction="sequence", chunk_size=4), {}),
    "TokenForwardKLLoss": (lambda: token.TokenForwardKLLoss(temperature=2.0, shift=False), {}),
    "TokenReverseKLLoss": (lambda: token.TokenReverseKLLoss(ignore_index=-7), {}),
    "TokenGeneralizedJSDLoss": (lambda: token.TokenGeneralizedJSDLoss(beta=0.2), {}),
    "TokenTotalVariationLoss": (lambda: token.TokenTotalVariationLoss(crop_vocab=True), {}),
    "FusedLinearTokenDistillationLoss": (
        lambda: token.FusedLinearTokenDistillationLoss(objective="reverse_kl", chunk_size=3), {}),
    "SparseTokenDistillationLoss": (lambda: token_sparse.SparseTokenDistillationLoss(
        objective="reverse_kl", temperature=2.0, topk=3, shift=False), {"teacher": "topk"}),
    "HiddenStateMSELoss": (lambda: transformer.HiddenStateMSELoss(16, 32), HIDDEN),
    "HiddenStateCosineLoss": (transformer.HiddenStateCosineLoss, HIDDEN),
    "AttentionMapLoss": (lambda: transformer.AttentionMapLoss("kl"), HIDDEN),
    "TokenCrossEntropyLoss": (
        lambda: transformer.TokenCrossEntropyLoss(shift=False, reduction="sequence"), {}),
}  # fmt: skip


def _loss_classes() -> set[str]:
    """Every public loss class defined in a module of kd_lightning.losses."""
    names = set()
    for info in pkgutil.iter_modules(losses_package.__path__):
        module = importlib.import_module(f"{losses_package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, nn.Module)
                    and value.__module__ == module.__name__ and not name.startswith("_")):  # fmt: skip
                names.add(name)
    return names


def test_the_catalogue_names_every_loss_of_the_package():
    assert _loss_classes() == set(CATALOGUE)


def _settings(module: nn.Module) -> dict[str, Any]:
    """A module's plain public settings (temperature, weights, sources, ...): not its specs."""
    kinds = (bool, int, float, str, type(None), list, tuple)
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k != "training" and isinstance(v, kinds)
    }


def _save(module: OfflineDistillation, path) -> None:
    """What ``Trainer.save_checkpoint`` writes for a LightningModule, without a fit."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_a_python_built_objective_of_every_loss_reloads_with_its_settings_and_state(name, tmp_path):
    make, term_args = CATALOGUE[name]
    torch.manual_seed(0)
    terms = [LossTerm(make(), name="term", **term_args), LossTerm(HardLabelCrossEntropy())]
    module = OfflineDistillation(MLP(hidden_sizes=[16]), None, loss_terms=terms)
    with torch.no_grad():  # every floating tensor moves off its initial value
        for value in module.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value))
    _save(module, tmp_path / "run.ckpt")

    torch.manual_seed(1)  # a fresh build would draw other initial values
    reloaded = OfflineDistillation.load_from_checkpoint(tmp_path / "run.ckpt")

    theirs = reloaded.state_dict()
    assert theirs.keys() == module.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items())
    for ours, got in zip(module.objective, reloaded.objective, strict=True):
        assert type(got.loss) is type(ours.loss)
        assert _settings(got) == _settings(ours) and _settings(got.loss) == _settings(ours.loss)
        assert repr(got.schedule) == repr(ours.schedule)
        assert type(got.connector) is type(ours.connector)


# ------------------------------------------------------------------- trained runs, then reloaded
def _fit(module: L.LightningModule, callbacks=(), path=None) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
    trainer.fit(module, DigitsTransferSet(batch_size=32))
    trainer.save_checkpoint(path)


def _cnn_terms(kind: str) -> list[LossTerm]:
    kd = LossTerm(SoftTargetKLLoss(2.0), weight=0.5, name="kd", schedule=LinearWarmup(3))
    stage = {"student": "stage2", "teacher": "stage2"}
    extra = {
        "connector": LossTerm(FitNetsHintLoss(), connector=Conv1x1Connector(8, 16), **stage),
        "vid": LossTerm(VIDLoss(8, 16, init_variance=3.0), **stage),
        "crd": LossTerm(
            CRDLoss(8, 16, n_data=1257, feat_dim=4, num_negatives=32),
            student="pool",
            teacher="pool",
        ),  # fmt: skip
    }[kind]
    return [kd, extra]


@pytest.mark.parametrize("kind", ["connector", "vid", "crd", "qat"])
def test_a_trained_python_built_run_reloads_from_its_checkpoint_alone(kind, tmp_path):
    L.seed_everything(0, verbose=False)
    if kind == "qat":
        student, teacher = MLP(hidden_sizes=[16]), MLP(hidden_sizes=[32])
        terms = [
            LossTerm(SoftTargetKLLoss(3.0), name="kd"),
            LossTerm(soft_target.LogitMatchingMSELoss(), name="mse"),
        ]
        callbacks = [QuantizationAwareTraining(example_shape=[2, 64])]
    else:
        student, teacher, terms = SmallCNN(width=4), SmallCNN(width=8), _cnn_terms(kind)
        callbacks = []
    module = OfflineDistillation(student, teacher, loss_terms=terms)
    _fit(module, callbacks, tmp_path / "run.ckpt")

    reloaded = OfflineDistillation.load_from_checkpoint(tmp_path / "run.ckpt")
    trained = {k: v for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    theirs = reloaded.state_dict()
    assert theirs.keys() == trained.keys()  # strict: memory banks, variances, observers
    assert [k for k, v in trained.items() if not torch.equal(v, theirs[k])] == []
    batch = next(iter(DigitsTransferSet(batch_size=16).val_dataloader()))
    with torch.no_grad():
        expected = module.eval()(batch["input"])
        assert torch.equal(reloaded(batch["input"]), expected)
        assert torch.equal(load_student(tmp_path / "run.ckpt")(batch["input"]), expected)
    # The same objective, evaluated on the same knowledge (the teacher passed back in).
    with_teacher = OfflineDistillation.load_from_checkpoint(tmp_path / "run.ckpt", teacher=teacher)
    knowledge = module.forward_knowledge(batch, "val")
    torch.manual_seed(5)
    ours = module.compute_losses(knowledge, batch, "val")
    torch.manual_seed(5)  # CRD draws its negatives
    got = with_teacher.compute_losses(knowledge, batch, "val")
    terms = [t.name for t in module.objective]  # (the total's warm-up factor follows the epoch)
    assert [got[t].item() for t in terms] == [ours[t].item() for t in terms]


class OwnLoss(nn.Module):
    """A user's loss that records nothing (not decorated with ``records_init_args``)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, *, student, teacher, target=None):
        return self.scale * (student - teacher).pow(2).mean()


def test_an_unrecordable_loss_is_named_and_can_be_passed_back(tmp_path):
    terms = [LossTerm(OwnLoss(2.0), name="own"), LossTerm(HardLabelCrossEntropy(), name="ce")]
    module = OfflineDistillation(MLP(hidden_sizes=[8]), None, loss_terms=terms)
    _save(module, tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match="loss_terms.*OwnLoss.*records_init_args"):
        OfflineDistillation.load_from_checkpoint(tmp_path / "run.ckpt")
    again = [LossTerm(OwnLoss(2.0), name="own"), LossTerm(HardLabelCrossEntropy(), name="ce")]
    reloaded = OfflineDistillation.load_from_checkpoint(tmp_path / "run.ckpt", loss_terms=again)
    assert [t.name for t in reloaded.objective] == ["own", "ce"]


def test_default_objectives_are_rebuilt_from_the_hyperparameters(tmp_path):
    # DML refuses `temperature` next to `loss_terms`: defaults must not be recorded as terms.
    module = MutualDistillation([MLP(hidden_sizes=[8]), MLP(hidden_sizes=[4])], temperature=3.0)
    _save(module, tmp_path / "dml.ckpt")
    reloaded = MutualDistillation.load_from_checkpoint(tmp_path / "dml.ckpt")
    assert [_settings(t.loss) for t in reloaded.objective] == [
        _settings(t.loss) for t in module.objective
    ]
    assert {t.loss.temperature for t in reloaded.objective if hasattr(t.loss, "temperature")} == {
        3.0
    }
