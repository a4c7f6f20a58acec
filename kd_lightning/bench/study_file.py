"""The study file: its fields, checked as it is read, and the :class:`Study` they describe.

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
teachers are trained first. A run may list its own ``seeds``: it trains those of them the study
runs (its ``seeds`` or ``--seeds``), or all of them when the study runs none; a teacher with
``seeds: [0]`` is trained once and serves every seed of the runs that need it (each student seed
varies the student, not the teacher). Every field is checked when the file is read: a wrong type
(``seeds: 3`` instead of ``seeds: [0, 1, 2]``), an unknown key, a missing run or a cycle is an
error that names the fix, before anything is built.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.bench.tracking import WandbSettings

STUDY_KEYS = {
    "name", "seeds", "output_dir", "runs", "reference_teacher", "baseline", "wandb",
    "checkpoint_every_n_epochs", "latency", "description",
}  # fmt: skip
RUN_KEYS = {
    "name", "config", "overrides", "needs", "baseline", "published", "job_type", "grid", "seeds",
}  # fmt: skip

_UNSET = object()


class StudyError(ValueError):
    """A study that cannot start as written (its file, its options or its runs); the message
    names the fix. Raised before anything trains."""


class MissingFile(StudyError, FileNotFoundError):
    """A study file or a run's config file that does not exist."""


def _fail(where: str, problem: str, fix: str) -> None:
    raise StudyError(f"{where}: {problem}. {fix}")


def _check_str(value: Any, where: str, key: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        _fail(
            where,
            f"`{key}` must be a {'run name or null' if optional else 'non-empty string'}, "
            f"got {value!r} ({type(value).__name__})",
            f'Quote it if YAML reads it as another type, e.g. {key}: "{value}".',
        )


SEED_MAX = 2**32 - 1
"""The largest seed ``seed_everything`` (numpy's generator) accepts."""


def check_seeds(value: Any, where: str) -> list[int]:
    """A non-empty list of distinct integer seeds in ``[0, SEED_MAX]`` (``None``: ``[0]``).

    Raises:
        StudyError: naming ``where``, the value and the fix.
    """
    if value is None:
        return [0]
    example = "seeds: [0, 1, 2]"
    if isinstance(value, int) and not isinstance(value, bool):
        count = max(value, 1)
        example = f"seeds: {list(range(count))}" if count <= 10 else example
        _fail(
            where,
            f"`seeds` must be a list of integer seeds, got the number {value}",
            f"For {value} seed{'s' if value > 1 else ''} write `{example}`; for seed {value} "
            f"alone, `seeds: [{value}]`."
            if value >= 1
            else f"For seed {value} alone write `seeds: [{value}]`.",
        )
    ok = isinstance(value, list) and value
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    if not ok:
        _fail(where, f"`seeds` must be a non-empty list of integers, got {value!r}", example)
    if len(set(value)) != len(value):
        _fail(where, f"`seeds` repeats a seed: {value}", "List each seed once.")
    bad = [s for s in value if not 0 <= s <= SEED_MAX]
    if bad:
        _fail(where, f"`seeds` {bad} outside [0, {SEED_MAX}]", "Seeds are 32-bit: e.g. [0, 1, 2].")
    return list(value)


def _check_mapping(value: Any, where: str, key: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(where, f"`{key}` must be a mapping of dotted config keys, got {value!r}", example)
    return dict(value)


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
        seeds: this run's own seeds (``None``: the study's). A run with one seed serves every
            seed of the runs that need it.
    """

    name: str
    config: Path | dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    needs: dict[str, str] = field(default_factory=dict)
    baseline: Any = _UNSET
    published: dict[str, Any] | None = None
    job_type: str | None = None
    seeds: list[int] | None = None

    def load_config(self) -> dict[str, Any]:
        if isinstance(self.config, dict):
            return copy.deepcopy(self.config)
        config = yaml.safe_load(Path(self.config).read_text()) or {}
        if not isinstance(config, dict):
            raise StudyError(
                f"run {self.name!r}: {str(self.config)!r} is not a LightningCLI config (a mapping "
                "with model, data and trainer)"
            )
        return config


def _published(value: Any, run: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"test_acc": float(value), "source": ""}
    if isinstance(value, dict) and isinstance(value.get("test_acc"), (int, float)):
        return {"source": "", **value, "test_acc": float(value["test_acc"])}
    raise StudyError(
        f"run {run!r}: `published` must be a number or {{test_acc: <percent>, source: ...}}, "
        f"got {value!r}"
    )


def _expand_grid(entry: dict[str, Any], where: str) -> list[dict[str, Any]]:
    grid = entry.get("grid")
    if not grid:
        return [entry]
    if not isinstance(grid, dict):
        _fail(
            where,
            f"`grid` must be a mapping of axes, got {grid!r}",
            "e.g. grid: {T: {key: ..., values: [2, 4]}}",
        )
    axes = []
    for label, axis in grid.items():
        if not (isinstance(axis, dict) and "key" in axis and isinstance(axis.get("values"), list)):
            raise StudyError(
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


def _parse_run(raw: Any, base_dir: Path, source: str) -> list[StudyRun]:
    if not isinstance(raw, dict):
        _fail(
            source,
            f"every item of `runs` must be a mapping, got {raw!r}",
            "e.g. - {name: teacher, config: teacher.yaml}",
        )
    bad = set(raw) - RUN_KEYS
    if bad:
        raise StudyError(
            f"run {raw.get('name')!r} in {source} has unknown keys {sorted(bad)}; "
            f"valid: {sorted(RUN_KEYS)}"
        )
    if "name" not in raw or "config" not in raw:
        raise StudyError(f"every run in {source} needs `name` and `config`, got {raw}")
    where = f"run {raw['name']!r} in {source}"
    _check_str(raw["name"], where, "name")
    if not isinstance(raw["config"], (str, dict)):
        _fail(
            where,
            f"`config` must be a file path or a mapping, got {raw['config']!r}",
            "e.g. config: teacher.yaml",
        )
    overrides = _check_mapping(
        raw.get("overrides"), where, "overrides", "e.g. overrides: {trainer.max_epochs: 5}"
    )
    needs = _check_mapping(
        raw.get("needs"),
        where,
        "needs",
        "e.g. needs: {model.init_args.teacher.init_args.checkpoint_path: teacher}",
    )
    for key, dep in needs.items():
        if not isinstance(dep, str):
            _fail(where, f"`needs` maps {key!r} to {dep!r}", "Map each config key to a run name.")
    if "baseline" in raw:
        _check_str(raw["baseline"], where, "baseline", optional=True)
    _check_str(raw.get("job_type"), where, "job_type", optional=True)
    # `seeds:` left empty (None) is the study's seeds, as when the key is absent.
    seeds = check_seeds(raw["seeds"], where) if raw.get("seeds") is not None else None
    runs = []
    for entry in _expand_grid({**raw, "overrides": overrides, "needs": needs}, where):
        config = entry["config"]
        if not isinstance(config, dict):
            config = (Path(base_dir) / config).resolve()
            if not config.is_file():
                raise MissingFile(f"run {entry['name']!r}: config {str(config)!r} does not exist")
        runs.append(
            StudyRun(
                name=entry["name"],
                config=config,
                overrides=dict(entry["overrides"]),
                needs=dict(entry["needs"]),
                baseline=entry["baseline"] if "baseline" in entry else _UNSET,
                published=_published(entry.get("published"), entry["name"]),
                job_type=entry.get("job_type"),
                seeds=seeds,
            )
        )
    return runs


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
            raise MissingFile(f"study file {str(path)!r} does not exist")
        spec = yaml.safe_load(path.read_text()) or {}
        if not isinstance(spec, dict):
            raise StudyError(f"{str(path)!r} is not a study file: expected a mapping with `runs`")
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
            raise StudyError(
                f"unknown keys in {source}: {sorted(unknown)}; valid: {sorted(STUDY_KEYS)}"
            )
        name = spec.get("name", "study")
        _check_str(name, source, "name")
        if not isinstance(spec.get("output_dir", "x"), (str, Path)):
            _fail(
                source,
                f"`output_dir` must be a folder path, got {spec['output_dir']!r}",
                "e.g. output_dir: results/digits",
            )
        for key in ("reference_teacher", "baseline"):
            _check_str(spec.get(key), source, key, optional=True)
        every = spec.get("checkpoint_every_n_epochs", 1)
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            _fail(
                source,
                f"`checkpoint_every_n_epochs` must be an integer >= 0, got {every!r}",
                "Use 1 (every epoch) or 0 (no mid-run checkpoints).",
            )
        if not isinstance(spec.get("latency", True), bool):
            _fail(
                source,
                f"`latency` must be true or false, got {spec['latency']!r}",
                "Use latency: false to skip the CPU latency column.",
            )
        if not isinstance(spec.get("description", ""), str):
            _fail(source, "`description` must be a string", "Quote it.")
        raw_runs = spec.get("runs")
        if not isinstance(raw_runs, list) or not raw_runs:
            raise StudyError(
                f"{source} lists no runs: `runs` must be a non-empty list of "
                "{name: ..., config: ...} mappings"
            )
        runs = [run for raw in raw_runs for run in _parse_run(raw, Path(base_dir), source)]
        study = cls(
            name=name,
            seeds=check_seeds(spec.get("seeds"), source),
            output_dir=Path(spec.get("output_dir", f"results/{name}")),
            runs=runs,
            reference_teacher=spec.get("reference_teacher"),
            baseline=spec.get("baseline"),
            wandb=WandbSettings.from_spec(spec.get("wandb")),
            checkpoint_every_n_epochs=every,
            latency=spec.get("latency", True),
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
            raise StudyError(
                f"run names in a study must be unique; repeated: "
                f"{sorted({n for n in names if names.count(n) > 1})}"
            )
        for run in self.runs:
            missing = [n for n in run.needs.values() if n not in by_name]
            if missing:
                raise StudyError(
                    f"run {run.name!r} needs {missing}, which the study does not define"
                )
            base = self.baseline_of(run)
            if base is not None and base not in by_name:
                raise StudyError(
                    f"run {run.name!r} has baseline {base!r}, which the study does not define"
                )
        if self.reference_teacher is not None and self.reference_teacher not in by_name:
            raise StudyError(
                f"reference_teacher {self.reference_teacher!r} is not a run of the study"
            )
        ordered: list[StudyRun] = []
        visiting: set[str] = set()

        def visit(run: StudyRun) -> None:
            if run in ordered:
                return
            if run.name in visiting:
                raise StudyError(
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

    def select(self, only: Sequence[str] | None) -> list[StudyRun]:
        """The runs in dependency order; with ``only``, those runs and the runs they need."""
        runs = self.ordered_runs()
        if not only:
            return runs
        by_name = {r.name: r for r in runs}
        wanted = set(only)
        unknown = sorted(wanted - set(by_name))
        if unknown:
            raise StudyError(f"--only {unknown}: not runs of the study; runs: {sorted(by_name)}")
        stack = list(wanted)
        while stack:  # keep the dependencies of the selected runs
            for dep in by_name[stack.pop()].needs.values():
                if dep not in wanted:
                    wanted.add(dep)
                    stack.append(dep)
        return [r for r in runs if r.name in wanted]
