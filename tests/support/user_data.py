"""A user's own data modules and a Hugging Face style model, written without kd_lightning.

Tests name them by ``class_path`` (``tests.support.user_data.TupleData``, ...) in YAML configs
and study files, the way a user names their own code. Both tasks are learnable in a few dozen
steps, so a distilled student measurably improves on chance.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

SPLITS = {"train": (256, 0), "val": (64, 1), "test": (64, 2)}
"""Split name -> (samples, generator seed)."""


def vector_split(split: str, features: int = 16, classes: int = 4):
    """``(x, y)`` of a split: ``x ~ N(0, 1)``, ``y = argmax(x[:, :classes])``."""
    n, seed = SPLITS[split]
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    return x, x[:, :classes].argmax(1)


def token_split(split: str, vocab_size: int = 32, length: int = 8, classes: int = 4):
    """``(input_ids, attention_mask, labels)`` of a split.

    Token ``1 + y`` (the class token) appears twice among noise tokens ``>= 1 + classes``;
    sequences have 4 to ``length`` real tokens. Padded positions hold a *wrong* class token, so
    a model that ignores ``attention_mask`` is misled.
    """
    n, seed = SPLITS[split]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    ids = torch.randint(1 + classes, vocab_size, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = ids[:, 1] = 1 + labels
    ids = ids[:, torch.randperm(length, generator=g)]  # class tokens may land in the padding...
    ids[:, 0] = 1 + labels  # ...so one stays inside every sequence (>= 4 real tokens)
    ids = torch.where(mask.bool(), ids, (1 + (labels[:, None] + 1) % classes).expand(-1, length))
    return ids, mask, labels


class TupleData(L.LightningDataModule):
    """Batches are ``(x, y)`` tuples; no ``num_classes``, nothing from the library."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def _dataset(self, split: str) -> Dataset:
        return TensorDataset(*vector_split(split))

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._dataset(split), batch_size=self.batch_size, shuffle=split == "train"
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class _TokenDicts(Dataset):
    def __init__(self, split: str) -> None:
        self.ids, self.mask, self.labels = token_split(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TokenData(TupleData):
    """Hugging Face style batches: ``{"input_ids", "attention_mask", "labels"}``."""

    def _dataset(self, split: str) -> Dataset:
        return _TokenDicts(split)


class BagOfTokensClassifier(nn.Module):
    """``model(input_ids=..., attention_mask=...)``: embedding, masked mean pool, linear.

    Args:
        vocab_size: number of token ids.
        dim: embedding width.
        num_classes: number of output logits.
    """

    def __init__(self, vocab_size: int = 32, dim: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        mask = attention_mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return {"logits": self.classifier(pooled)}
