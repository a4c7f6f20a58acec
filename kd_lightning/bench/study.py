"""Studies: run a list of experiment configs over several seeds and tabulate the results.

A study file (YAML)::

    name: digits
    seeds: [0, 1, 2]
    output_dir: results/digits          # relative to the working directory
    reference_teacher: teacher          # the "agreement" column compares every student to it
    runs:
      - name: teacher
        config: teacher.yaml            # relative to the study file
      - name: hinton_kd@10%
        config: hinton_kd.yaml
        overrides: {data.init_args.labeled_fraction: 0.1}
        needs: {model.init_args.teacher.init_args.checkpoint_path: teacher}

``needs`` maps a config key to another run whose final checkpoint (same seed) is put there, so
teachers are trained first. Each run writes ``<output_dir>/runs/<name>/seed<k>/`` with the
resolved ``config.yaml``, CSV logs, ``final.ckpt`` and ``result.json``; a rerun skips runs
whose result exists for the same resolved config (an interrupted study continues where it
stopped). The table (accuracy mean +- std over seeds, agreement with the reference teacher,
parameters) is printed and written as ``results.md`` and ``results.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

CHECKPOINT_NAME = "final.ckpt"
RESULT_NAME = "result.json"


@dataclass
class StudyRun:
    """One row of a study: a config, its overrides, and the runs it needs checkpoints from."""

    name: str
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    needs: dict[str, str] = field(default_factory=dict)


@dataclass
class Study:
    """A parsed study file."""

    name: str
    seeds: list[int]
    output_dir: Path
    runs: list[StudyRun]
    reference_teacher: str | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Study:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study file {str(path)!r} does not exist")
        spec = yaml.safe_load(path.read_text()) or {}
        unknown = set(spec) - {"name", "seeds", "output_dir", "runs", "reference_teacher"}
        if unknown:
            raise ValueError(f"unknown keys in study file {str(path)!r}: {sorted(unknown)}")
        runs = []
        for entry in spec.get("runs") or []:
            config = (path.parent / entry["config"]).resolve()
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
                )
            )
        if not runs:
            raise ValueError(f"study file {str(path)!r} lists no runs")
        study = cls(
            name=spec.get("name", path.stem),
            seeds=list(spec.get("seeds") or [0]),
            output_dir=Path(spec.get("output_dir", f"results/{path.stem}")),
            runs=runs,
            reference_teacher=spec.get("reference_teacher"),
        )
        study.ordered_runs()  # validates names and dependencies now
        return study

    def ordered_runs(self) -> list[StudyRun]:
        """Runs in dependency order (every run after the runs it needs), else file order."""
        by_name = {r.name: r for r in self.runs}
        if len(by_name) != len(self.runs):
            raise ValueError("run names in a study must be unique")
        for run in self.runs:
            missing = [n for n in run.needs.values() if n not in by_name]
            if missing:
                raise ValueError(
                    f"run {run.name!r} needs {missing}, which the study does not define"
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
    config = yaml.safe_load(run.config.read_text()) or {}
    config = copy.deepcopy(config)
    for key, value in run.overrides.items():
        set_dotted(config, key, value)
    for key, dep in run.needs.items():
        set_dotted(config, key, str(checkpoints[dep]))
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    _strip_checkpoint_callbacks(trainer)
    trainer.update(
        default_root_dir=str(run_dir),
        enable_checkpointing=False,  # the study writes final.ckpt itself
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    logger = trainer.get("logger")
    if not (isinstance(logger, dict) and "Wandb" in str(logger.get("class_path", ""))):
        trainer["logger"] = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "logs", "version": ""},
        }
    return config


def _digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(yaml.safe_dump(config, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _predict(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    from kd_lightning.teachers import output_logits

    model.eval()
    return torch.cat(
        [
            output_logits(model(inputs[i : i + batch_size])).float()
            for i in range(0, len(inputs), batch_size)
        ]
    )


def evaluate(
    student: torch.nn.Module, datamodule: Any, reference: torch.nn.Module | None
) -> dict[str, Any]:
    """Test accuracy of the student, and top-1 agreement with the reference teacher."""
    test = datamodule.dataset("test")
    predictions = _predict(student, test.inputs).argmax(-1)
    result = {"test_acc": (predictions == test.targets).float().mean().item()}
    if reference is not None:
        reference_predictions = _predict(reference, test.inputs).argmax(-1)
        result["agreement"] = (predictions == reference_predictions).float().mean().item()
    return result


def _best_val_acc(run_dir: Path) -> float | None:
    metrics = run_dir / "logs" / "metrics.csv"
    if not metrics.is_file():
        return None
    with metrics.open() as f:
        values = [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]
    return max(values) if values else None


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
            yield
    finally:
        sys.argv = argv
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def execute_run(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Fit one resolved config in this process; save the final checkpoint; return the module."""
    from kd_lightning.cli import build_cli

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with quiet_lightning():
        cli = build_cli(["-c", str(config_path)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        checkpoint = run_dir / CHECKPOINT_NAME
        cli.trainer.save_checkpoint(checkpoint)
    return {"module": cli.model, "datamodule": cli.datamodule, "checkpoint": checkpoint}


def run_study(
    study_path: str | Path,
    seeds: Sequence[int] | None = None,
    output_dir: str | Path | None = None,
    only: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or continue) a study; return one result dict per (run, seed) and write the tables."""
    from kd_lightning.teachers import load_student

    study = Study.from_file(study_path)
    if seeds is not None:
        study.seeds = list(seeds)
    if output_dir is not None:
        study.output_dir = Path(output_dir)
    runs = study.ordered_runs()
    if only:
        wanted = set(only)
        by_name = {r.name: r for r in runs}
        stack = list(wanted)
        while stack:  # keep the dependencies of the selected runs
            for dep in by_name[stack.pop()].needs.values():
                if dep not in wanted:
                    wanted.add(dep)
                    stack.append(dep)
        runs = [r for r in runs if r.name in wanted]
    total = len(runs) * len(study.seeds)
    results: list[dict[str, Any]] = []
    checkpoints: dict[tuple[str, int], Path] = {}
    started = time.perf_counter()
    fitted = 0
    for position, (run, seed) in enumerate(((r, s) for r in runs for s in study.seeds), start=1):
        run_dir = study.output_dir / "runs" / run.name / f"seed{seed}"
        deps = {dep: checkpoints[(dep, seed)] for dep in run.needs.values()}
        config = resolve_config(study, run, seed, run_dir, deps)
        for key, value in (overrides or {}).items():
            set_dotted(config, key, value)
        digest = _digest(config)
        result_file = run_dir / RESULT_NAME
        prefix = f"[{position}/{total}] {run.name} seed={seed}"
        if result_file.is_file() and (run_dir / CHECKPOINT_NAME).is_file():
            previous = json.loads(result_file.read_text())
            if previous.get("config_digest") == digest:
                checkpoints[(run.name, seed)] = run_dir / CHECKPOINT_NAME
                results.append(previous)
                print(
                    f"{prefix}: done before, skipped (test acc {previous['test_acc']:.4f})",
                    flush=True,
                )
                continue
        tic = time.perf_counter()
        out = execute_run(config, run_dir)
        seconds = time.perf_counter() - tic
        checkpoints[(run.name, seed)] = out["checkpoint"]
        reference = None
        if study.reference_teacher and (study.reference_teacher, seed) in checkpoints:
            reference = load_student(checkpoints[(study.reference_teacher, seed)])
        student = out["module"].student
        result = {
            "run": run.name,
            "seed": seed,
            "method": type(out["module"]).__name__,
            "labeled_fraction": getattr(out["datamodule"], "labeled_fraction", None),
            **evaluate(student, out["datamodule"], reference),
            "best_val_acc": _best_val_acc(run_dir),
            "params": sum(p.numel() for p in student.parameters()),
            "seconds": round(seconds, 2),
            "checkpoint": str(out["checkpoint"]),
            "config_digest": digest,
        }
        result_file.write_text(json.dumps(result, indent=2))
        results.append(result)
        fitted += 1
        elapsed = time.perf_counter() - started
        remaining = total - position
        eta = elapsed / fitted * remaining if fitted else math.nan
        agreement = f", agreement {result['agreement']:.4f}" if "agreement" in result else ""
        print(
            f"{prefix}: test acc {result['test_acc']:.4f}{agreement} in {seconds:.1f}s (ETA {eta:.0f}s)",
            flush=True,
        )
    rows = summarise(results, [r.name for r in runs])
    write_tables(rows, study.output_dir, title=study.name)
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarise(results: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """One row per run name: mean and std over seeds."""
    rows = []
    for name in order:
        group = [r for r in results if r["run"] == name]
        if not group:
            continue
        acc_mean, acc_std = _mean_std([100 * r["test_acc"] for r in group])
        row = {
            "run": name,
            "method": group[0]["method"],
            "labeled_fraction": group[0].get("labeled_fraction"),
            "seeds": len(group),
            "test_acc_mean": round(acc_mean, 2),
            "test_acc_std": round(acc_std, 2),
            "params": group[0]["params"],
            "seconds_per_run": round(statistics.fmean(r["seconds"] for r in group), 1),
        }
        agreements = [100 * r["agreement"] for r in group if r.get("agreement") is not None]
        row["agreement_mean"] = round(statistics.fmean(agreements), 2) if agreements else None
        rows.append(row)
    return rows


def format_markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        f"## Study: {title}",
        "",
        "| run | method | labeled | test acc % (mean ± std) | agreement w/ teacher % | params | seeds | s/run |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        labeled = "" if r["labeled_fraction"] is None else f"{r['labeled_fraction']:g}"
        agreement = "" if r["agreement_mean"] is None else f"{r['agreement_mean']:.2f}"
        lines.append(
            f"| {r['run']} | {r['method']} | {labeled} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
            f"| {agreement} | {r['params']:,} | {r['seeds']} | {r['seconds_per_run']} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict[str, Any]], output_dir: Path, title: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(rows, title)
    (output_dir / "results.md").write_text(markdown)
    with (output_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)
    print()
    print(markdown)
    print(f"written: {output_dir / 'results.md'} and {output_dir / 'results.csv'}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-lightning study",
        description="Run a study (configs x seeds) and write its results table.",
    )
    parser.add_argument("study", help="study YAML file, e.g. experiments/digits/study.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--output-dir", help="override the study's output_dir")
    parser.add_argument("--only", nargs="+", help="run only these runs (and what they need)")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run, e.g. trainer.max_epochs=2 (value parsed as YAML)",
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    run_study(
        args.study,
        seeds=args.seeds,
        output_dir=args.output_dir,
        only=args.only,
        overrides=overrides,
    )
