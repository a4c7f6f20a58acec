"""Teacher cache: provenance checks, and caches for any data module, DataLoaders or dict inputs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.data import DatasetTransferSet, DigitsTransferSet, TeacherCache, TeacherCacheError
from kd_lightning.data.cache_format import CacheProvenance
from kd_lightning.data.cache_reader import sample_keys
from kd_lightning.digest import file_digest, module_digest
from kd_lightning.functional.sparse_soft_target import topk_log_probs
from kd_lightning.losses.sparse_soft_target import SparseSoftTargetKLLoss
from kd_lightning.models import MLP
from kd_lightning.models.spec import model_spec
from kd_lightning.teachers import load_student


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(10, hidden_sizes=[16]).eval()


def _cache(path, **kwargs) -> TeacherCache:
    return TeacherCache(str(path), progress=False, dtype="float32", **kwargs)


# ------------------------------------------------------------------------------- provenance


def test_provenance_names_the_teacher_and_refuses_another(tmp_path):
    teacher = _teacher()
    cache = _cache(tmp_path / "c", teacher=teacher)
    cache.ensure(DigitsTransferSet())
    found = cache.provenance
    assert isinstance(found, CacheProvenance)
    assert (found.kind, found.temperature, found.topk, found.tail) == ("dense", None, None, None)
    assert found.teacher_module_digest == module_digest(teacher) == found.teacher_digest
    assert found.splits == ("train", "val", "test") and found.num_classes == 10
    found.check_teacher(teacher)
    found.check_teacher(
        MLP(10, hidden_sizes=[16]).load_state_dict(teacher.state_dict()) and teacher
    )
    found.check_temperature(2.0)  # dense logits suit any temperature
    other = _teacher(seed=1)
    with pytest.raises(TeacherCacheError) as error:
        found.check_teacher(other)
    message = str(error.value)
    assert module_digest(teacher) in message and module_digest(other) in message
    assert "rebuild the cache" in message


def test_checkpoint_provenance_has_file_and_network_digests(tmp_path):
    teacher = _teacher()
    state = {f"student.{k}": v for k, v in teacher.state_dict().items()}
    checkpoint = tmp_path / "t.ckpt"
    torch.save(
        {"state_dict": state, "kd_lightning": {"student_spec": model_spec(teacher)}}, checkpoint
    )
    cache = _cache(tmp_path / "c", teacher_checkpoint=str(checkpoint), splits=("val",))
    cache.ensure(DigitsTransferSet())
    found = cache.provenance
    assert found.teacher_digest == file_digest(checkpoint)
    assert found.teacher_module_digest == module_digest(load_student(checkpoint))
    found.check_teacher(teacher)  # the network the checkpoint holds is the same teacher


def test_topk_cache_at_t4_refuses_a_loss_at_t2(tmp_path):
    cache = _cache(tmp_path / "c", teacher=_teacher(), topk=3, splits=("val",))
    cache.ensure(DigitsTransferSet())
    found = cache.provenance
    assert (found.kind, found.topk, found.temperature, found.tail) == ("topk", 3, 4.0, "rest_mass")
    found.check_temperature(4.0)
    loss = SparseSoftTargetKLLoss(temperature=2.0)
    with pytest.raises(
        TeacherCacheError, match=r"at temperature 4, but the loss uses temperature 2"
    ):
        found.check_temperature(loss.temperature, where="the loss")
    # What the check prevents: the values read at T=2 are another distribution than stored.
    batch = DigitsTransferSet().dataset("val").__getitems__(list(range(4)))
    stored = cache.lookup(batch, "val")["teacher_topk_values"]
    at_2, _ = topk_log_probs(_teacher()(batch["input"]), 3, 2.0)
    assert not torch.allclose(stored, at_2, atol=1e-3)


# ------------------------------------------------------------------------ any data module


class TupleData(L.LightningDataModule):
    """A user's own data module: (x, y) tuples, shuffled training loader, no index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x, self.y = x, y

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:20], self.y[:20]), batch_size=8)


def test_cache_for_a_user_data_module_finds_shuffled_batches_by_content(tmp_path):
    x, y = DigitsTransferSet().raw_split("val")
    teacher = _teacher()
    data = TupleData(x, y)
    cache = _cache(tmp_path / "c", teacher=teacher, splits=("train", "val", "test"))
    cache.ensure(data)
    assert cache.provenance.splits == ("train", "val")  # the module has no test split
    assert cache.provenance.num_classes == 10  # learned from the teacher's output
    torch.manual_seed(3)
    seen = 0
    for batch in data.train_dataloader():
        cached = cache.lookup(batch, "train")["teacher_logits"]
        torch.testing.assert_close(cached, teacher(batch[0]), rtol=1e-5, atol=1e-5)
        seen += len(cached)
    assert seen == len(y)
    changed = (x[:4] + 0.5, y[:4])  # e.g. a random augmentation the build did not see
    with pytest.raises(TeacherCacheError, match="4 of 4 samples of this batch are not in"):
        cache.lookup(changed, "train")
    with pytest.raises(TeacherCacheError, match="has no 'test' split"):
        cache.lookup(changed, "test")
    # Another data set at the same path: detected, then rebuilt from the teacher.
    refusing = _cache(tmp_path / "c", teacher=teacher, on_mismatch="error")
    with pytest.raises(TeacherCacheError, match="data: the file has"):
        refusing.ensure(TupleData(x.flip(0), y.flip(0)))


class Bag(nn.Module):
    """A dict-input model: ``model(input_ids=..., attention_mask=...)`` -> ``{"logits": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return {"logits": self.head(pooled)}


def _padded(rows: list[list[int]], length: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_cache_for_dataloaders_of_dict_inputs_is_padding_independent(tmp_path):
    rows = [[i % 19 + 1] * (i % 4 + 1) for i in range(24)]
    encoded = _padded(rows, 4)
    items = [
        {
            "input_ids": encoded["input_ids"][i],
            "attention_mask": encoded["attention_mask"][i],
            "labels": i % 3,
        }
        for i in range(24)
    ]
    teacher = Bag().eval()
    cache = _cache(tmp_path / "c", teacher=teacher, splits=("train",))
    cache.ensure({"train": DataLoader(items, batch_size=5)})
    # The same samples padded to another length, in another order: same rows, same outputs.
    order = [7, 3, 22]
    batch = {**_padded([rows[i] for i in order], 6), "labels": torch.tensor([1, 0, 1])}
    cached = cache.lookup(batch, "train")["teacher_logits"]
    torch.testing.assert_close(cached, teacher(**_padded([rows[i] for i in order], 4))["logits"])
    keys = sample_keys(_padded([rows[i] for i in order], 4))
    assert (keys == sample_keys(_padded([rows[i] for i in order], 9))).all()
    assert len(set(sample_keys(encoded).tolist())) == len({tuple(r) for r in rows})


def test_dataset_transfer_set_batches_carry_the_cached_outputs(tmp_path):
    x, y = DigitsTransferSet().raw_split("train")
    teacher = _teacher()
    cache = _cache(tmp_path / "c", teacher=teacher, splits=("train",))
    data = DatasetTransferSet(
        train=TensorDataset(x[:100], y[:100]),
        num_classes=10,
        batch_size=16,
        omit_classes=[2],
        shuffle_seed=0,
    )
    data.teacher_cache = cache
    data.prepare_data()
    data.setup("fit")
    assert cache.provenance.splits == ("train",)
    assert len(data.dataset("train")) == int((y[:100] != 2).sum())
    for batch in data.train_dataloader():
        expected = teacher(x[batch["index"]])
        torch.testing.assert_close(batch["teacher_logits"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            cache.lookup(batch)["teacher_logits"], expected, rtol=1e-5, atol=1e-5
        )
