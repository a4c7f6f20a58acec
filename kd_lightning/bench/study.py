"""Studies: run a list of experiment configs over several seeds and tabulate the results.

``kd-lightning study <study.yaml>`` (or :func:`run_study`). The parts, one module each:

- :mod:`~kd_lightning.bench.study_file`: the study file, checked as it is read;
- :mod:`~kd_lightning.bench.plan`: every (run, seed) resolved to a config, folder and status;
- :mod:`~kd_lightning.bench.preflight`: every run built and checked before anything trains;
- :mod:`~kd_lightning.bench.run`: one run built (any LightningModule and LightningDataModule)
  and fitted;
- :mod:`~kd_lightning.bench.evaluate`: test accuracy, agreement, latency of a finished run;
- :mod:`~kd_lightning.bench.report` and :mod:`~kd_lightning.bench.plots`: the table and figure.

Resuming: a rerun skips every run whose ``result.json`` matches its resolved config; a run that
was interrupted continues from its ``last.ckpt`` (written after every epoch). So Ctrl-C (or a
crash, or a killed job) and the same command again continue where it stopped.

Safety: a folder that holds a *finished* result of another config (the study file, a config or
a teacher changed) is never replaced silently: the study refuses before anything trains and
names ``--overwrite``. Results are written atomically. The study's table (``results.*`` in the
output folder) shows every finished run of the study as its file defines it, so ``--only`` and
a subset of ``--seeds`` add to it. A quick check (``--set``, or seeds the file does not list)
writes its table and figure to ``<output_dir>/quick-checks/<hash>/``, marked as such, never
over the study's own.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from kd_lightning.bench.callbacks import (
    BestValSnapshot,
    ResumableEpochs,
    StudyProgress,
    format_seconds,
)
from kd_lightning.bench.evaluate import (
    agreement_source,
    evaluate,
    latency_per_sample_ms,
    val_is_test,
)
from kd_lightning.bench.files import atomic_write_text
from kd_lightning.bench.plan import (
    CHECKPOINT_NAME,
    LAST_NAME,
    PARTIAL_NAME,
    RESULT_NAME,
    PlannedRun,
    digest,
    has_parent,
    plan_study,
    resolve_config,
    set_dotted,
)
from kd_lightning.bench.plots import curves_from_results
from kd_lightning.bench.preflight import PreflightError, preflight
from kd_lightning.bench.report import summarise, write_report
from kd_lightning.bench.run import execute_run, quiet_lightning
from kd_lightning.bench.study_file import Study, StudyError, StudyRun, check_seeds
from kd_lightning.bench.tracking import StudyTracker, WandbSettings, job_type
from kd_lightning.cli_errors import EXIT_USAGE, TRACEBACK_ENV, TRACEBACK_FLAG, wants_traceback

__all__ = [
    "RESULT_HOOKS",
    "PreflightError",
    "Study",
    "StudyError",
    "StudyOverwriteError",
    "StudyResults",
    "StudyRun",
    "execute_run",
    "has_parent",
    "main",
    "plan_study",
    "quick_check_label",
    "quiet_lightning",
    "resolve_config",
    "run_study",
    "set_dotted",
    "study_table_results",
]

QUICK_CHECKS = "quick-checks"

ResultHook = Callable[[torch.nn.Module, Any, dict[str, Any]], dict[str, Any]]
RESULT_HOOKS: list[ResultHook] = []
"""Functions ``(student, datamodule, result) -> extra fields`` called after each run's evaluation;
their fields go into ``result.json`` (e.g. a compression report). Append to register one."""


class StudyOverwriteError(StudyError):
    """The output folder holds finished results of another config; nothing was changed."""


class StudyResults(list):
    """The per-(run, seed) results of a study (a list of dicts), with the table rows and files.

    Attributes:
        rows: the table rows (:func:`~kd_lightning.bench.report.summarise`).
        paths: ``markdown``, ``csv`` and ``png`` files written.
        output_dir: the study's output folder.
        quick_check: how this run differs from the study file (``None`` for the study itself).
    """

    rows: list[dict[str, Any]]
    paths: dict[str, Path]
    output_dir: Path
    quick_check: str | None = None


def quick_check_label(
    study: Study,
    seeds: Sequence[int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> str | None:
    """How a run of ``study`` differs from the study as its file defines it, or ``None``.

    ``--set`` changes configs, and seeds the file does not list are not the study's: both make
    a quick check. ``--only`` and a subset of the file's seeds choose what trains now; they are
    not quick checks (the study's table then shows every finished run of the study).
    """
    parts = []
    if overrides:
        parts.append("--set " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    foreign = [s for s in seeds or [] if s not in study.seeds]
    if foreign:
        parts.append("--seeds " + " ".join(str(s) for s in seeds))
    return "; ".join(parts) or None


def study_table_results(study: Study) -> tuple[list[dict[str, Any]], list[str]]:
    """Results of every finished (run, seed) of ``study`` as its file defines it (all runs,
    its seeds, no overrides), and the labels of those not finished yet."""
    plan = plan_study(study, study.ordered_runs())
    done = [json.loads((p.run_dir / RESULT_NAME).read_text()) for p in plan if p.status == "done"]
    return done, [p.label for p in plan if p.status != "done"]


def _refuse_stale(plan: list[PlannedRun], output_dir: Path) -> None:
    stale = [item for item in plan if item.status == "stale"]
    if not stale:
        return
    listed = "\n".join(f"  - {item.label}: {item.run_dir}" for item in stale)
    raise StudyOverwriteError(
        f"{output_dir} holds finished results of another config for {len(stale)} run(s) (a "
        "config, an override or a teacher changed since they ran); nothing was changed:\n"
        f"{listed}\nTo replace them rerun with --overwrite (Python: overwrite=True); to keep "
        "them, use another --output-dir."
    )


def _prepare_run_dir(item: PlannedRun, resume: Path | None) -> None:
    run_dir = item.run_dir
    if item.status == "stale":  # --overwrite: the old result goes as a whole
        shutil.rmtree(run_dir)
    elif resume is None:
        shutil.rmtree(run_dir / "logs", ignore_errors=True)  # stale logs of an old config
        (run_dir / LAST_NAME).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / PARTIAL_NAME, json.dumps({"config_digest": item.digest}))


def run_study(
    study: str | Path | Study,
    seeds: Sequence[int] | None = None,
    output_dir: str | Path | None = None,
    only: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    wandb: WandbSettings | bool | dict | None = None,
    dry_run: bool = False,
    echo: bool = True,
    epoch_lines: int | None = None,
    overwrite: bool = False,
) -> StudyResults:
    """Run (or continue) a study; return its results and write the table and figure.

    Before anything trains, every run still to do is built and checked on an example batch
    (:func:`~kd_lightning.bench.preflight.preflight`), and a folder holding finished results of
    another config is refused unless ``overwrite``.

    Args:
        study: a study file, or a :class:`Study` built in Python.
        seeds: replace the study's seeds (a quick check if some are not the file's).
        output_dir: replace the study's output folder.
        only: run only these runs (and the runs they need).
        overrides: ``{dotted.key: value}`` set in every run whose config has the key's parent;
            a quick check.
        wandb: W&B settings (``True``: defaults); replaces the study's ``wandb`` key.
        dry_run: print the plan (which runs are done, resumable, to do or stale) and stop.
        echo: print progress and the table.
        epoch_lines: off a terminal, print a progress line every this many epochs (``None``:
            every epoch; 0: none). On a terminal one live line shows the current epoch.
        overwrite: replace finished results of another config instead of refusing.

    Raises:
        StudyError: the study cannot start as written (file, options, a run's preflight, or
            finished results in the way); raised before anything trains.
    """
    from kd_lightning.teachers import load_student

    study = Study.from_file(study) if not isinstance(study, Study) else copy.copy(study)
    quick_check = quick_check_label(study, seeds, overrides)
    file_seeds = list(study.seeds)
    if seeds is not None:
        study.seeds = check_seeds(list(seeds), "--seeds")
    if output_dir is not None:
        study.output_dir = Path(output_dir)
    if wandb is not None:
        study.wandb = wandb if isinstance(wandb, WandbSettings) else WandbSettings.from_spec(wandb)
    runs = study.select(only)
    say = print if echo else (lambda *a, **k: None)
    plan = plan_study(study, runs, overrides)
    # The agreement reference (the study's teacher) is looked up among all the study's runs, so
    # `--only student` still fills agreement from a teacher that finished earlier.
    every_run = plan if not only else plan_study(study, study.ordered_runs(), overrides)
    total = len(plan)
    if dry_run:
        for position, item in enumerate(plan, start=1):
            say(f"[{position}/{total}] {item.label}: {item.status} -> {item.run_dir}")
        results = StudyResults()
        results.rows, results.paths, results.output_dir = [], {}, study.output_dir
        results.quick_check = quick_check
        return results
    if not overwrite:
        _refuse_stale(plan, study.output_dir)
    preflight(plan, study.needed, say=say)

    tracker = None
    if study.wandb is not None:
        group = f"{study.name}-{digest(str(study.output_dir.resolve()))[:6]}"
        tracker = StudyTracker(study.wandb, group, study.output_dir / "wandb")
    sweep = "WANDB_SWEEP_ID" in os.environ  # under `wandb agent`: log only the swept runs
    needed = study.needed
    todo = sum(item.status != "done" for item in plan)
    results = StudyResults()
    started = time.perf_counter()
    fitted_seconds: list[float] = []
    for position, item in enumerate(plan, start=1):
        run, seed, run_dir = item.run, item.seed, item.run_dir
        prefix = f"[{position}/{total}] {item.label}"
        if item.status == "done":
            previous = json.loads((run_dir / RESULT_NAME).read_text())
            results.append(previous)
            say(f"{prefix}: done before, skipped (test acc {previous['test_acc']:.4f})", flush=True)
            continue
        remaining_after = todo - len(fitted_seconds) - 1
        mean_seconds = sum(fitted_seconds) / len(fitted_seconds) if fitted_seconds else math.nan
        snapshot = BestValSnapshot("val/acc", "max")
        callbacks: list[Any] = [snapshot]
        if echo:
            eta = mean_seconds * remaining_after if remaining_after else 0.0
            callbacks.append(StudyProgress(prefix, study_eta=eta, every_n_epochs=epoch_lines))
        last = run_dir / LAST_NAME
        if study.checkpoint_every_n_epochs:
            callbacks.append(ResumableEpochs(last, study.checkpoint_every_n_epochs))
        resume = last if item.status == "partial" else None
        _prepare_run_dir(item, resume)
        model_class = str((item.config.get("model") or {}).get("class_path", ""))
        job = run.job_type or job_type(model_class, run.name, needed)
        wandb_run = None
        loggers = []
        if tracker is not None and (not sweep or item.set_keys):
            started_run = tracker.start(
                name=f"{run.name}-seed{seed}", job=job, config=item.config, run_dir=run_dir
            )
            if started_run is not None:
                wandb_run, logger = started_run
                loggers.append(logger)
        if resume is not None:
            say(f"{prefix}: resuming from {resume}", flush=True)
        tic = time.perf_counter()
        try:
            out = execute_run(item.config, run_dir, callbacks, loggers, ckpt_path=resume)
        except BaseException:
            if wandb_run is not None:
                with contextlib.suppress(Exception):
                    wandb_run.finish(exit_code=1)
            raise
        seconds = time.perf_counter() - tic
        module, datamodule = out["module"], out["datamodule"]
        source = agreement_source(run.needs, run.name, study.reference_teacher)
        reference = None
        if source is not None:
            trained = {p.seed: p.run_dir for p in every_run if p.run.name == source}
            one = len(trained) == 1  # a reference trained once serves every seed
            reference_dir = next(iter(trained.values())) if one else trained.get(seed)
            if reference_dir is not None and (reference_dir / CHECKPOINT_NAME).is_file():
                reference = load_student(reference_dir / CHECKPOINT_NAME)
            else:
                say(
                    f"{prefix}: no finished {source!r} (seed {seed}): agreement left empty; "
                    f"run it (e.g. --only {source} {run.name}) to fill it",
                    flush=True,
                )
                source = None
        student = module.student
        best_student = snapshot.best_student(student)
        result: dict[str, Any] = {
            "run": run.name,
            "seed": seed,
            "method": type(module).__name__,
            "job_type": job,
            "labeled_fraction": getattr(datamodule, "labeled_fraction", None),
            **evaluate(student, datamodule, reference, best_student),
            "agreement_with": source,
            "best_epoch": snapshot.best_epoch,
            "best_val_acc": snapshot.best_value,
            "last_val_acc": snapshot.last_value,
            "val_acc_curve": [list(point) for point in snapshot.history],
            "val_is_test": val_is_test(datamodule),
            "epochs": out["trainer"].current_epoch,
            "params": sum(p.numel() for p in student.parameters()),
            "latency_ms": latency_per_sample_ms(student, datamodule) if study.latency else None,
            "seconds": round(seconds, 2),
            "resumed": resume is not None,
            "checkpoint": str(out["checkpoint"]),
            "config_digest": item.digest,
        }
        for hook in RESULT_HOOKS:
            result.update(hook(student, datamodule, result) or {})
        atomic_write_text(run_dir / RESULT_NAME, json.dumps(result, indent=2))
        last.unlink(missing_ok=True)
        (run_dir / PARTIAL_NAME).unlink(missing_ok=True)
        if wandb_run is not None:
            tracker.finish(wandb_run, result=result, checkpoint=out["checkpoint"], name=run.name)
        results.append(result)
        fitted_seconds.append(seconds)
        left = todo - len(fitted_seconds)
        eta = sum(fitted_seconds) / len(fitted_seconds) * left
        best = (
            f" / best-val {result['test_acc_best_val']:.4f} (epoch {result['best_epoch']})"
            if "test_acc_best_val" in result
            else ""
        )
        agreement = f", agreement {result['agreement']:.4f}" if "agreement" in result else ""
        say(
            f"{prefix}: test acc last {result['test_acc']:.4f}{best}{agreement} in {seconds:.1f}s"
            f" | study ETA {format_seconds(eta)} (elapsed {format_seconds(time.perf_counter() - started)})",
            flush=True,
        )
    notes: list[str] = []
    report_dir = study.output_dir
    if quick_check is None:  # the study's own table: every finished run of the study as defined
        table_study = copy.copy(study)
        table_study.seeds = file_seeds
        table_results, missing = study_table_results(table_study)
        table_runs = table_study.ordered_runs()
        if missing:
            shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
            notes.append(
                f"Incomplete: {len(missing)} (run, seed) pair(s) of the study not finished yet "
                f"({shown}); rerun the study to complete the table."
            )
    else:
        variation = {"set": overrides or {}, "only": sorted(only or []), "seeds": study.seeds}
        report_dir = study.output_dir / QUICK_CHECKS / digest(variation)[:8]
        table_results, table_runs = list(results), runs
    rows = summarise(
        table_results,
        [r.name for r in table_runs],
        baselines={r.name: study.baseline_of(r) for r in table_runs},
        published={r.name: r.published for r in table_runs if r.published},
    )
    paths = write_report(
        rows,
        report_dir,
        title=study.name,
        notes=notes,
        echo=echo,
        curves=curves_from_results(table_results),
        quick_check=quick_check,
    )
    if tracker is not None:
        tracker.log_table(rows, study_name=study.name, plot=paths.get("png"))
        tracker.close(say)
    results.rows, results.paths, results.output_dir = rows, paths, study.output_dir
    results.quick_check = quick_check
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-lightning study",
        description="Run a study (configs x seeds) and write its results table and figure. "
        "Rerunning the same command skips finished runs and resumes interrupted ones.",
    )
    parser.add_argument("study", help="study YAML file, e.g. experiments/digits/study_core.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--output-dir", help="override the study's output_dir")
    parser.add_argument("--only", nargs="+", help="run only these runs (and what they need)")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run whose config has the key's parent, e.g. "
        "trainer.max_epochs=2 (value parsed as YAML). A quick check: its table goes to "
        f"<output_dir>/{QUICK_CHECKS}/<hash>/, marked as such",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace finished results of another config in the output folder (default: refuse)",
    )
    parser.add_argument(
        "--wandb", action="store_true", help="log every run to W&B (grouped, with job types)"
    )
    parser.add_argument("--wandb-project", help="W&B project (implies --wandb)")
    parser.add_argument(
        "--wandb-mode", choices=["offline", "online", "disabled"], help="W&B mode (implies --wandb)"
    )
    parser.add_argument(
        "--log-model", action="store_true", help="upload each final.ckpt as a W&B artifact"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="show which runs are done / resumable / to do / stale",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--epoch-lines",
        type=int,
        default=None,
        metavar="N",
        help="off a terminal (logs, batch jobs), print a progress line every N epochs "
        "(default: every epoch; 0: none). On a terminal one live line shows the current epoch",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of a study error"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``kd-lightning study``: parse ``argv`` (without the ``study`` word) and run the study.

    A study that cannot start (:class:`StudyError`) prints its message alone and exits with
    status 2, as every ``kd-lightning`` command does; ``--traceback`` (or
    ``KD_LIGHTNING_TRACEBACK=1``) shows the full traceback instead.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        wandb: WandbSettings | None = None
        if args.wandb or args.wandb_project or args.wandb_mode or args.log_model:
            wandb = Study.from_file(args.study).wandb or WandbSettings()
            if args.wandb_project:
                wandb.project = args.wandb_project
            if args.wandb_mode:
                wandb.mode = args.wandb_mode
            if args.log_model:
                wandb.log_model = True
        if args.threads:
            torch.set_num_threads(args.threads)
        run_study(
            args.study,
            seeds=args.seeds,
            output_dir=args.output_dir,
            only=args.only,
            overrides=overrides,
            wandb=wandb,
            dry_run=args.dry_run,
            epoch_lines=args.epoch_lines,
            overwrite=args.overwrite,
        )
    except StudyError as error:
        if args.traceback or wants_traceback([])[0]:
            raise
        sys.stdout.flush()
        print(f"kd-lightning study: error: {error}", file=sys.stderr)
        print(
            f"(the traceback: rerun with {TRACEBACK_FLAG}, or set {TRACEBACK_ENV}=1)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_USAGE) from None
