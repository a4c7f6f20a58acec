"""Start-up checks that change no state: every module's mode, the RNG and all buffers survive.

A check runs the models on one example batch before any step. Dropout, BatchNorm statistics,
memory banks and random draws must not differ from a run without the check.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_lightning.functional.token import check_vocab_sizes, effective_objective


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from: torch (CPU, CUDA), Python and NumPy."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple:
    # Plain Python values only: checkpoints are read with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, and afterwards every submodule's own mode, every buffer and the
    random generators exactly as before (a user's frozen BatchNorm stays in eval mode)."""
    flags = [(module, module.training) for module in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = rng_state()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape != saved.shape:  # lazily sized buffers (observers, banks)
                    buffer.resize_(saved.shape)
                buffer.copy_(saved)
        set_rng_state(rng)


def check_class_count(
    name: str, logits: torch.Tensor, num_classes: int | None, reference: str | None = None
) -> int:
    """The class count of ``logits`` (last dim), refused when it differs from ``num_classes``.

    ``reference`` names the model ``num_classes`` was read from when neither the method nor the
    data gave it (plain DataLoaders): the message then names both models.
    """
    classes = int(logits.shape[-1])
    if num_classes is not None and classes != num_classes and reference is not None:
        raise ValueError(
            f"the {name} outputs {classes} logits but the {reference} outputs {num_classes}: "
            "build both for the task's classes (num_classes=<the number of classes in your "
            "labels>), and pass num_classes to the method so the labels are checked against it"
        )
    if num_classes is not None and classes != num_classes:
        raise ValueError(
            f"the {name} outputs {classes} logits but the task has {num_classes} classes; build "
            f"the {name} with num_classes={num_classes} (or use a {name} checkpoint trained on "
            "this data)"
        )
    return classes


def check_vocabulary(name: str, logits: torch.Tensor, vocab: int, crop_vocab: bool) -> None:
    """A frozen source's per-token logits ``(B, L, V_t)`` against the student's vocabulary.

    Equal sizes pass; different sizes fail naming both, unless a loss of the objective crops
    to the shared range (``crop_vocab=True``, see
    :func:`~kd_lightning.functional.token.check_vocab_sizes`).
    """
    try:
        check_vocab_sizes(vocab, int(logits.shape[-1]), crop_vocab)
    except ValueError as err:
        raise ValueError(f"the {name}'s vocabulary does not match the student's: {err}") from None


def check_teacher_cache(module: Any, provenance: Any) -> None:
    """Refuse a teacher cache made by another teacher than ``module``'s configured one, or top-k
    values stored at another temperature (or another k) than a loss term reads them at.

    Args:
        module: the method (its ``teacher`` source and objective).
        provenance: the cache's :class:`~kd_lightning.data.cache_format.CacheProvenance` (the
            base's ``setup`` takes it from the data module's ``teacher_cache``).

    Raises:
        TeacherCacheError: naming the cache, both teachers' digests or both temperatures, and
            the fix.
    """
    teacher = module.source("teacher")
    if teacher is not None:
        provenance.check_teacher(teacher)
    if module.objective is None:
        return
    names = module.knowledge_names()
    for term in module.objective:
        if "teacher.topk" not in term.keys("teacher", names):
            continue
        temperature, where = getattr(term.loss, "temperature", None), f"loss term {term.name!r}"
        if temperature is not None:
            provenance.check_temperature(temperature, where=where)
        provenance.check_topk(getattr(term.loss, "topk", None), where=where)
        objective = getattr(term.loss, "objective", "forward_kl")
        provenance.check_objective(
            effective_objective(objective, getattr(term.loss, "beta", 0.5)), where=where
        )


def check_optimizer(module: Any) -> None:
    """Build ``module``'s optimizer and scheduler once and throw them away: a bad setting (a
    negative learning rate, an unknown argument) fails at start-up, not after other runs of a
    study trained.

    Raises:
        ValueError: naming torch's reason and the config keys to fix.
    """
    try:
        optimizer = module.optimizer_factory(module.trainable_parameters())
        if module.lr_scheduler_factory is not None:
            module.lr_scheduler_factory(optimizer)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"the optimizer or learning-rate scheduler cannot be built ({type(err).__name__}: "
            f"{err}): fix model.init_args.optimizer / lr_scheduler (their init_args)"
        ) from err
    check_learning_rates(optimizer)


def check_learning_rates(optimizer: Any) -> None:
    """Refuse a parameter group whose learning rate is NaN, infinite, 0 or negative.

    Reads each group's base rate (``initial_lr`` once a scheduler wrapped the optimizer, else
    ``lr``): a warm-up may start at 0, its base may not. An infinite rate passes torch's own
    ``0 <= lr`` test and makes every weight non-finite at the first update; 0 trains nothing.

    Raises:
        ValueError: naming the group, its rate and the config key to fix.
    """
    for i, group in enumerate(getattr(optimizer, "param_groups", [])):
        lr = group.get("initial_lr", group.get("lr"))
        try:
            value = float(lr)
        except (TypeError, ValueError):
            continue  # not a number: torch refused it already, or a custom optimizer
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"the learning rate of parameter group {i} of {type(optimizer).__name__} is "
                f"{value:g}: it must be finite and > 0 (inf/nan make every weight non-finite at "
                "the first update, 0 trains nothing); set "
                "model.init_args.optimizer.init_args.lr (e.g. lr: 0.001)"
            )


UNTRAINABLE_PRECISIONS = {"cpu": ("16-true",)}
"""Precisions a fit refuses per device type: ``16-true`` keeps the weights and the optimizer
state in float16 without loss scaling; on the CPU the first Adam step makes them non-finite
(``eps=1e-8`` is 0 in float16). ``bf16-true`` keeps float32's exponent range and trains."""


def check_trainer(trainer: Any, stage: str) -> None:
    """Trainer settings that Lightning accepts but that break or empty a fit, refused before
    any step: the same checks at fit start-up (the method's ``setup``) and in a study's
    preflight (every run, before the first trains).

    Checks the precision (:func:`check_precision`), ``gradient_clip_val`` (finite, >= 0),
    ``val_check_interval`` (> 0), ``check_val_every_n_epoch`` and ``accumulate_grad_batches``
    (>= 1). The learning rate is checked with the optimizer (:func:`check_learning_rates`);
    monitored metric names once the module has logged (:mod:`kd_lightning.callbacks.monitor_check`).

    Raises:
        ValueError: naming the setting, its value and the value to use.
    """
    check_precision(trainer, stage)
    if stage != "fit":
        return
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip is not None and not (math.isfinite(float(clip)) and float(clip) >= 0):
        raise ValueError(
            f"trainer.gradient_clip_val is {clip}: it must be a finite number >= 0 (the largest "
            "gradient norm or value kept); use e.g. gradient_clip_val: 1.0, or leave it out "
            "(null) for no clipping"
        )
    interval = getattr(trainer, "val_check_interval", 1.0)
    if interval is not None and not float(interval) > 0:
        raise ValueError(
            f"trainer.val_check_interval is {interval}: give a fraction of an epoch in (0, 1] "
            "(1.0: validate once per epoch) or a number of training batches >= 1; to skip "
            "validation set limit_val_batches: 0"
        )
    for name, hint in (
        ("check_val_every_n_epoch", "1: validate every epoch; null: by val_check_interval"),
        ("accumulate_grad_batches", "1: one optimizer step per batch"),
    ):
        value = getattr(trainer, name, 1)
        if value is not None and not value >= 1:
            raise ValueError(f"trainer.{name} is {value}: it must be an integer >= 1 ({hint})")


def check_precision(trainer: Any, stage: str) -> None:
    """Refuse, before any step, a fit at a precision that cannot train on the trainer's device.

    Raises:
        ValueError: naming the precision, the device and the precisions to use instead.
    """
    precision = str(getattr(trainer, "precision", ""))
    device = trainer.strategy.root_device.type
    if stage == "fit" and precision in UNTRAINABLE_PRECISIONS.get(device, ()):
        raise ValueError(
            f"precision {precision!r} cannot train on the {device.upper()}: weights, gradients "
            "and optimizer state in float16 without loss scaling turn non-finite at the first "
            "update (Adam's eps=1e-8 is 0 in float16). Use precision: bf16-mixed (bfloat16 "
            "autocast over float32 weights) or 32-true (in a config: trainer.precision; in "
            "Python: Trainer(precision=...)). Evaluation (validate/test/predict) may use it."
        )
