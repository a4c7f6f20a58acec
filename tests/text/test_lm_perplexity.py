"""Causal-LM evaluation: perplexity and accuracy score position t on the target at t + 1.

The example is worked by hand. Vocabulary 2, one block ``input_ids = [0, 1, 1]`` (labels the
same), fixed logits per position: ``[0, ln 3]`` (p(1) = 3/4), ``[ln 3, 0]`` (p(1) = 1/4),
``[0, ln 3]``. With the shift, positions 0 and 1 are scored on tokens 1 and 1: perplexity
``(3/4 * 1/4) ** -1/2 = 4 / sqrt(3)``, top-1 accuracy 1/2 (argmax 1, then 0). Without it the
three positions would be scored on 0, 1, 1.
A second, padded block ``[0, 0(pad), 0(pad)]`` with labels ``[0, -100, -100]`` adds no scored
token: after the shift its targets are both -100 (unshifted it adds token 0 at p = 1/4, so the
four scored tokens give ``(1/4 * 1/4 * 3/4 * 1/4) ** -1/4`` and accuracy 1/4).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torchmetrics.text import Perplexity

from kd_lightning.bench.evaluate import evaluate, next_token_targets
from kd_lightning.methods.metrics import align_tokens

LN3 = math.log(3.0)
LOGITS = torch.tensor([[0.0, LN3], [LN3, 0.0], [0.0, LN3]])  # (L=3, V=2)
SHIFTED = 4 / math.sqrt(3)
UNSHIFTED = (1 / 4 * 1 / 4 * 3 / 4 * 1 / 4) ** (-1 / 4)


class PositionLogits(nn.Module):
    """A causal 'LM' whose logits depend on the position only: ``(B, 3, 2)``."""

    def forward(self, input_ids, attention_mask=None):
        return LOGITS.expand(input_ids.shape[0], -1, -1)


def _batch() -> dict:
    ids = torch.tensor([[0, 1, 1], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    target = torch.tensor([[0, 1, 1], [0, -100, -100]])
    return {"input": {"input_ids": ids, "attention_mask": mask}, "target": target}


class Blocks(L.LightningDataModule):
    def test_dataloader(self):
        return [_batch()]

    def val_dataloader(self):
        return [_batch()]


def test_study_evaluation_scores_the_next_token():
    assert next_token_targets(_batch())
    result = evaluate(PositionLogits(), Blocks(), reference=None)
    assert result["test_perplexity"] == pytest.approx(SHIFTED, rel=1e-6)
    assert result["val_perplexity"] == pytest.approx(SHIFTED, rel=1e-6)
    assert result["test_acc"] == pytest.approx(1 / 2)
    unshifted = evaluate(PositionLogits(), Blocks(), reference=None, shift=False)
    assert unshifted["test_perplexity"] == pytest.approx(UNSHIFTED, rel=1e-6)
    assert unshifted["test_acc"] == pytest.approx(1 / 4)  # argmax 1, 0, 1, 1 vs 0, 1, 1, 0


def test_labels_other_than_the_inputs_are_not_shifted():
    batch = _batch()
    batch["target"] = torch.tensor([[1, 1, 0], [0, -100, -100]])  # e.g. token classes
    assert not next_token_targets(batch)


def test_training_metric_perplexity_is_shifted_the_same_way():
    batch = _batch()
    logits = LOGITS.expand(2, -1, -1)
    aligned, target = align_tokens(logits, batch["target"], batch, shift=True)
    metric = Perplexity(ignore_index=-100)
    metric.update(aligned, target)
    assert metric.compute().item() == pytest.approx(SHIFTED, rel=1e-5)


def test_lm_tokenizer_sees_the_training_documents_only(text_corpus, tmp_path, monkeypatch):
    from kd_lightning.data import CausalLMTransferSet
    from kd_lightning.data import text as text_module

    seen = []

    def record(texts, directory, *args, **kwargs):
        seen.extend(texts)
        raise RuntimeError("recorded")

    monkeypatch.setattr(text_module, "train_tokenizer", record)
    kwargs = dict(data_dir=str(text_corpus), val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(RuntimeError, match="recorded"):
        CausalLMTransferSet(tokenizer=str(tmp_path / "bpe"), train_vocab_size=300, **kwargs)
    split = text_module.split_documents(
        dict(texts=None, labels=None, text_files=None, drop_duplicates=True, **kwargs), 0
    )
    assert sorted(seen) == sorted(split["train"][0])
    held_out = set(split["val"][0]) | set(split["test"][0])
    assert held_out and not held_out & set(seen)
