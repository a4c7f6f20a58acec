"""Teacher-output cache: same student as the live teacher, exact views, integrity, atomic writes, DDP."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from kd_lightning.data.digits import DigitsTransferSet
from kd_lightning.data.synthetic import SyntheticTransferSet
from kd_lightning.data.teacher_cache import (
    PREAMBLE_SIZE,
    TRAILER,
    InvalidCacheFile,
    TeacherCache,
    TeacherCacheError,
    read_header,
)
from kd_lightning.functional.sparse_soft_target import sparse_soft_target_kl, topk_log_probs
from kd_lightning.losses import HardLabelCrossEntropy
from kd_lightning.losses.sparse_soft_target import SparseSoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import MLP
from kd_lightning.models.spec import model_spec
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import PretrainedTeacher, load_student


def trainer(**kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    return L.Trainer(**{**options, **kwargs})


def save_teacher(model: nn.Module, path: Path) -> Path:
    """A checkpoint in kd_lightning's format (student weights + spec), without training."""
    state = {f"student.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "kd_lightning": {"student_spec": model_spec(model)}}, path)
    return path


@pytest.fixture
def mlp_teacher(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_teacher(MLP(10, hidden_sizes=[32]), tmp_path / "teacher.ckpt")


def digits_with_cache(path: Path, checkpoint, **cache_kwargs) -> DigitsTransferSet:
    cache = TeacherCache(
        str(path), teacher_checkpoint=checkpoint and str(checkpoint), progress=False, **cache_kwargs
    )
    return DigitsTransferSet(batch_size=64, shuffle_seed=0, teacher_cache=cache)


def cached_logits(dm: DigitsTransferSet) -> torch.Tensor:
    dataset = dm.dataset("train")
    return dataset.__getitems__(list(range(len(dataset))))["teacher_logits"]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------- same student, exact views


def test_training_from_cache_gives_the_student_of_the_live_teacher(teacher_checkpoint, tmp_path):
    """Same seed, deterministic transforms, float32 cache: the two students agree numerically."""

    def run(cached: bool) -> tuple[dict, dict]:
        L.seed_everything(0)
        student = MLP(10, hidden_sizes=[16])
        if cached:
            dm = digits_with_cache(tmp_path / "digits.cache", teacher_checkpoint, dtype="float32")
            module = OfflineDistillation(student, teacher=None)
        else:
            dm = DigitsTransferSet(batch_size=64, shuffle_seed=0)
            module = OfflineDistillation(student, PretrainedTeacher(str(teacher_checkpoint)))
        fit = trainer(max_epochs=3)
        fit.fit(module, dm)
        return module.student.state_dict(), {k: float(v) for k, v in fit.callback_metrics.items()}

    live_weights, live_metrics = run(cached=False)
    cached_weights, cached_metrics = run(cached=True)
    L.seed_everything(0)
    initial = MLP(10, hidden_sizes=[16]).state_dict()
    for name, value in live_weights.items():
        assert not torch.equal(value, initial[name])  # training moved the student
        torch.testing.assert_close(cached_weights[name], value, rtol=1e-4, atol=1e-5)
    # Validation's teacher metrics come from the cached val split, identical to the live ones.
    for key in ("val/agreement", "val/kl", "val/loss_kd", "val/acc"):
        assert cached_metrics[key] == pytest.approx(live_metrics[key], rel=1e-4, abs=1e-5)


class _TinyConv(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ReplayCheck(L.Callback):
    """Inside every training step: the cached output is the teacher's on the image the student gets."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval()
        self.seen: dict[int, dict[int, torch.Tensor]] = {}
        self.steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        with torch.no_grad():
            live = self.teacher(batch["input"])
        torch.testing.assert_close(batch["teacher_logits"], live, rtol=1e-5, atol=1e-5)
        for index, view, image in zip(batch["index"], batch["view"], batch["input"], strict=True):
            self.seen.setdefault(int(index), {})[int(view)] = image
        self.steps += 1


def test_cached_output_is_the_teacher_on_the_exact_augmented_view(tmp_path):
    torch.manual_seed(0)
    teacher = _TinyConv()
    cache = TeacherCache(
        str(tmp_path / "views.cache"),
        teacher=teacher,
        dtype="float32",
        views=3,
        seed=7,
        splits=("train", "val"),
        progress=False,
    )
    dm = SyntheticTransferSet(
        num_samples=48,
        val_samples=16,
        test_samples=16,
        augment=True,
        batch_size=16,
        shuffle_seed=1,
        teacher_cache=cache,
    )
    check = _ReplayCheck(teacher)
    fit = trainer(max_epochs=3, callbacks=[check], limit_val_batches=1)
    fit.fit(OfflineDistillation(_TinyConv(), teacher=None), dm)
    assert check.steps == 9
    # Views cycle: over 3 epochs every sample was shown each of its 3 cached views once, and
    # they are different images (random crop/flip), each matched by its own cached output.
    assert all(sorted(views) == [0, 1, 2] for views in check.seen.values())
    differing = sum(
        not torch.equal(v[0], v[1]) or not torch.equal(v[0], v[2]) for v in check.seen.values()
    )
    assert differing >= 40


def test_views_need_a_random_augmentation(tmp_path, mlp_teacher):
    dm = digits_with_cache(tmp_path / "c", mlp_teacher, views=2)
    with pytest.raises(ValueError, match="no random training augmentation"):
        dm.prepare_data()


# --------------------------------------------------------------------------------- integrity


@pytest.fixture
def built(tmp_path, mlp_teacher):
    dm = digits_with_cache(tmp_path / "digits.cache", mlp_teacher)
    dm.prepare_data()
    dm.setup()
    return dm, tmp_path / "digits.cache", mlp_teacher


def _corruption_offsets(path: Path) -> dict[str, int]:
    size = path.stat().st_size
    header = read_header(path)
    return {
        "preamble": 9,
        "payload": header["payload"]["start"] + 12_345,
        "payload_last_byte": header["payload"]["end"] - 1,
        "header": header["payload"]["end"] + 40,
        "trailer": size - TRAILER.size,
    }


@pytest.mark.parametrize("where", ["preamble", "payload", "payload_last_byte", "header", "trailer"])
def test_one_corrupt_byte_is_detected_and_rebuilt(built, where):
    dm, path, checkpoint = built
    before = cached_logits(dm)
    flip_byte(path, _corruption_offsets(path)[where])

    refusing = digits_with_cache(path, checkpoint, on_mismatch="error")
    with pytest.raises(TeacherCacheError, match="cannot be used") as error:
        refusing.setup()
    assert "corrupt" in str(error.value) or "truncated" in str(error.value)

    rebuilding = digits_with_cache(path, checkpoint)
    rebuilding.setup()  # detects it and rebuilds from the teacher
    torch.testing.assert_close(cached_logits(rebuilding), before)


@pytest.mark.parametrize("keep", [-1, PREAMBLE_SIZE + 1000, 10, 0])
def test_truncated_file_is_detected(built, keep):
    dm, path, checkpoint = built
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(InvalidCacheFile, match="truncated|end marker|corrupt"):
        read_header(path)
    without_teacher = digits_with_cache(path, None)
    with pytest.raises(TeacherCacheError, match="cannot be rebuilt because no teacher_checkpoint"):
        without_teacher.setup()


def test_changed_teacher_checkpoint_is_detected(built):
    dm, path, checkpoint = built
    teacher = load_student(checkpoint)
    with torch.no_grad():
        teacher.classifier.bias += 1.0
    save_teacher(teacher, checkpoint)

    refusing = digits_with_cache(path, checkpoint, on_mismatch="error")
    with pytest.raises(TeacherCacheError, match="teacher_digest: .*teacher checkpoint changed"):
        refusing.setup()

    rebuilding = digits_with_cache(path, checkpoint)
    rebuilding.setup()
    dataset = rebuilding.dataset("train")
    batch = dataset.__getitems__(list(range(8)))
    torch.testing.assert_close(batch["teacher_logits"], teacher(batch["input"]).half().float())


def test_changed_data_is_detected_and_refused_without_a_teacher(built, tmp_path):
    dm, path, checkpoint = built
    other = DigitsTransferSet(
        split_seed=1,
        teacher_cache=TeacherCache(str(path), teacher_checkpoint=str(tmp_path / "gone.ckpt")),
    )
    with pytest.raises(TeacherCacheError) as error:
        other.setup()
    message = str(error.value)
    assert "data: the file has" in message and "inputs changed" in message
    assert "gone.ckpt' does not exist" in message and "Fix:" in message


def test_valid_cache_never_loads_the_teacher(built, monkeypatch):
    dm, path, checkpoint = built

    def fail(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache is valid")

    monkeypatch.setattr(PretrainedTeacher, "__init__", fail)
    again = digits_with_cache(path, checkpoint)
    again.prepare_data()
    again.setup()
    torch.testing.assert_close(cached_logits(again), cached_logits(dm))
    # On a machine without the teacher checkpoint the valid file is used as it is.
    elsewhere = digits_with_cache(path, Path(checkpoint).with_name("absent.ckpt"))
    elsewhere.setup()
    torch.testing.assert_close(cached_logits(elsewhere), cached_logits(dm))


# ---------------------------------------------------------------------------------- atomicity


def test_interrupted_build_leaves_no_file_and_keeps_the_old_one(tmp_path, mlp_teacher):
    path = tmp_path / "digits.cache"
    dm = digits_with_cache(path, mlp_teacher)
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dm.teacher_cache.build(dm, on_batch=interrupt)
    assert list(tmp_path.iterdir()) == [mlp_teacher]  # neither the cache nor a temporary file

    dm.teacher_cache.build(dm)
    good = path.read_bytes()
    calls.clear()
    fresh = digits_with_cache(path, mlp_teacher, dtype="float32")  # a different cache: rebuild
    with pytest.raises(KeyboardInterrupt):
        fresh.teacher_cache.build(fresh, on_batch=interrupt)
    assert path.read_bytes() == good  # the previous file is untouched, and still valid
    digits_with_cache(path, mlp_teacher, on_mismatch="error").setup()


KILLED_WRITER = """
import os, signal, sys
import torch
from torch import nn

from kd_lightning.data.teacher_cache import TeacherCache

class Data:  # what TeacherCache needs of a TransferSetDataModule
    num_classes, augments_train = 10, False
    def raw_split(self, split):
        return torch.zeros(2000, 64), torch.zeros(2000, dtype=torch.long)
    def transform_settings(self):
        return {}
    def transform_batch(self, batch, split):
        return batch

class DiesMidBuild(nn.Module):
    # The writer is killed (SIGKILL, no cleanup) in the middle of the build, deterministically.
    def __init__(self):
        super().__init__()
        self.linear, self.calls = nn.Linear(64, 10), 0
    def forward(self, x):
        self.calls += 1
        if self.calls == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.linear(x)

TeacherCache(sys.argv[1], teacher=DiesMidBuild(), batch_size=16, progress=False).ensure(Data())
"""


def test_writer_killed_mid_build_leaves_no_acceptable_file(tmp_path):
    path = tmp_path / "killed.cache"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(KILLED_WRITER))
    writer = subprocess.run([sys.executable, str(script), str(path)], timeout=600)
    assert writer.returncode == -signal.SIGKILL
    assert not path.exists()
    (partial,) = tmp_path.glob(".killed.cache.*.tmp")
    # Even moved into place by hand, the partial file is refused.
    shutil.copy(partial, path)
    with pytest.raises(InvalidCacheFile, match="not completely written|truncated"):
        read_header(path)
    # The next writer on this host removes the dead writer's temporary file.
    path.unlink()
    dm = DigitsTransferSet(
        teacher_cache=TeacherCache(str(path), teacher=nn.Flatten(), progress=False, views=1)
    )
    with pytest.raises(TeacherCacheError, match="64 logits but the data has 10 classes"):
        dm.prepare_data()
    assert list(tmp_path.glob(".killed.cache.*.tmp")) == []


def test_dataloader_workers_reopen_the_map_instead_of_copying_it(built):
    dm, path, checkpoint = built
    outputs = dm.dataset("train").teacher_outputs
    outputs.lookup(torch.arange(4), torch.zeros(4, dtype=torch.long))  # opens the map here
    assert len(pickle.dumps(outputs)) < 2_000  # path and layout only, not the outputs
    dm.num_workers = 2
    with_workers = list(dm.train_dataloader())
    dm.num_workers = 0
    in_process = list(dm.train_dataloader())
    assert len(with_workers) == len(in_process)
    for a, b in zip(with_workers, in_process, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["teacher_logits"], b["teacher_logits"])


# ---------------------------------------------------------------------------- dtypes and top-k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage_rounds_like_the_dtype(tmp_path, mlp_teacher, dtype):
    name = str(dtype).removeprefix("torch.")
    dm = digits_with_cache(tmp_path / "c", mlp_teacher, dtype=name)
    dm.setup()
    batch = dm.dataset("val").__getitems__(list(range(16)))
    teacher = load_student(mlp_teacher)
    torch.testing.assert_close(batch["teacher_logits"], teacher(batch["input"]).to(dtype).float())


def test_topk_cache_feeds_the_sparse_loss_without_a_teacher(tmp_path, mlp_teacher):
    dm = digits_with_cache(
        tmp_path / "topk.cache", mlp_teacher, topk=3, temperature=2.0, dtype="float32"
    )
    dm.setup()
    header = read_header(tmp_path / "topk.cache")
    assert header["arrays"]["train/indices"]["dtype"] == "<i2"
    batch = dm.example_batch(8)
    teacher = load_student(mlp_teacher)
    values, indices = topk_log_probs(teacher(batch["input"]), 3, 2.0)
    torch.testing.assert_close(batch["teacher_topk_values"], values)
    assert torch.equal(batch["teacher_topk_indices"], indices)
    assert "teacher_logits" not in batch

    L.seed_everything(0)
    terms = [
        LossTerm(SparseSoftTargetKLLoss(2.0), weight=0.9, name="kd", teacher="topk"),
        LossTerm(HardLabelCrossEntropy(), weight=0.1, name="ce"),
    ]
    module = OfflineDistillation(MLP(10, hidden_sizes=[16]), teacher=None, loss_terms=terms)
    fit = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    fit.fit(module, dm)
    with torch.no_grad():
        knowledge = module.forward_knowledge(batch, "train")
        losses = module.compute_losses(knowledge, batch, "train")
        want = sparse_soft_target_kl(module.student(batch["input"]), values, indices, 2.0)
    torch.testing.assert_close(losses["kd"], want)


def test_file_size_dense_versus_topk(tmp_path, mlp_teacher):
    dense = digits_with_cache(tmp_path / "dense", mlp_teacher, splits=("train",))
    sparse = digits_with_cache(tmp_path / "sparse", mlp_teacher, splits=("train",), topk=2)
    dense.setup(), sparse.setup()
    rows = len(dense.raw_split("train")[1])
    payload = lambda p: read_header(p)["payload"]["end"] - PREAMBLE_SIZE  # noqa: E731
    assert payload(tmp_path / "dense") == rows * 10 * 2  # float16 logits
    assert payload(tmp_path / "sparse") == _aligned(rows * 2 * 2) + rows * 2 * 2  # values + int16


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


# ------------------------------------------------------------------------------------------ DDP


class _CountingCache(TeacherCache):
    """Leaves a marker per process that builds, to prove only one process writes."""

    def build(self, datamodule, expected=None, on_batch=None):
        (self.path.parent / f"built-by-{os.getpid()}").touch()
        super().build(datamodule, expected, on_batch)


class _CheckCachedBatch(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        teacher = load_student(trainer.datamodule.teacher_cache.teacher_checkpoint)
        torch.testing.assert_close(batch["teacher_logits"], teacher(batch["input"]).half().float())


@pytest.mark.slow  # two spawned processes, each importing Lightning: ~20 s on 2 cores
def test_ddp_one_process_writes_every_process_reads(tmp_path, mlp_teacher):
    cache = _CountingCache(
        str(tmp_path / "ddp.cache"), teacher_checkpoint=str(mlp_teacher), progress=False
    )
    dm = DigitsTransferSet(batch_size=32, teacher_cache=cache)
    fit = trainer(
        devices=2,
        strategy="ddp_spawn",
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[_CheckCachedBatch()],
    )
    fit.fit(OfflineDistillation(MLP(10, hidden_sizes=[16]), teacher=None), dm)
    assert len(list(tmp_path.glob("built-by-*"))) == 1
    digits_with_cache(tmp_path / "ddp.cache", mlp_teacher, on_mismatch="error").setup()
