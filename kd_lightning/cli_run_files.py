"""Where ``kd-lightning fit`` writes a run's files, and what it prints about them.

Every fit writes into one folder per run, the folder Lightning's logger gives the run
(``<save_dir>/<name>/version_<N>`` for the CSV and TensorBoard loggers,
``<save_dir>/<project>/<run id>`` for W&B, ``<default_root_dir>`` without a logger):

* ``checkpoints/best.ckpt``: the epoch with the best value of the method's ``monitor`` (its
  ``mode``: ``val/acc``, max, for every method of this library);
* ``checkpoints/last.ckpt``: the last epoch (resume with ``--ckpt_path`` on it);
* ``config.yaml``: the resolved config (:class:`RunFolderConfig`; Lightning's own callback
  writes into the logger's ``save_dir``, shared by every W&B run).

A fit refused before its first optimizer step (a start-up check, a finished checkpoint it would
replace) leaves no run folder behind (:class:`RemoveRefusedRun`), so a corrected rerun gets the
same ``version_<N>`` instead of piling up folders that hold only a config. A fit into a folder
that already holds a run (an explicit logger version) is refused before anything is written,
unless ``--overwrite``; even then a refused fit puts the earlier files back.

The checkpoint callback is the CLI's default (:func:`install_default_checkpoint`): a config that
lists its own :class:`~lightning.pytorch.callbacks.ModelCheckpoint` writing elsewhere (the
teacher configs keep a stable ``teacher.ckpt`` that distillation configs read) gets the default
as well; one that writes into the run folder itself (no ``dirpath``) replaces it;
``enable_checkpointing: false`` turns every checkpoint off. Off a terminal Lightning's bar (TQDM
or Rich) becomes one line per epoch (:class:`~kd_lightning.callbacks.progress.EpochLines`), and
at the end of fit :class:`~kd_lightning.callbacks.progress.FitSummary` prints the metric and
these paths.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.cli import SaveConfigCallback

from kd_lightning.callbacks.progress import EpochLines, FitSummary


def _version(package: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", metadata.version(package))[:2]
    return tuple(int(n) for n in numbers)


BEST_NAME = "best"
"""File stem of the best checkpoint (``best.ckpt``); the last one is Lightning's ``last.ckpt``."""


_SKIP_UNSET = "skip_unset" if _version("jsonargparse") >= (4, 49) else "skip_none"


def run_folder(trainer: L.Trainer) -> Path:
    """The run's own folder: where Lightning's ``ModelCheckpoint`` puts ``checkpoints/`` when it
    has no ``dirpath`` (the same rule, so config and checkpoints sit side by side)."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(save_dir) / str(logger.name) / version


class RunFolderConfig(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback``, writing ``config.yaml`` into :func:`run_folder`.

    Lightning writes it into ``trainer.log_dir``, which for loggers other than CSV and
    TensorBoard (W&B) is the logger's ``save_dir``: every run would write the same file.
    """

    config_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = Path(trainer.strategy.broadcast(str(run_folder(trainer))))
        path = folder / self.config_filename
        exists = trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False)
        if exists and not self.overwrite:
            raise RuntimeError(
                f"{path} exists: a previous run's config. Pass another logger version or folder "
                "(e.g. --trainer.logger.init_args.version), or delete that file."
            )
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            # Every value, None included (reproducible); jsonargparse 4.49 renamed skip_none.
            keep_none = {_SKIP_UNSET: False}
            self.parser.save(
                self.config,
                os.fspath(path),
                overwrite=self.overwrite,
                multifile=self.multifile,
                **keep_none,
            )
            self.save_config(trainer, pl_module, stage)
        self.config_path = path
        self.already_saved = trainer.strategy.broadcast(True)


RUN_RECORDS = ("config.yaml", "metrics.csv", "hparams.yaml", "events.out.tfevents.*")
"""Files that show a run folder already holds a run (with ``checkpoints/*.ckpt``)."""


def earlier_records(folder: Path) -> list[Path]:
    """The records of an earlier run in ``folder`` (empty when there are none)."""
    found = [p for pattern in RUN_RECORDS for p in sorted(folder.glob(pattern)) if p.is_file()]
    return found + sorted((folder / "checkpoints").glob("*.ckpt"))


class RemoveRefusedRun(Callback):
    """Keep a fit off an earlier run's folder, and leave no trace of a fit that is refused.

    Built before the fit starts (:meth:`before`), before Lightning's logger and
    :class:`RunFolderConfig` write anything (the CSV logger deletes an existing
    ``metrics.csv`` as soon as it starts). A run folder that already holds a run's records
    (an explicit ``--trainer.logger.init_args.version`` naming a finished run) is refused there,
    naming the folder and ``--overwrite``. With ``--overwrite`` the earlier top-level files are
    kept in memory until the first optimizer step. On an exception with ``global_step == 0``
    the folders the fit created are removed (unless a checkpoint is inside) and the earlier
    files are put back byte for byte, files the refused run added removed: a refused fit
    never deletes or rewrites what existed before it.

    Args:
        created: the folders the fit will create, deepest first.
        folder: the run folder.
        kept: the run folder's top-level files before the fit, by path (``--overwrite``).
    """

    def __init__(
        self,
        created: Sequence[Path],
        folder: Path | None = None,
        kept: dict[Path, bytes] | None = None,
    ) -> None:
        self.created = tuple(created)
        self.folder = folder
        self.kept = dict(kept or {})

    @classmethod
    def before(cls, trainer: L.Trainer, overwrite: bool = False) -> RemoveRefusedRun:
        """The callback for ``trainer``'s run folder, called before ``fit`` starts.

        Raises:
            FileExistsError: the logger's run folder holds an earlier run and not ``overwrite``.
        """
        folder = run_folder(trainer).absolute()
        if not folder.exists():  # `name: y/../run` with no `y` yet: the logger makes `y`, so
            folder = Path(os.path.normpath(folder))  # the folder it writes is the lexical one
        records = earlier_records(folder) if trainer.loggers and folder.is_dir() else []
        if records and not overwrite:
            names = ", ".join(p.relative_to(folder).as_posix() for p in records[:4])
            raise FileExistsError(
                f"the run folder {str(folder)!r} already holds an earlier run ({names}"
                f"{' ...' if len(records) > 4 else ''}); this fit would replace its records. "
                "Nothing was written. Leave out the logger's version for a new version_<N>, "
                "pass another one, or rerun with --overwrite to replace that run."
            )
        kept = {}
        if records and trainer.is_global_zero:
            kept = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        return cls([p for p in (folder, *folder.parents) if not p.exists()], folder, kept)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.kept = {}  # trained: the earlier run is replaced, as --overwrite asked

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not (trainer.is_global_zero and trainer.global_step == 0):
            return
        if self.kept and self.folder is not None:
            for path in self.folder.iterdir():
                if path.is_file() and path not in self.kept:
                    path.unlink()
            for path, content in self.kept.items():
                path.write_bytes(content)
        if not self.created:
            return
        run = self.created[0]
        if run.is_dir() and not any(run.rglob("*.ckpt")):
            shutil.rmtree(run, ignore_errors=True)
            for parent in self.created[1:]:  # created by this fit too: removed when empty
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()


def default_checkpoint(model: Any) -> ModelCheckpoint:
    """``best.ckpt`` by the method's ``monitor``/``mode`` class attributes, and ``last.ckpt``."""
    return ModelCheckpoint(
        filename=BEST_NAME,
        monitor=getattr(model, "monitor", None),
        mode=getattr(model, "mode", "min"),
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )


def _is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def install_default_checkpoint(
    trainer: L.Trainer, model: Any, configured: Sequence[Callback] = ()
) -> ModelCheckpoint | None:
    """Put :func:`default_checkpoint` among the trainer's callbacks, where it belongs.

    It replaces the ``ModelCheckpoint`` Lightning adds when a config lists none; it joins the
    config's own when those write elsewhere (a stable ``teacher.ckpt``) and the run has a folder
    of its own (a logger); it stays out when a configured one writes into the run folder (no
    ``dirpath``) or checkpointing is off. Added for evaluation too, so ``--ckpt_path`` restores
    the state of every callback that wrote the file.

    Returns:
        The added callback, or ``None``.
    """
    listed = {id(c) for c in configured}
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    own = [c for c in checkpoints if id(c) in listed]
    if not checkpoints or any(c.dirpath is None for c in own) or (own and not trainer.loggers):
        return None
    # Lightning added its default (epoch=X-step=Y.ckpt) when the config listed none.
    lightning_default = {id(c) for c in checkpoints if id(c) not in listed}
    trainer.callbacks[:] = [c for c in trainer.callbacks if id(c) not in lightning_default]
    callback = default_checkpoint(model)
    trainer.callbacks.append(callback)  # checkpoints run after the other callbacks
    return callback


def prepare_fit(
    trainer: L.Trainer,
    model: Any,
    configured: Sequence[Callback] = (),
    stream: TextIO | None = None,
) -> None:
    """Give a CLI fit its default checkpoints, its progress lines and its end-of-fit summary.

    Args:
        trainer: the trainer LightningCLI built.
        model: the method (its ``monitor`` and ``mode`` choose ``best.ckpt``).
        configured: the callbacks the config listed (to tell them from Lightning's defaults).
        stream: where progress and summary go (default ``sys.stdout``; its ``isatty`` decides
            between Lightning's bar and one line per epoch).
    """
    stream = stream or sys.stdout
    install_default_checkpoint(trainer, model, configured)
    bar = trainer.progress_bar_callback
    listed = {id(c) for c in configured}
    lightning_bar = type(bar) in (TQDMProgressBar, RichProgressBar) and id(bar) not in listed
    if lightning_bar and not _is_terminal(stream):
        trainer.callbacks[trainer.callbacks.index(bar)] = EpochLines(stream)
    mode = getattr(model, "mode", "max")
    summary = FitSummary(
        getattr(model, "monitor", None) or "val/acc",
        mode if mode in ("max", "min") else "max",
        stream,
    )
    trainer.callbacks.insert(0, summary)
