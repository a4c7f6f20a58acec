"""Training-step time of Hinton KD with a live teacher, with the teacher-output cache, and alone.

resnet32x4 -> resnet8x4 (CRD's CIFAR-100 pair), batch 64, 32x32x3 inputs, 100 classes, CPU.
Measured side by side in one run, interleaved step by step (a, b, c, a, b, c, ...) so machine
load affects the three alike:

(a) ``OfflineDistillation`` with the live frozen teacher (teacher forward in every step);
(b) ``OfflineDistillation`` with ``teacher=None``: the batch carries ``teacher_logits`` read
    from a :class:`~kd_lightning.data.TeacherCache` (float16, dense);
(c) ``Supervised``: the student trained alone on the labels.

Code path: the library's own ``module.training_step(batch, i)`` (the shared step with losses
and metrics) inside a minimal loop with a manual SGD optimizer (``zero_grad``, ``backward``,
``step``); no Trainer, so Lightning's loop overhead, equal for all three, is left out. A step
is timed from the batch in hand to the optimizer step; fetching the batch (for (b) including
the memory-mapped cache lookup) and the device-side augmentation are timed separately.

Also: the cache build time with the real resnet32x4 teacher (teacher-bound; extrapolated to
CIFAR's 50,000 images), and the file size and build time of 50,000 x 100 outputs dense
float16 versus top-10 (built with a cheap stand-in teacher, so the time is the cache's own
I/O, checksum and fingerprint cost).

    python benchmarks/teacher_cache_speed.py [--repeats 7] [--build-samples 512]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from kd_lightning.data.synthetic import SyntheticTransferSet
from kd_lightning.data.teacher_cache import TeacherCache, read_header
from kd_lightning.methods.offline import OfflineDistillation
from kd_lightning.methods.supervised import Supervised
from kd_lightning.models.cifar import ResNet8x4, ResNet32x4
from kd_lightning.teachers import FrozenTeacher

BATCH, CLASSES = 64, 100


def sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def prepared(module, dm):
    module.setup("fit")  # metrics; no trainer, so self.log() is a no-op (warned once, silenced)
    module.train()
    return module, sgd(module)


def timed_step(module, optimizer, dm, positions, step) -> tuple[float, float]:
    tic = time.perf_counter()
    batch = dm.dataset("train").__getitems__([(p, 0) for p in positions])
    batch = dm.transform_batch(batch, "train")
    toc = time.perf_counter()
    loss = module.training_step(batch, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - toc, toc - tic


def summary(times: list[float]) -> str:
    return f"{min(times):8.3f} {statistics.median(times):8.3f} {max(times):8.3f}"


def file_sizes(directory: Path, rows: int) -> list[tuple[str, float, float, int]]:
    """Build 50k x 100 caches (dense fp16, top-10) with a cheap stand-in teacher."""
    dm_kwargs = dict(num_classes=CLASSES, num_samples=rows, val_samples=10, test_samples=10)
    stand_in = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, CLASSES))
    results = []
    for name, topk in (("dense float16", None), ("top-10 float16", 10)):
        path = directory / f"size-{topk}.cache"
        cache = TeacherCache(
            str(path), teacher=stand_in, topk=topk, splits=("train",), progress=False
        )
        dm = SyntheticTransferSet(**dm_kwargs, teacher_cache=cache)
        dm.raw_split("train")  # generate the images outside the timing
        tic = time.perf_counter()
        dm.prepare_data()
        built = time.perf_counter() - tic
        tic = time.perf_counter()
        cache._verified = None
        cache.ensure(dm)  # what setup() does: fingerprint + header + CRC of every chunk
        verified = time.perf_counter() - tic
        results.append((name, built, verified, path.stat().st_size))
        assert read_header(path)["kind"] == ("topk" if topk else "dense")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds measured")
    parser.add_argument("--warmup", type=int, default=2, help="rounds discarded first")
    parser.add_argument(
        "--build-samples", type=int, default=512, help="images cached with resnet32x4"
    )
    parser.add_argument(
        "--size-rows", type=int, default=50_000, help="rows of the file-size caches"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(0)

    teacher = ResNet32x4(num_classes=CLASSES).eval()
    student = ResNet8x4(num_classes=CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        cache = TeacherCache(
            str(directory / "bench.cache"), teacher=teacher, dtype="float16",
            splits=("train",), batch_size=BATCH, progress=False,
        )  # fmt: skip
        dm = SyntheticTransferSet(
            num_classes=CLASSES, num_samples=args.build_samples, augment=True,
            shuffle_seed=0, teacher_cache=cache,
        )  # fmt: skip
        dm.raw_split("train")
        tic = time.perf_counter()
        dm.prepare_data()
        build_seconds = time.perf_counter() - tic
        dm.setup()

        live, live_opt = prepared(
            OfflineDistillation(copy.deepcopy(student), FrozenTeacher(copy.deepcopy(teacher)), num_classes=CLASSES), dm
        )  # fmt: skip
        cached, cached_opt = prepared(
            OfflineDistillation(copy.deepcopy(student), None, num_classes=CLASSES), dm
        )
        alone, alone_opt = prepared(Supervised(copy.deepcopy(student), num_classes=CLASSES), dm)
        runs = {
            "(a) live teacher": (live, live_opt),
            "(b) cached teacher": (cached, cached_opt),
            "(c) student alone": (alone, alone_opt),
        }
        steps = {name: [] for name in runs}
        fetches = {name: [] for name in runs}
        generator = torch.Generator().manual_seed(0)
        for round_ in range(args.warmup + args.repeats):
            positions = torch.randperm(args.build_samples, generator=generator)[:BATCH].tolist()
            for name, (module, optimizer) in runs.items():
                if name == "(b) cached teacher":
                    step, fetch = timed_step(module, optimizer, dm, positions, round_)
                else:  # same images, without the cache lookup
                    cache_outputs = dm.dataset("train").teacher_outputs
                    dm.dataset("train").teacher_outputs = None
                    step, fetch = timed_step(module, optimizer, dm, positions, round_)
                    dm.dataset("train").teacher_outputs = cache_outputs
                if round_ >= args.warmup:
                    steps[name].append(step)
                    fetches[name].append(fetch)
        sizes = file_sizes(directory, args.size_rows)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        f"Hinton KD (T=4, 0.9 KD + 0.1 CE) resnet32x4 -> resnet8x4, batch {BATCH}, 3x32x32, "
        f"{CLASSES} classes; {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    print(
        f"\n{'training step (s)':<22} {'min':>8} {'median':>8} {'max':>8}   fetch+augment median (s)"
    )
    for name in runs:
        print(f"{name:<22} {summary(steps[name])}   {statistics.median(fetches[name]):.4f}")
    # Medians, and minimums: on a shared machine the minimum is the least-disturbed estimate.
    for label, reduce in (("median", statistics.median), ("min", min)):
        a, b, c = (reduce(steps[name]) for name in runs)
        print(
            f"\n{label:>6}: (b)/(c) cached KD vs student alone = {b / c:.3f} (target <= 1.05); "
            f"(a)/(b) speed-up of the cache = {a / b:.2f}x"
        )
    per_image = build_seconds / args.build_samples
    print(
        f"\ncache build with resnet32x4 on this CPU: {build_seconds:.1f} s for "
        f"{args.build_samples} images ({1 / per_image:.0f} img/s); 50,000 images x 1 view "
        f"~ {50_000 * per_image / 60:.0f} min (the teacher forward dominates)"
    )
    print(
        f"\n{args.size_rows} x {CLASSES} outputs     file size   build (stand-in teacher)   load+verify"
    )
    for name, built, verified, size in sizes:
        print(f"{name:<22} {size / 2**20:8.2f} MiB   {built:8.2f} s {'':15} {verified:6.2f} s")


if __name__ == "__main__":
    main()
