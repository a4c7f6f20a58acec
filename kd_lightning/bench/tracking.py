"""Weights & Biases tracking of a study: one W&B run per (run, seed), one group per study.

Every run logs its full resolved config (the ``config.yaml`` the study wrote), every loss term
and metric (through Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`), its test
results in the run summary and, with ``log_model``, the student checkpoint as a ``model``
artifact. Runs of one study share a group (the study name plus a digest of the study, so a
resumed study continues in the same group) and a job type:

- ``teacher``: a run other runs ``need`` (its checkpoint teaches them);
- ``baseline``: a supervised run (``Supervised``) that no run needs (the student alone);
- ``distill``: everything else.

After the last run, a ``summary`` run of the group holds the study table as a W&B Table and
the plot, and the study prints where the runs are (with ``wandb sync <folders>`` for offline
runs). When wandb cannot start (not installed, no network in online mode, a bad entity),
the study warns once and goes on with CSV logs only.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOB_TYPES = ("teacher", "baseline", "distill")


@dataclass
class WandbSettings:
    """How a study logs to W&B (study-file key ``wandb:`` or ``kd-lightning study --wandb``).

    Args:
        project: W&B project.
        entity: W&B entity (user or team); default: yours.
        mode: ``"offline"`` (no network; ``wandb sync`` later), ``"online"`` or ``"disabled"``.
            Default: the ``WANDB_MODE`` environment variable, else ``"online"``.
        log_model: upload each run's ``final.ckpt`` as a ``model`` artifact.
        group: W&B group; default ``<study name>-<study digest>``.
        tags: tags of every run.
    """

    project: str = "kd-lightning"
    entity: str | None = None
    mode: str | None = None
    log_model: bool = False
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: Any) -> WandbSettings | None:
        if spec in (None, False):
            return None
        if spec is True:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError(f"the study key `wandb` must be true/false or a mapping, got {spec!r}")
        unknown = set(spec) - {"project", "entity", "mode", "log_model", "group", "tags"}
        if unknown:
            raise ValueError(
                f"unknown keys under `wandb`: {sorted(unknown)}; valid: project, entity, mode, "
                "log_model, group, tags"
            )
        settings = cls(**spec)
        if settings.mode not in (None, "offline", "online", "disabled"):
            raise ValueError(
                f"wandb.mode must be offline, online or disabled, got {settings.mode!r}"
            )
        return settings


def job_type(method_class_path: str, name: str, needed: set[str]) -> str:
    """``teacher`` if another run needs ``name``; ``baseline`` for a supervised run; else ``distill``."""
    if name in needed:
        return "teacher"
    if method_class_path.rsplit(".", 1)[-1] == "Supervised":
        return "baseline"
    return "distill"


def artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, ``-``, ``_`` and ``.`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


class StudyTracker:
    """Starts and finishes the W&B runs of one study; degrades to CSV when wandb fails.

    Args:
        settings: the study's W&B settings.
        group: the W&B group of every run.
        directory: where W&B writes its files (``<output_dir>/wandb``).
    """

    def __init__(self, settings: WandbSettings, group: str, directory: Path) -> None:
        self.settings = settings
        self.group = settings.group or group
        self.directory = Path(directory)
        self.failed: str | None = None
        self.run_folders: list[Path] = []
        """The folder of every run this tracker started (``.../wandb/offline-run-*``)."""
        self.offline = False

    def _warn(self, error: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(error).__name__}: {error}"
            message = (
                f"W&B could not start ({self.failed}); the study goes on with CSV logs only "
                "(metrics.csv in each run folder, results.csv for the table). Set WANDB_MODE="
                "offline to log without a network, or drop --wandb."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            print(f"warning: {message}", flush=True)

    def start(
        self, *, name: str, job: str, config: dict[str, Any], run_dir: Path
    ) -> tuple[Any, Any] | None:
        """Start one run; return ``(wandb_run, WandbLogger)`` or ``None`` when W&B is unavailable."""
        if self.failed is not None:
            return None
        try:
            import wandb
            from lightning.pytorch.loggers import WandbLogger

            self.directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.settings.project,
                entity=self.settings.entity,
                group=self.group,
                job_type=job,
                name=name,
                dir=str(self.directory),
                config=config,
                tags=list(self.settings.tags) or None,
                mode=self.settings.mode or os.environ.get("WANDB_MODE") or "online",
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=60, silent=True, console="off"),
            )
            run.config.update({"study_run_dir": str(run_dir)}, allow_val_change=True)
            if getattr(run, "dir", None):
                self.run_folders.append(Path(run.dir).parent)  # run.dir: <run folder>/files
                self.offline = bool(getattr(run, "offline", False))
            return run, WandbLogger(experiment=run, log_model=False)
        except Exception as error:  # noqa: BLE001 - any failure to start degrades to CSV
            self._warn(error)
            return None

    def finish(
        self, run: Any, *, result: dict[str, Any], checkpoint: Path | None, name: str
    ) -> None:
        """Summary metrics, optional checkpoint artifact, then close the run."""
        try:
            summary = {
                f"study/{k}": v
                for k, v in result.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            run.summary.update(summary)
            if self.settings.log_model and checkpoint is not None and checkpoint.is_file():
                import wandb

                artifact = wandb.Artifact(
                    artifact_name(f"model-{name}"),
                    type="model",
                    metadata={k: v for k, v in result.items() if k != "checkpoint"},
                )
                artifact.add_file(str(checkpoint), name="final.ckpt")
                run.log_artifact(artifact, aliases=["latest", f"seed{result.get('seed')}"])
            run.finish()
        except Exception as error:  # noqa: BLE001
            self._warn(error)

    def log_table(
        self, rows: list[dict[str, Any]], *, study_name: str, plot: Path | None = None
    ) -> None:
        """A ``summary`` run of the group holding the study table (and plot)."""
        if not rows:
            return
        started = self.start(
            name=f"{study_name}-table",
            job="summary",
            config={"study": study_name},
            run_dir=self.directory,
        )
        if started is None:
            return
        run, _ = started
        try:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(
                columns=columns, data=[[row.get(c) for c in columns] for row in rows]
            )
            payload: dict[str, Any] = {"study/results": table}
            if plot is not None and plot.is_file():
                payload["study/plot"] = wandb.Image(str(plot))
            run.log(payload)
            run.finish()
        except Exception as error:  # noqa: BLE001
            self._warn(error)

    def where(self) -> list[str]:
        """Lines saying where this study's W&B runs are and, offline, how to upload them."""
        if not self.run_folders:
            return []
        parents = sorted({str(folder.parent) for folder in self.run_folders})
        count = len(self.run_folders)
        if not self.offline:
            project = self.settings.project
            return [f"W&B: {count} run(s) in group {self.group!r} of project {project!r}"]
        lines = [f"W&B: {count} offline run(s) in {', '.join(parents)}"]
        pattern = " ".join(f"{parent}/offline-run-*" for parent in parents)
        lines.append(f"  upload them with: wandb sync {pattern}")
        return lines

    def close(self, say: Any = None) -> None:
        """Shut the W&B service down so every run file is complete on disk (offline readers);
        then ``say`` (e.g. ``print``) where the runs are (:meth:`where`)."""
        if self.failed is None:
            with contextlib.suppress(Exception):
                import wandb

                wandb.teardown()
        if say is not None:
            for line in self.where():
                say(line, flush=True)
