"""The W&B sweep example drives `kd-lightning study` with its parameters as `--set` overrides."""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from kd_lightning.bench.study import Study, main, plan_study

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "experiments" / "digits" / "sweep_hinton.yaml"


def _agent_argv(sweep: dict, point: dict, output_dir: Path) -> list[str]:
    """The command `wandb agent` runs for one point (``${args_no_hyphens}`` = ``key=value ...``)."""
    argv = []
    for item in sweep["command"]:
        if item == "${env}":
            continue
        if item == "${args_no_hyphens}":
            argv += [f"{k}={v}" for k, v in point.items()]
        else:
            argv.append(item)
    return argv + ["--output-dir", str(output_dir)]


def test_sweep_points_override_only_the_swept_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["name"] == "study/test_acc"
    names = list(sweep["parameters"])
    grid = list(itertools.product(*(sweep["parameters"][n]["values"] for n in names)))
    assert len(grid) == 12
    point = dict(zip(names, grid[-1], strict=True))
    argv = _agent_argv(sweep, point, tmp_path)
    assert argv[:3] == ["kd-lightning", "study", "experiments/digits/study_core.yaml"]
    main([*argv[2:], "--dry-run"])
    plan_lines = capsys.readouterr().out.splitlines()
    assert len(plan_lines) == 2  # the teacher it needs, and the swept run
    assert plan_lines[0].endswith(str(tmp_path / "runs" / "teacher" / "seed0"))
    assert "/runs/hinton_kd@10%/set-" in plan_lines[1]

    study = Study.from_file(ROOT / argv[2])
    study.output_dir = tmp_path
    runs = [r for r in study.ordered_runs() if r.name in ("teacher", "hinton_kd@10%")]
    planned = {p.run.name: p for p in plan_study(study, runs, point)}
    terms = planned["hinton_kd@10%"].config["model"]["init_args"]["loss_terms"]
    assert terms[0]["init_args"]["name"] == "kd"
    assert terms[0]["init_args"]["loss"]["init_args"]["temperature"] == point[names[0]]
    assert terms[0]["init_args"]["weight"] == point[names[1]]
    assert terms[1]["init_args"]["weight"] == 0.1  # CE weight fixed
    assert planned["teacher"].set_keys == []
