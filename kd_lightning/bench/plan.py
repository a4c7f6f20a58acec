"""The plan of a study: every (run, seed) resolved to a config, a folder, a digest and a status.

Each (run, seed) lives in ``<output_dir>/runs/<name>/seed<k>/`` (``runs/<name>/set-<hash>/
seed<k>/`` when ``--set`` changed it). Its digest covers its resolved config and the digests of
the runs it needs, so retraining a teacher retrains its students. The status says what a rerun
does: skip (``done``), resume from ``last.ckpt`` (``partial``), train (``todo``), or refuse
unless asked to overwrite (``stale``: the folder holds a finished result of another config).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.bench.study_file import Study, StudyError, StudyRun

CHECKPOINT_NAME = "final.ckpt"
RESULT_NAME = "result.json"
LAST_NAME = "last.ckpt"
PARTIAL_NAME = "partial.json"

STATUSES = ("done", "partial", "todo", "stale")
"""``done``: finished with this config; ``partial``: interrupted, resumable from ``last.ckpt``;
``todo``: not started; ``stale``: the folder holds a *finished* result of another config."""


# --------------------------------------------------------------------------- configs
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
        # A copy: a dict-valued override is shared by every seed's config otherwise, and
        # `needs` paths written into it would leak from one seed to the next.
        set_dotted(config, key, copy.deepcopy(value))
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


def digest(value: Any) -> str:
    """A short, stable digest of a YAML-serialisable value (configs, override sets)."""
    return hashlib.sha256(yaml.safe_dump(value, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the plan
def dependency_seed(declared: Sequence[int] | None, seed: int, run: str, dep: str) -> int:
    """The seed of ``dep`` that seed ``seed`` of ``run`` uses.

    ``declared``: the seeds ``dep`` lists itself (``None``: it follows the runs that need it,
    seed for seed). A dependency that lists one seed serves every seed; one that lists several
    serves those seeds only.

    Raises:
        StudyError: ``dep`` lists several seeds but not ``seed``.
    """
    if declared is None or seed in declared:
        return seed
    if len(declared) == 1:
        return declared[0]
    raise StudyError(
        f"run {run!r} (seed {seed}) needs {dep!r}, which trains seeds {list(declared)}: give "
        f"{dep!r} seed {seed} too, or one seed (seeds: [0]) that serves every seed"
    )


def planned_seeds(study: Study, runs: Sequence[StudyRun]) -> dict[str, list[int]]:
    """The seeds each run trains now, ``runs`` in dependency order.

    A run trains the study's seeds (``--seeds`` when given); a run with its own ``seeds`` those
    of them the study runs, or all of them when it runs none. A dependency also trains every seed
    that a planned run needs from it (:func:`dependency_seed`), and only what is needed is added.
    """
    by_name = {run.name: run for run in runs}
    seeds = {run.name: {s for s in (run.seeds or study.seeds) if s in study.seeds} for run in runs}
    for run in reversed(runs):  # every run after the runs that need it
        if not seeds[run.name]:
            seeds[run.name] = set(run.seeds or study.seeds)
        for seed in seeds[run.name]:
            for dep in run.needs.values():
                seeds[dep].add(dependency_seed(by_name[dep].seeds, seed, run.name, dep))
    return {name: sorted(chosen) for name, chosen in seeds.items()}


@dataclass
class PlannedRun:
    """One (run, seed) of a study, resolved: where it lives, its config and whether it is done."""

    run: StudyRun
    seed: int
    run_dir: Path
    config: dict[str, Any]
    digest: str
    status: str  # one of STATUSES
    set_keys: list[str]
    dep_seeds: dict[str, int]  # the seed of each run it needs

    @property
    def label(self) -> str:
        return f"{self.run.name} seed={self.seed}"


def _recorded_digest(path: Path) -> str | None:
    with contextlib.suppress(ValueError, OSError):
        return json.loads(path.read_text()).get("config_digest")
    return None


def run_status(run_dir: Path, config_digest: str) -> str:
    """``done``, ``partial``, ``todo`` or ``stale`` (see :data:`STATUSES`)."""
    result_file = run_dir / RESULT_NAME
    recorded = _recorded_digest(result_file) if result_file.is_file() else None
    if recorded == config_digest and (run_dir / CHECKPOINT_NAME).is_file():
        return "done"
    partial = run_dir / PARTIAL_NAME
    if (
        partial.is_file()
        and (run_dir / LAST_NAME).is_file()
        and _recorded_digest(partial) == config_digest
    ):
        return "partial"
    if result_file.is_file() and recorded != config_digest:
        return "stale"
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
    seeds = planned_seeds(study, runs)
    declared = {run.name: run.seeds for run in runs}
    for run, seed in ((r, s) for r in runs for s in seeds[r.name]):
        base_dir = study.output_dir / "runs" / run.name
        dep_seeds = {
            dep: dependency_seed(declared[dep], seed, run.name, dep) for dep in run.needs.values()
        }
        deps = {dep: by_key[(dep, s)].run_dir / CHECKPOINT_NAME for dep, s in dep_seeds.items()}
        config = resolve_config(study, run, seed, base_dir / f"seed{seed}", deps)
        applied = {k: v for k, v in overrides.items() if has_parent(config, k)}
        run_dir = base_dir / f"seed{seed}"
        if applied:
            used |= set(applied)
            run_dir = base_dir / f"set-{digest(applied)[:8]}" / f"seed{seed}"
            config = resolve_config(study, run, seed, run_dir, deps)
            for key, value in applied.items():
                set_dotted(config, key, value)
        dep_digests = {dep: by_key[(dep, dep_seeds[dep])].digest for dep in sorted(dep_seeds)}
        run_digest = digest({"config": config, "needs": dep_digests})
        status = run_status(run_dir, run_digest)
        item = PlannedRun(run, seed, run_dir, config, run_digest, status, list(applied), dep_seeds)
        planned.append(item)
        by_key[(run.name, seed)] = item
    unused = sorted(set(overrides) - used)
    if unused:
        raise StudyError(
            f"--set {unused}: no run's config has the parent of that key; check the key against "
            "a run's config.yaml (list items are addressed by index, e.g. loss_terms.0)"
        )
    return planned
