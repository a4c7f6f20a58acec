"""Studies: run a list of experiment configs over several seeds and tabulate the results.

A study file (YAML)::

    name: digits
    seeds: [0, 1, 2]
    output_dir: results/digits          # relative to the working directory
    reference_teacher: teacher          # agreement of runs that need no teacher is measured to it
    baseline: student_alone             # default row the delta column compares with
    wandb: {project: kd-lightning, mode: offline, log_model: false}   # optional (or --wandb)
    runs:
      - name: teacher
        config: teacher.yaml            # relative to the study file (or an inline mapping)
      - name: student_alone@10%
        config: student_alone.yaml
        overrides: {data.init_args.labeled_fraction: 0.1}
      - name: hinton_kd@10%
        config: hinton_kd.yaml
        overrides: {data.init_args.labeled_fraction: 0.1}
        needs: {model.init_args.teacher.init_args.checkpoint_path: teacher}
        baseline: student_alone@10%     # per-run baseline (null: no delta)
        published: {test_acc: 73.33, source: "CRD Table 1"}   # optional: a paper's figure
      - name: hinton_kd                 # a grid: one run per combination, named hinton_kd[T=2,...]
        config: hinton_kd.yaml
        needs: {model.init_args.teacher.init_args.checkpoint_path: teacher}
        grid:
          T: {key: model.init_args.loss_terms.0.init_args.loss.init_args.temperature, values: [2, 4]}

``needs`` maps a config key to another run whose final checkpoint (same seed) is put there, so
teachers are trained first; a run's cache digest includes the digests of the runs it needs, so
retraining a teacher retrains its students. Each run writes ``<output_dir>/runs/<name>/seed<k>/``
with the resolved ``config.yaml``, CSV logs, ``final.ckpt`` and ``result.json``.

Resuming: a rerun skips every run whose ``result.json`` matches its resolved config; a run that
was interrupted mid-way continues from its ``last.ckpt`` (written after every epoch). So
Ctrl-C (or a crash, or a killed job) and the same command again continue where it stopped.

The table (:mod:`kd_lightning.bench.report`): last-epoch and best-val-epoch test accuracy (mean
± std over seeds), delta to the baseline, agreement with the teacher, parameters, CPU latency
per sample, published figures; written as ``results.md``, ``results.csv`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
from kd_lightning.bench.report import summarise, write_report
from kd_lightning.bench.tracking import StudyTracker, WandbSettings, job_type

CHECKPOINT_NAME = "final.ckpt"
RESULT_NAME = "result.json"
LAST_NAME = "last.ckpt"
PARTIAL_NAME = "partial.json"

STUDY_KEYS = {
    "name", "seeds", "output_dir", "runs", "reference_teacher", "baseline", "wandb",
    "checkpoint_every_n_epochs", "latency", "description",
}  # fmt: skip
RUN_KEYS = {"name", "config", "overrides", "needs", "baseline", "published", "job_type", "grid"}

ResultHook = Callable[[torch.nn.Module, Any, dict[str, Any]], dict[str, Any]]
RESULT_HOOKS: list[ResultHook] = []
"""Functions ``(student, datamodule, result) -> extra fields`` called after each run's evaluation;
their fields go into ``result.json`` (e.g. a compression report). Append to register one."""

_UNSET = object()


@dataclass
class StudyRun:
    """One row of a study: a config (file or mapping), its overrides, and the runs it needs.

    Args:
        name: row name (unique in the study).
        config: a LightningCLI YAML file, or the config itself as a mapping.
        overrides: ``{dotted.key: value}`` applied to the config.
        needs: ``{dotted.key: run name}``: that run's final checkpoint (same seed) goes there.
        baseline: run the delta column compares with (default: the study's ``baseline``;
            ``None`` for no delta).
        published: a paper's figure for this row, ``{"test_acc": percent, "source": ...}``.
        job_type: W&B job type; default derived (teacher / baseline / distill).
    """

    name: str
    config: Path | dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    needs: dict[str, str] = field(default_factory=dict)
    baseline: Any = _UNSET
    published: dict[str, Any] | None = None
    job_type: str | None = None

    def load_config(self) -> dict[str, Any]:
        if isinstance(self.config, dict):
            return copy.deepcopy(self.config)
        return yaml.safe_load(Path(self.config).read_text()) or {}


def _published(value: Any, run: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return {"test_acc": float(value), "source": ""}
    if isinstance(value, dict) and "test_acc" in value:
        return {"source": "", **value, "test_acc": float(value["test_acc"])}
    raise ValueError(f"run {run!r}: `published` must be a number or {{test_acc: ..., source: ...}}")


def _expand_grid(entry: dict[str, Any]) -> list[dict[str, Any]]:
    grid = entry.get("grid")
    if not grid:
        return [entry]
    axes = []
    for label, axis in grid.items():
        if not (isinstance(axis, dict) and "key" in axis and isinstance(axis.get("values"), list)):
            raise ValueError(
                f"run {entry['name']!r}: grid axis {label!r} needs `key` (a dotted config key) and "
                "`values` (a list)"
            )
        axes.append((label, axis["key"], axis["values"]))
    expanded = []
    for combination in itertools.product(*(values for _, _, values in axes)):
        overrides = dict(entry.get("overrides") or {})
        tags = []
        for (label, key, _), value in zip(axes, combination, strict=True):
            overrides[key] = value
            tags.append(f"{label}={value}")
        expanded.append(
            {
                **{k: v for k, v in entry.items() if k != "grid"},
                "name": f"{entry['name']}[{','.join(tags)}]",
                "overrides": overrides,
            }
        )
    return expanded


@dataclass
class Study:
    """A parsed study (from a file, a mapping, or built in Python for notebooks)."""

    name: str
    seeds: list[int]
    output_dir: Path
    runs: list[StudyRun]
    reference_teacher: str | None = None
    baseline: str | None = None
    wandb: WandbSettings | None = None
    checkpoint_every_n_epochs: int = 1
    latency: bool = True
    description: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> Study:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study file {str(path)!r} does not exist")
        spec = yaml.safe_load(path.read_text()) or {}
        spec.setdefault("name", path.stem)
        spec.setdefault("output_dir", f"results/{path.stem}")
        return cls.from_dict(spec, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(
        cls, spec: dict[str, Any], base_dir: str | Path = ".", source: str = "the study"
    ) -> Study:
        """A study from a mapping (the YAML file's content); config paths are relative to ``base_dir``."""
        unknown = set(spec) - STUDY_KEYS
        if unknown:
            raise ValueError(
                f"unknown keys in {source}: {sorted(unknown)}; valid: {sorted(STUDY_KEYS)}"
            )
        runs = []
        for raw in spec.get("runs") or []:
            bad = set(raw) - RUN_KEYS
            if bad:
                raise ValueError(
                    f"run {raw.get('name')!r} in {source} has unknown keys {sorted(bad)}; "
                    f"valid: {sorted(RUN_KEYS)}"
                )
            if "name" not in raw or "config" not in raw:
                raise ValueError(f"every run in {source} needs `name` and `config`, got {raw}")
            for entry in _expand_grid(raw):
                config = entry["config"]
                if not isinstance(config, dict):
                    config = (Path(base_dir) / config).resolve()
                    if not config.is_file():
                        raise FileNotFoundError(
                            f"run {entry['name']!r}: config {str(config)!r} does not exist"
                        )
                runs.append(
                    StudyRun(
                        name=entry["name"],
                        config=config,
                        overrides=dict(entry.get("overrides") or {}),
                        needs=dict(entry.get("needs") or {}),
                        baseline=entry["baseline"] if "baseline" in entry else _UNSET,
                        published=_published(entry.get("published"), entry["name"]),
                        job_type=entry.get("job_type"),
                    )
                )
        if not runs:
            raise ValueError(f"{source} lists no runs")
        study = cls(
            name=spec.get("name", "study"),
            seeds=list(spec.get("seeds") or [0]),
            output_dir=Path(spec.get("output_dir", f"results/{spec.get('name', 'study')}")),
            runs=runs,
            reference_teacher=spec.get("reference_teacher"),
            baseline=spec.get("baseline"),
            wandb=WandbSettings.from_spec(spec.get("wandb")),
            checkpoint_every_n_epochs=int(spec.get("checkpoint_every_n_epochs", 1)),
            latency=bool(spec.get("latency", True)),
            description=spec.get("description", ""),
        )
        study.ordered_runs()  # validates names and dependencies now
        return study

    def baseline_of(self, run: StudyRun) -> str | None:
        name = self.baseline if run.baseline is _UNSET else run.baseline
        return None if name == run.name else name

    @property
    def needed(self) -> set[str]:
        """Names of the runs some other run needs (the teachers)."""
        return {dep for run in self.runs for dep in run.needs.values()}

    def ordered_runs(self) -> list[StudyRun]:
        """Runs in dependency order (every run after the runs it needs), else file order."""
        by_name = {r.name: r for r in self.runs}
        if len(by_name) != len(self.runs):
            names = [r.name for r in self.runs]
            raise ValueError(
                f"run names in a study must be unique; repeated: "
                f"{sorted({n for n in names if names.count(n) > 1})}"
            )
        for run in self.runs:
            missing = [n for n in run.needs.values() if n not in by_name]
            if missing:
                raise ValueError(
                    f"run {run.name!r} needs {missing}, which the study does not define"
                )
            base = self.baseline_of(run)
            if base is not None and base not in by_name:
                raise ValueError(
                    f"run {run.name!r} has baseline {base!r}, which the study does not define"
                )
        if self.reference_teacher is not None and self.reference_teacher not in by_name:
            raise ValueError(
                f"reference_teacher {self.reference_teacher!r} is not a run of the study"
            )
        ordered: list[StudyRun] = []
        visiting: set[str] = set()

        def visit(run: StudyRun) -> None:
            if run in ordered:
                return
            if run.name in visiting:
                raise ValueError(
                    f"the study's runs depend on each other in a cycle through {run.name!r}"
                )
            visiting.add(run.name)
            for dep in run.needs.values():
                visit(by_name[dep])
            visiting.discard(run.name)
            ordered.append(run)

        for run in self.runs:
            visit(run)
        return ordered


def _walk(config: Any, parts: list[str]) -> tuple[bool, Any]:
    node = config
    for part in parts:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return False, None
            node = node[int(part)]
        elif isinstance(node, dict) and part in node and node[part] is not None:
            node = node[part]
        else:
            return False, None
    return True, node


def has_parent(config: dict[str, Any], key: str) -> bool:
    """Whether the dotted ``key``'s parent exists in ``config`` (``trainer`` for ``trainer.x``)."""
    found, node = _walk(config, key.split(".")[:-1])
    return found and isinstance(node, (dict, list))


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(cfg, "model.init_args.teachers.1.init_args.checkpoint_path", p)``."""
    parts = key.split(".")
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _strip_checkpoint_callbacks(trainer: dict[str, Any]) -> None:
    callbacks = trainer.get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    kept = [c for c in callbacks if "ModelCheckpoint" not in str(c.get("class_path", ""))]
    trainer["callbacks"] = kept or None


def resolve_config(
    study: Study, run: StudyRun, seed: int, run_dir: Path, checkpoints: dict[str, Path]
) -> dict[str, Any]:
    """The run's config for one seed: overrides, dependencies, seed, and the study's logging."""
    config = run.load_config()
    for key, value in run.overrides.items():
        set_dotted(config, key, value)
    for key, dep in run.needs.items():
        set_dotted(config, key, str(checkpoints[dep]))
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    _strip_checkpoint_callbacks(trainer)
    trainer.update(
        default_root_dir=str(run_dir),
        enable_checkpointing=False,  # the study writes last.ckpt / final.ckpt itself
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # W&B for studies comes from the study (`wandb:` / --wandb): one logger per run, grouped.
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "logs", "version": ""},
    }
    return config


def _digest(config: Any) -> str:
    return hashlib.sha256(yaml.safe_dump(config, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """The study prints one line per run; Lightning's per-run banners and known warnings go."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI(args=...) warns when the process has its own arguments
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            # Expected: a frozen teacher in eval mode; Lightning's own LeafSpec deprecation.
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists.*")
            yield
    finally:
        sys.argv = argv
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --------------------------------------------------------------------------- evaluation
def _test_batches(datamodule: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from kd_lightning.methods.base import normalise_batch

    datamodule.setup("test")
    for batch in datamodule.test_dataloader():
        if hasattr(datamodule, "transform_batch"):
            batch = datamodule.transform_batch(batch, "test")
        batch = normalise_batch(batch)
        yield batch["input"], batch["target"]


@torch.no_grad()
def _predictions(models: list[torch.nn.Module | None], datamodule: Any):
    from kd_lightning.teachers import output_logits

    for model in models:
        if model is not None:
            model.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    targets = []
    for inputs, target in _test_batches(datamodule):
        targets.append(target)
        for i, model in enumerate(models):
            if model is not None:
                outs[i].append(output_logits(model(inputs)).argmax(-1))
    return [torch.cat(o) if o else None for o in outs], torch.cat(targets)


def _val_is_test(datamodule: Any) -> bool:
    """Whether validation runs on the test split (the CIFAR protocol with ``val_size: 0``)."""
    if not hasattr(datamodule, "raw_split"):
        return False
    (vx, vy), (tx, ty) = datamodule.raw_split("val"), datamodule.raw_split("test")
    return vx is tx or (vx.shape == tx.shape and torch.equal(vy, ty) and torch.equal(vx, tx))


def latency_per_sample_ms(student: torch.nn.Module, datamodule: Any) -> float:
    """Median CPU latency (ms) of the student's forward on one test sample, warm."""
    from kd_lightning.compression.latency import measure_latency

    inputs, _ = next(_test_batches(datamodule))
    model = copy.deepcopy(student).cpu()
    return measure_latency(model, inputs[:1].cpu(), repeats=25, warmup=5)["median_ms"]


def evaluate(
    student: torch.nn.Module,
    datamodule: Any,
    reference: torch.nn.Module | None,
    best_student: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Test accuracy of the (last-epoch) student and its best-val snapshot; top-1 agreement of
    the student with ``reference`` (its teacher)."""
    (last, best, teacher), target = _predictions([student, best_student, reference], datamodule)
    labeled = target >= 0
    result: dict[str, Any] = {"test_acc": (last == target)[labeled].float().mean().item()}
    if best is not None:
        result["test_acc_best_val"] = (best == target)[labeled].float().mean().item()
    if teacher is not None:
        result["agreement"] = (last == teacher).float().mean().item()
    return result


# --------------------------------------------------------------------------- running
def execute_run(
    config: dict[str, Any],
    run_dir: Path,
    callbacks: Sequence[Any] = (),
    extra_loggers: Sequence[Any] = (),
    ckpt_path: str | Path | None = None,
) -> dict[str, Any]:
    """Fit one resolved config in this process (optionally resuming); save ``final.ckpt``."""
    from lightning.pytorch.trainer.states import TrainerStatus

    from kd_lightning.cli import build_cli

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with quiet_lightning():
        cli = build_cli(["-c", str(config_path)], run=False)
        trainer = cli.trainer
        trainer.callbacks.extend(callbacks)
        if extra_loggers:
            trainer.loggers = [*trainer.loggers, *extra_loggers]
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        if trainer.state.status != TrainerStatus.FINISHED or trainer.interrupted:
            raise RuntimeError(
                f"the run in {str(run_dir)!r} did not finish (status {trainer.state.status}); "
                "rerun the study to continue it"
            )
        checkpoint = run_dir / CHECKPOINT_NAME
        trainer.save_checkpoint(checkpoint)
    return {
        "module": cli.model,
        "datamodule": cli.datamodule,
        "checkpoint": checkpoint,
        "trainer": trainer,
    }


@dataclass
class PlannedRun:
    """One (run, seed) of a study, resolved: where it lives, its config and whether it is done."""

    run: StudyRun
    seed: int
    run_dir: Path
    config: dict[str, Any]
    digest: str
    status: str  # "done", "partial" (resumable) or "todo"
    set_keys: list[str]

    @property
    def label(self) -> str:
        return f"{self.run.name} seed={self.seed}"


def _status(run_dir: Path, digest: str) -> str:
    result_file = run_dir / RESULT_NAME
    if result_file.is_file() and (run_dir / CHECKPOINT_NAME).is_file():
        with contextlib.suppress(ValueError):
            if json.loads(result_file.read_text()).get("config_digest") == digest:
                return "done"
    partial = run_dir / PARTIAL_NAME
    if partial.is_file() and (run_dir / LAST_NAME).is_file():
        with contextlib.suppress(ValueError):
            if json.loads(partial.read_text()).get("config_digest") == digest:
                return "partial"
    return "todo"


def plan_study(
    study: Study,
    runs: Sequence[StudyRun],
    overrides: dict[str, Any] | None = None,
) -> list[PlannedRun]:
    """Resolve every (run, seed) in dependency order, with digests that include dependencies.

    ``overrides`` (``--set``) apply to each run whose config has the key's parent; a key that
    fits no run is an error. A run changed by them lives in ``runs/<name>/set-<hash>/`` so
    several override sets (a sweep) keep their results side by side.
    """
    overrides = overrides or {}
    planned: list[PlannedRun] = []
    by_key: dict[tuple[str, int], PlannedRun] = {}
    used: set[str] = set()
    for run, seed in ((r, s) for r in runs for s in study.seeds):
        base_dir = study.output_dir / "runs" / run.name
        deps = {dep: by_key[(dep, seed)].run_dir / CHECKPOINT_NAME for dep in run.needs.values()}
        config = resolve_config(study, run, seed, base_dir / f"seed{seed}", deps)
        applied = {k: v for k, v in overrides.items() if has_parent(config, k)}
        run_dir = base_dir / f"seed{seed}"
        if applied:
            used |= set(applied)
            run_dir = base_dir / f"set-{_digest(applied)[:8]}" / f"seed{seed}"
            config = resolve_config(study, run, seed, run_dir, deps)
            for key, value in applied.items():
                set_dotted(config, key, value)
        dep_digests = {dep: by_key[(dep, seed)].digest for dep in sorted(set(run.needs.values()))}
        digest = _digest({"config": config, "needs": dep_digests})
        item = PlannedRun(
            run, seed, run_dir, config, digest, _status(run_dir, digest), list(applied)
        )
        planned.append(item)
        by_key[(run.name, seed)] = item
    unused = sorted(set(overrides) - used)
    if unused:
        raise ValueError(
            f"--set {unused}: no run's config has the parent of that key; check the key against "
            "a run's config.yaml (list items are addressed by index, e.g. loss_terms.0)"
        )
    return planned


class StudyResults(list):
    """The per-(run, seed) results of a study (a list of dicts), with the table rows and files."""

    rows: list[dict[str, Any]]
    paths: dict[str, Path]
    output_dir: Path


def _agreement_source(study: Study, run: StudyRun) -> str | None:
    deps = list(dict.fromkeys(run.needs.values()))
    source = deps[0] if deps else study.reference_teacher
    return None if source == run.name else source


def run_study(
    study: str | Path | Study,
    seeds: Sequence[int] | None = None,
    output_dir: str | Path | None = None,
    only: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    wandb: WandbSettings | bool | dict | None = None,
    dry_run: bool = False,
    echo: bool = True,
    epoch_lines: int = 0,
) -> StudyResults:
    """Run (or continue) a study; return its results and write the table and plot.

    Args:
        study: a study file, or a :class:`Study` built in Python.
        seeds: replace the study's seeds.
        output_dir: replace the study's output folder.
        only: run only these runs (and the runs they need).
        overrides: ``{dotted.key: value}`` set in every run whose config has the key's parent.
        wandb: W&B settings (``True``: defaults); replaces the study's ``wandb`` key.
        dry_run: print the plan (which runs are done, resumable or to do) and stop.
        echo: print progress and the table.
        epoch_lines: off a terminal, print a progress line every this many epochs (0: none).
    """
    from kd_lightning.teachers import load_student

    if not isinstance(study, Study):
        study = Study.from_file(study)
    else:
        study = copy.copy(study)
    if seeds is not None:
        study.seeds = list(seeds)
    if output_dir is not None:
        study.output_dir = Path(output_dir)
    if wandb is not None:
        study.wandb = wandb if isinstance(wandb, WandbSettings) else WandbSettings.from_spec(wandb)
    runs = study.ordered_runs()
    if only:
        by_name = {r.name: r for r in runs}
        wanted = set(only)
        unknown = sorted(wanted - set(by_name))
        if unknown:
            raise ValueError(f"--only {unknown}: not runs of the study; runs: {sorted(by_name)}")
        stack = list(wanted)
        while stack:  # keep the dependencies of the selected runs
            for dep in by_name[stack.pop()].needs.values():
                if dep not in wanted:
                    wanted.add(dep)
                    stack.append(dep)
        runs = [r for r in runs if r.name in wanted]
    say = print if echo else (lambda *a, **k: None)
    plan = plan_study(study, runs, overrides)
    total = len(plan)
    if dry_run:
        for position, item in enumerate(plan, start=1):
            say(f"[{position}/{total}] {item.label}: {item.status} -> {item.run_dir}")
        results = StudyResults()
        results.rows, results.paths, results.output_dir = [], {}, study.output_dir
        return results

    tracker = None
    if study.wandb is not None:
        group = f"{study.name}-{_digest(str(study.output_dir.resolve()))[:6]}"
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
        if resume is None:
            shutil.rmtree(run_dir / "logs", ignore_errors=True)  # stale logs of an old config
            last.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PARTIAL_NAME).write_text(json.dumps({"config_digest": item.digest}))
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
        source = _agreement_source(study, run)
        reference = None
        if source is not None:
            reference_dir = next(
                (p.run_dir for p in plan if p.run.name == source and p.seed == seed), None
            )
            if reference_dir is not None and (reference_dir / CHECKPOINT_NAME).is_file():
                reference = load_student(reference_dir / CHECKPOINT_NAME)
            else:
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
            "val_is_test": _val_is_test(datamodule),
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
        (run_dir / RESULT_NAME).write_text(json.dumps(result, indent=2))
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
    order = list(dict.fromkeys(item.run.name for item in plan))
    rows = summarise(
        results,
        order,
        baselines={r.name: study.baseline_of(r) for r in runs},
        published={r.name: r.published for r in runs if r.published},
    )
    notes = []
    if overrides:
        notes.append("Overrides (--set): " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    paths = write_report(rows, study.output_dir, title=study.name, notes=notes, echo=echo)
    if tracker is not None:
        tracker.log_table(rows, study_name=study.name, plot=paths.get("png"))
        tracker.close()
    results.rows, results.paths, results.output_dir = rows, paths, study.output_dir
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-lightning study",
        description="Run a study (configs x seeds) and write its results table and plot. "
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
        "trainer.max_epochs=2 (value parsed as YAML)",
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
        "--dry-run", action="store_true", help="show which runs are done / resumable / to do"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--epoch-lines",
        type=int,
        default=0,
        metavar="N",
        help="off a terminal, print a progress line every N epochs (on a terminal: one live line)",
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
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
    )
