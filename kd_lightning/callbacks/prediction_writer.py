"""``PredictionWriter``: what ``kd-lightning predict`` computes, written to a file a user can open.

Formats, chosen by the file's suffix:

* ``.csv`` (the default, ``predictions.csv``): a header line, then one row per sample::

      index,pred,prob_0,prob_1,...,prob_<C-1>

  ``index`` is the sample's position in the predict set (the batch's ``index`` entry when the
  data module provides one, else the position Lightning's sampler reports, else a running
  count); ``pred`` is the arg-max class; ``prob_c`` the probability of class ``c``. Needs
  ``(B, C)`` predictions (one class distribution per sample).
* ``.pt``: ``torch.load(path)`` gives ``{"index": (N,), "pred": (N, ...), "probs": (N, ..., C)}``
  and works for any shape, e.g. per-token ``(B, L, V)`` predictions.

Every kd_lightning method's ``predict_step`` returns probabilities. A model whose predictions
are logits (rows that are not distributions: a negative entry or a sum away from 1) is
converted with a softmax over the last axis first.

The file is written atomically (a temporary file beside it, renamed when prediction ends), so
an interrupted run leaves no half file. An existing file is never replaced unless
``overwrite=True``: the run stops before predicting, naming the option; a file the run reads
(the checkpoint, a teacher's, the teacher cache) is never the output, even with ``overwrite``.
On several devices each rank writes its own file, ``<stem>-rank<r><suffix>``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

DEFAULT_NAME = "predictions.csv"
FORMATS = (".csv", ".pt")


def _as_tensor(prediction: Any) -> torch.Tensor:
    if isinstance(prediction, torch.Tensor):
        return prediction
    if isinstance(prediction, dict) and isinstance(prediction.get("logits"), torch.Tensor):
        return prediction["logits"]
    if isinstance(getattr(prediction, "logits", None), torch.Tensor):
        return prediction.logits
    raise TypeError(
        f"PredictionWriter writes tensors of class scores; predict_step returned a "
        f"{type(prediction).__name__}. Return probabilities (B, C) from predict_step."
    )


def as_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` if every row over the last axis is a distribution, else ``softmax(scores)``."""
    scores = scores.detach().float()
    is_distribution = bool((scores >= 0).all() and ((scores.sum(-1) - 1).abs() <= 1e-3).all())
    return scores if is_distribution else torch.softmax(scores, dim=-1)


def read_files(trainer: Trainer, pl_module: LightningModule) -> dict[str, Path]:
    """The files a prediction run reads: the evaluated checkpoint (``--ckpt_path``), every
    teacher/model checkpoint a module was loaded from, the data module's teacher cache."""
    files: dict[str, Path] = {}
    if trainer.ckpt_path:
        files["--ckpt_path"] = Path(trainer.ckpt_path)
    for name, module in pl_module.named_modules():
        path = getattr(module, "checkpoint_path", None)
        if isinstance(path, (str, Path)):
            files[f"the checkpoint of {name or 'the model'}"] = Path(path)
    cache = getattr(trainer.datamodule, "teacher_cache", None)
    if isinstance(getattr(cache, "path", None), (str, Path)):
        files["the teacher cache"] = Path(cache.path)
    return files


def refuse_input_as_output(target: Path, inputs: dict[str, Path]) -> None:
    """Raise ``ValueError`` if ``target`` is (or resolves to) one of ``inputs``: overwrite or not."""
    for what, path in inputs.items():
        same = path.resolve() == target.resolve()
        if not same and path.exists() and target.exists():
            same = os.path.samefile(path, target)
        if same:
            raise ValueError(
                f"predictions path {str(target)!r} is {what} {str(path)!r}, which this run "
                "reads: writing predictions there would destroy it (--predictions.overwrite "
                "never allows that). Pass another file, e.g. --predictions.path "
                f"{str(target.with_name('predictions' + target.suffix))!r}."
            )


class PredictionWriter(BasePredictionWriter):
    """Write predicted classes and class probabilities of ``trainer.predict`` to a file.

    Args:
        path: target file, ``.csv`` (default format) or ``.pt``. Default: ``predictions.csv`` in
            the trainer's log directory (``trainer.log_dir``, a new ``version_N`` folder per run
            with a logger; ``default_root_dir`` without one).
        overwrite: replace an existing file. Default ``False``: prediction refuses to start.
    """

    def __init__(self, path: str | Path | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        if path is not None and Path(path).suffix not in FORMATS:
            raise ValueError(
                f"predictions path {str(path)!r} must end in one of {list(FORMATS)} (the suffix "
                "picks the format)."
            )
        self.path = Path(path) if path is not None else None
        self.overwrite = overwrite
        self.written: Path | None = None
        self._reset()

    def _reset(self) -> None:
        self._target: Path | None = None
        self._partial: Path | None = None
        self._csv: io.TextIOWrapper | None = None
        self._writer: Any = None
        self._columns: int | None = None
        self._rows = 0
        self._chunks: dict[str, list[torch.Tensor]] = {"index": [], "pred": [], "probs": []}

    def target_path(self, trainer: Trainer) -> Path:
        """Where this run writes: ``path`` (or the default), with a rank suffix on several ranks."""
        path = self.path
        if path is None:
            path = Path(trainer.log_dir or trainer.default_root_dir) / DEFAULT_NAME
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        return path

    # ------------------------------------------------------------------ lifecycle
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        target = self.target_path(trainer)
        refuse_input_as_output(target, read_files(trainer, pl_module))
        if target.is_dir():
            raise IsADirectoryError(
                f"predictions path {str(target)!r} is a directory: pass a file, e.g. "
                f"--predictions.path {str(target / DEFAULT_NAME)!r}."
            )
        if target.exists() and not self.overwrite:
            raise FileExistsError(
                f"predictions file {str(target)!r} exists; pass --predictions.overwrite true "
                "to replace it, or --predictions.path <another file>."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        self._target = target
        self._partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        if target.suffix == ".csv":
            self._csv = open(self._partial, "w", newline="")
            self._writer = csv.writer(self._csv)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        probs = as_probabilities(_as_tensor(prediction)).cpu()
        index = self._indices(batch, batch_indices, probs.shape[0])
        pred = probs.argmax(dim=-1)
        if self._csv is None:
            self._chunks["index"].append(index)
            self._chunks["pred"].append(pred)
            self._chunks["probs"].append(probs)
            self._rows += probs.shape[0]
            return
        if probs.ndim != 2:
            raise ValueError(
                f"a CSV holds one class distribution per sample (B, C); predict_step returned "
                f"shape {tuple(probs.shape)}. Write a .pt file instead: --predictions.path "
                f"{self._target.with_suffix('.pt') if self._target else 'predictions.pt'}"
            )
        if self._columns is None:
            self._columns = probs.shape[1]
            self._writer.writerow(["index", "pred", *[f"prob_{c}" for c in range(self._columns)]])
        elif probs.shape[1] != self._columns:
            raise ValueError(
                f"batch {batch_idx} has {probs.shape[1]} classes, earlier batches {self._columns}."
            )
        for i, p, row in zip(index.tolist(), pred.tolist(), probs.tolist(), strict=True):
            self._writer.writerow([i, p, *(f"{v:.7g}" for v in row)])
        self._rows += probs.shape[0]

    def _indices(self, batch: Any, batch_indices: Any, size: int) -> torch.Tensor:
        if isinstance(batch, dict) and isinstance(batch.get("index"), torch.Tensor):
            return batch["index"].detach().cpu().long().reshape(-1)[:size]
        if batch_indices is not None and len(batch_indices) == size:
            return torch.as_tensor(list(batch_indices), dtype=torch.long)
        return torch.arange(self._rows, self._rows + size)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._target is None or self._partial is None:
            return
        if self._csv is not None:
            self._csv.close()
        else:
            torch.save(
                {k: torch.cat(v) if v else torch.empty(0) for k, v in self._chunks.items()},
                self._partial,
            )
        os.replace(self._partial, self._target)
        self.written = self._target
        print(f"predictions: {self._rows} rows -> {self._target}")
        self._reset()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._partial is not None and self._partial.exists():
            self._partial.unlink()
        self._reset()
