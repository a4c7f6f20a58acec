"""Overhead of kd_lightning's distillation step over the same work in plain PyTorch.

Measures, side by side in one run, alternating step by step (so machine load hits both alike):

(a) one training step of ``OfflineDistillation`` (Hinton KD: T=4 soft targets + CE) inside a
    Lightning ``Trainer`` (forward of student and frozen teacher, losses, metrics, logging,
    backward, optimizer step), timed from ``on_train_batch_start`` to ``on_train_batch_end``;
(b) the same step written by hand: student forward + backward + step, and a teacher forward
    under ``no_grad``, same models, same batch, same loss.

It prints min / median / max of the per-step time of each over repeats, and the ratio (a)/(b)
of the medians. Compute dominates: SmallCNN teacher (width 64) and student (width 32) on
32x32x3 inputs at batch 256.

    python benchmarks/distillation_step_overhead.py [--repeats 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.data import TransferSetDataModule
from kd_lightning.functional import hard_label_cross_entropy, soft_target_kl
from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import SmallCNN
from kd_lightning.teachers import FrozenTeacher

BATCH, SIZE, CLASSES = 256, 32, 10


class RandomImages(TransferSetDataModule):
    """Random 32x32x3 images: the benchmark times compute, not data."""

    def __init__(self, num_samples: int) -> None:
        super().__init__(num_classes=CLASSES, batch_size=BATCH, shuffle_seed=0)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(num_samples, 3, SIZE, SIZE, generator=generator)
        self.y = torch.randint(0, CLASSES, (num_samples,), generator=generator)

    def load_split(self, split):
        return (self.x, self.y) if split == "train" else (self.x[:BATCH], self.y[:BATCH])


class PairedStepTimer(Callback):
    """Times each Lightning step, then the hand-written step on the same batch, alternately.

    Alternating step by step puts both under the same machine load, so their ratio is stable
    even when the absolute times are not.
    """

    def __init__(self) -> None:
        student, teacher = models()
        self.student, self.teacher = student.train(), teacher.eval().requires_grad_(False)
        self.optimizer = make_optimizer(self.student.parameters())
        self.lightning_times: list[float] = []
        self.plain_times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._tic = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.lightning_times.append(time.perf_counter() - self._tic)
        self.plain_times.append(
            plain_step(self.student, self.teacher, self.optimizer, batch["input"], batch["target"])
        )


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def models(seed: int = 0):
    torch.manual_seed(seed)
    return SmallCNN(CLASSES, in_channels=3, width=32), SmallCNN(CLASSES, in_channels=3, width=64)


def plain_step(student, teacher, optimizer, x, y) -> float:
    tic = time.perf_counter()
    logits = student(x)
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss = 0.9 * soft_target_kl(logits, teacher_logits, 4.0) + 0.1 * hard_label_cross_entropy(
        logits, y
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - tic


def paired_steps(steps: int) -> tuple[list[float], list[float]]:
    student, teacher = models()
    module = OfflineDistillation(student, FrozenTeacher(teacher), optimizer=make_optimizer)
    timer = PairedStepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps + 2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, RandomImages(BATCH * (steps + 2)))
    # The first steps pay one-off costs (lazy initialisation, allocator warm-up) on both sides.
    return timer.lightning_times[2:], timer.plain_times[2:]


def describe(name: str, times: list[float]) -> str:
    ms = [1000 * t for t in times]
    return f"{name:<38} min {min(ms):8.1f} ms   median {statistics.median(ms):8.1f} ms   max {max(ms):8.1f} ms   (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    lightning_times, plain_times, ratios = [], [], []
    for repeat in range(args.repeats):
        a, b = paired_steps(args.steps)
        lightning_times += a
        plain_times += b
        ratios.append(statistics.median(a) / statistics.median(b))
        print(f"repeat {repeat + 1}/{args.repeats}: ratio {ratios[-1]:.3f}", flush=True)
    print()
    print(
        f"Hinton KD step, SmallCNN w64 -> w32, batch {BATCH}, {SIZE}x{SIZE}x3, {torch.get_num_threads()} threads"
    )
    print(describe("(a) kd_lightning OfflineDistillation", lightning_times))
    print(describe("(b) plain PyTorch (student + teacher)", plain_times))
    ratio = statistics.median(lightning_times) / statistics.median(plain_times)
    print(
        f"ratio (a)/(b) of medians: {ratio:.3f}   per-repeat ratios: min {min(ratios):.3f} "
        f"median {statistics.median(ratios):.3f} max {max(ratios):.3f}   (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
