"""Teacher and student of different vocabulary sizes: refused at start-up naming both sizes,
unless the token loss crops to the shared range; then training and the metrics run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning.losses import TokenCrossEntropyLoss, TokenDistillationLoss
from kd_lightning.methods import OfflineDistillation
from kd_lightning.methods.metrics import align_tokens
from kd_lightning.models import HFModel
from kd_lightning.objective import LossTerm
from tests.conftest import fast_trainer
from tests.text.conftest import tiny_gpt2_config

IDS = torch.tensor([[6, 7, 8, 9, 5, 10, 11, 12], [13, 14, 5, 15, 16, 17, 18, 19]])
BATCH = {"input": {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}, "target": IDS}


def _method(crop_vocab: bool) -> OfflineDistillation:
    torch.manual_seed(0)
    student = HFModel(model_type="gpt2", config=tiny_gpt2_config(40, layers=1, width=16))
    teacher = HFModel(model_type="gpt2", config=tiny_gpt2_config(48, layers=1, width=32))
    terms = [
        LossTerm(TokenDistillationLoss(crop_vocab=crop_vocab), name="kd"),
        LossTerm(TokenCrossEntropyLoss(), name="ce"),
    ]
    return OfflineDistillation(student, teacher, loss_terms=terms, num_classes=40)


def test_vocabulary_mismatch_fails_at_start_up_naming_both_sizes():
    method = _method(crop_vocab=False)
    with pytest.raises(
        ValueError, match=r"teacher's vocabulary.*40 != teacher vocabulary size 48.*crop_vocab=True"
    ):
        method.check_example(BATCH)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_crop_vocab_trains_and_scores_the_shared_range():
    method = _method(crop_vocab=True)
    method.check_example(BATCH)
    before = method.student.transformer.h[0].mlp.c_fc.weight.detach().clone()
    trainer = fast_trainer(max_steps=2)
    trainer.fit(method, DataLoader([BATCH], batch_size=None))
    assert not torch.equal(before, method.student.transformer.h[0].mlp.c_fc.weight)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_kd"]) and torch.isfinite(metrics["train/kl"])
    assert "train/perplexity" in metrics


def test_metrics_pair_position_t_with_target_t_plus_1_and_drop_padding():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    target = torch.tensor([[1, 2, 0, 1], [2, 2, 1, 0]])
    batch = {"input": {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}}
    aligned, shifted = align_tokens(logits, target, batch, shift=True)
    assert torch.equal(aligned, logits[:, :3])
    assert shifted.tolist() == [[2, 0, 1], [2, -100, -100]]  # padded positions are ignored
    same, unshifted = align_tokens(logits, target, batch, shift=False)
    assert torch.equal(same, logits) and unshifted.tolist() == [[1, 2, 0, 1], [2, 2, -100, -100]]
