"""Every YAML under experiments/ parses and runs one step (fast_dev_run) with a tiny override."""

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.study import quiet_lightning
from kd_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
STUDY_KEYS = {"runs", "seeds"}


# Suites with their own one-step harness (CIFAR-shaped synthetic data, teachers of the right
# architecture): tests/bench/test_cifar100_suite.py; multi-process, FSDP and cache configs:
# tests/scale/test_scale_configs.py; text configs (MiniLM and BBC News from wheels, shrunk to
# tiny models and corpora): tests/text/test_text_experiments.py.
OWN_HARNESS = ("cifar100", "fashion_mnist", "mnist", "scale", "text")


def _configs():
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        if STUDY_KEYS & set(spec) or path.name.startswith("_") or "sweep" in path.name:
            continue
        if path.relative_to(ROOT / "experiments").parts[0] in OWN_HARNESS:
            continue
        yield path


def _replace(node, key, teachers):
    """Point every `key` (a teacher checkpoint path) at the test teacher of that architecture."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                node[k] = str(teachers.get(Path(v).stem, teachers["teacher"]))
            else:
                _replace(v, key, teachers)
    elif isinstance(node, list):
        for item in node:
            _replace(item, key, teachers)


@pytest.mark.parametrize(
    "path", list(_configs()), ids=lambda p: str(p.relative_to(ROOT / "experiments"))
)
def test_config_runs_one_step(path, teacher_checkpoint, vit_teacher_checkpoint, tmp_path):
    config = yaml.safe_load(path.read_text())
    teachers = {"teacher": teacher_checkpoint, "vit_teacher": vit_teacher_checkpoint}
    _replace(config, "checkpoint_path", teachers)
    trainer = config.setdefault("trainer", {})
    trainer.pop("callbacks", None)
    trainer.update(
        fast_dev_run=1, logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False
    )
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(config))
    with quiet_lightning():
        cli = build_cli(["-c", str(resolved)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step >= 1
    assert "train/loss" in cli.trainer.callback_metrics


def test_study_files_parse():
    from kd_lightning.bench.study import Study

    studies = [
        p
        for p in (ROOT / "experiments").rglob("*.yaml")
        if STUDY_KEYS & set(yaml.safe_load(p.read_text()) or {})
    ]
    assert studies
    for path in studies:
        study = Study.from_file(path)
        order = [r.name for r in study.ordered_runs()]
        for run in study.runs:
            for dep in run.needs.values():
                assert order.index(dep) < order.index(run.name)
