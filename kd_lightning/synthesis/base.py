"""Input optimisation against a frozen teacher: the loop every synthesis method shares.

A synthesiser turns a trained teacher into a transfer set without any real sample: it draws
what each synthetic sample should make the teacher say (a class, a soft-target vector), then
optimises a batch of inputs by gradient descent on an objective of the teacher's response (and,
for some methods, of its internal activations). Subclasses own :meth:`draw_targets` and
:meth:`objective`; the base owns seeding, batching, the optimiser, projection onto the valid
input range, progress reporting and the final teacher pass that labels the result.

Pure torch: this package never imports Lightning.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from kd_lightning.synthesis.store import SynthesisedSet, module_digest
from kd_lightning.teachers import FrozenTeacher, output_logits


def unwrap_teacher(teacher: nn.Module) -> nn.Module:
    """The network inside a :class:`~kd_lightning.teachers.FrozenTeacher` (whose forward blocks gradients)."""
    return teacher.module if isinstance(teacher, FrozenTeacher) else teacher


@contextlib.contextmanager
def frozen_for_input_gradients(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter for the block; both restored after.

    Gradients then flow to the inputs only: the teacher's weights and BatchNorm running
    statistics are left exactly as they were.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


class InputSynthesiser(abc.ABC):
    """Base of the input-optimisation methods (DeepInversion, Data Impressions).

    Samples are made in batches of ``batch_size``; each batch starts from random inputs (drawn
    from a generator seeded with ``seed`` and the batch number, so a set is reproducible and a
    batch does not depend on the batches before it) and takes ``steps`` Adam steps at ``lr``.
    After every step the inputs are clamped to ``input_range`` (the range of the teacher's
    inputs, e.g. ``[0, 1]`` for digits' pixels); ``None`` leaves them unconstrained.

    Args:
        batch_size: samples optimised together.
        steps: optimisation steps per batch.
        lr: Adam learning rate on the inputs.
        input_range: ``[low, high]`` of valid inputs, or ``None``.
        init: starting point of the inputs: ``"uniform"`` (uniform over ``input_range``, or
            [0, 1] without one) or ``"normal"`` (standard normal, then clamped).
        seed: seed of the starting inputs and of the drawn targets; ``None`` takes
            ``torch.initial_seed()`` when :meth:`synthesise` runs (the run's seed under
            ``seed_everything``), so each seed of a study synthesises its own set.
    """

    method: ClassVar[str] = ""
    INITS: ClassVar[tuple[str, ...]] = ("uniform", "normal")

    def __init__(
        self,
        batch_size: int = 256,
        steps: int = 200,
        lr: float = 0.05,
        input_range: Sequence[float] | None = (0.0, 1.0),
        init: str = "uniform",
        seed: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if input_range is not None:
            if len(input_range) != 2 or not input_range[0] < input_range[1]:
                raise ValueError(
                    f"input_range must be [low, high] with low < high (or null), got {input_range}"
                )
            input_range = (float(input_range[0]), float(input_range[1]))
        if init not in self.INITS:
            raise ValueError(f"init must be one of {list(self.INITS)}, got {init!r}")
        self.batch_size, self.steps, self.lr = batch_size, steps, lr
        self.input_range = input_range
        self.init = init
        self.seed = seed
        self._seed = 0 if seed is None else int(seed)

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def draw_targets(
        self, teacher: nn.Module, num_samples: int, num_classes: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Per-sample targets of the whole set: ``{"class": (N,) long, ...}`` (CPU tensors).

        ``class`` is the class each sample is made for; methods add what their objective needs
        (e.g. ``soft_target``). The order is the order of the synthesised samples.
        """

    @abc.abstractmethod
    def objective(
        self, teacher: nn.Module, inputs: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``{"loss": total, <term>: value, ...}`` of one batch; ``teacher`` is in eval mode."""

    def settings(self) -> dict[str, Any]:
        """The hyperparameters, as plain data (recorded in a saved set's metadata)."""
        return {
            "batch_size": self.batch_size,
            "steps": self.steps,
            "lr": self.lr,
            "input_range": list(self.input_range) if self.input_range is not None else None,
            "init": self.init,
            "seed": self._seed,
        }

    # ------------------------------------------------------------------ the loop
    def initial_inputs(
        self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        if self.init == "normal":
            x = torch.randn(shape, generator=generator)
        else:
            low, high = self.input_range if self.input_range is not None else (0.0, 1.0)
            x = torch.rand(shape, generator=generator) * (high - low) + low
        return self.project(x.to(device))

    def project(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.input_range is None:
            return inputs
        return inputs.clamp(*self.input_range)

    def optimise(
        self,
        teacher: nn.Module,
        inputs: torch.Tensor,
        targets: dict[str, torch.Tensor],
        steps: int | None = None,
        on_step: Any = None,
    ) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """Optimise one batch of inputs; returns the inputs and the objective's terms per step."""
        steps = self.steps if steps is None else steps
        inputs = inputs.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([inputs], lr=self.lr)
        history: list[dict[str, float]] = []
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            terms = self.objective(teacher, inputs, targets)
            terms["loss"].backward()
            optimiser.step()
            with torch.no_grad():
                inputs.copy_(self.project(inputs))
            history.append({k: float(v.detach()) for k, v in terms.items()})
            if on_step is not None:
                on_step(history[-1])
        return inputs.detach(), history

    def synthesise(
        self,
        teacher: nn.Module,
        num_samples: int,
        num_classes: int,
        input_shape: Sequence[int],
        device: torch.device | str | None = None,
        progress: bool = False,
        steps: int | None = None,
    ) -> SynthesisedSet:
        """Make ``num_samples`` inputs of shape ``input_shape`` from ``teacher`` alone.

        Args:
            teacher: the trained teacher (plain module or FrozenTeacher); left unchanged.
            num_samples: size of the synthesised set.
            num_classes: number of classes of the teacher.
            input_shape: shape of one input sample, e.g. ``(1, 8, 8)``.
            device: where to optimise (default: the teacher's device).
            progress: show a tqdm bar over the optimisation steps.
            steps: overrides the steps per batch (a quick check, e.g. Lightning's fast_dev_run).

        Returns:
            the inputs (on the CPU), the teacher's logits on them, the class each was made for,
            and metadata (method, settings, teacher digest, final objective terms, time taken).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        model = unwrap_teacher(teacher)
        if device is None:
            parameter = next(model.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
        device = torch.device(device)
        model_device = next((p.device for p in model.parameters()), device)
        steps = self.steps if steps is None else steps
        start = time.perf_counter()
        self._seed = int(self.seed if self.seed is not None else torch.initial_seed() % (2**31))
        generator = torch.Generator().manual_seed(self._seed)
        with frozen_for_input_gradients(model):
            model.to(device)
            try:
                all_targets = self.draw_targets(model, num_samples, num_classes, generator)
                inputs, logits, last_terms = self._run_batches(
                    model, all_targets, num_samples, tuple(input_shape), device, progress, steps
                )
            finally:
                model.to(model_device)
        metadata = {
            "method": self.method,
            "settings": {**self.settings(), "steps": steps},
            "teacher_digest": module_digest(model),
            "num_classes": num_classes,
            "input_shape": list(input_shape),
            "final_objective": last_terms,
            "seconds": time.perf_counter() - start,
        }
        return SynthesisedSet(
            inputs=inputs, teacher_logits=logits, classes=all_targets["class"], metadata=metadata
        )

    def __call__(self, *args: Any, **kwargs: Any) -> SynthesisedSet:
        """Same as :meth:`synthesise`."""
        return self.synthesise(*args, **kwargs)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({settings})"

    def _run_batches(self, model, all_targets, num_samples, input_shape, device, progress, steps):
        from tqdm.auto import tqdm

        batches = range(0, num_samples, self.batch_size)
        bar = tqdm(
            total=len(batches) * steps,
            desc=f"synthesising {num_samples} inputs ({self.method})",
            disable=not progress,
            leave=False,
        )
        inputs_out, logits_out = [], []
        totals: dict[str, float] = {}
        with bar:
            for number, start in enumerate(batches):
                stop = min(start + self.batch_size, num_samples)
                targets = {k: v[start:stop].to(device) for k, v in all_targets.items()}
                batch_generator = torch.Generator().manual_seed(self._seed * 1_000_003 + number + 1)
                x = self.initial_inputs((stop - start, *input_shape), batch_generator, device)

                def on_step(terms: dict[str, float]) -> None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)

                x, history = self.optimise(model, x, targets, steps=steps, on_step=on_step)
                with torch.no_grad():
                    logits = output_logits(model(x)).float()
                inputs_out.append(x.cpu())
                logits_out.append(logits.cpu())
                for key, value in (history[-1] if history else {}).items():
                    totals[key] = totals.get(key, 0.0) + value * (stop - start)
        last_terms = {k: v / num_samples for k, v in totals.items()}
        return torch.cat(inputs_out), torch.cat(logits_out), last_terms
