"""The CIFAR-100 suite: files match the generator, the CRD protocol holds in every config, the
published figures are the papers', and every config runs one step on CIFAR-shaped synthetic data
with a randomly initialised teacher of the right architecture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.bench import cifar100_suite as suite
from kd_lightning.bench.report import format_markdown, summarise
from kd_lightning.bench.study import Study, quiet_lightning
from kd_lightning.cli import build_cli
from kd_lightning.models import CIFAR_MODELS, model_spec
from kd_lightning.teachers import CHECKPOINT_KEY

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "experiments" / "cifar100"
STUDY = Study.from_file(FOLDER / "suite.yaml")
SYNTHETIC_TRAIN = 100

# One run per method and per architecture (as student and as teacher) in the default tier;
# every one of the 61 configs with -m slow.
FAST = {
    "teacher.resnet32x4", "teacher.wrn_40_2", "teacher.resnet56", "teacher.vgg13",
    "teacher.resnet110", "shufflenetv2.alone", "resnet8x4.kd", "wrn_16_2.dkd",
    "resnet20.fitnets", "vgg8.at", "wrn_40_1.sp", "resnet32.rkd", "shufflenetv2.crd",
    "shufflenetv2.fitnets", "shufflenetv2.at",
}  # fmt: skip


def test_files_match_the_generator():
    expected = suite.suite_files()
    on_disk = {str(p.relative_to(FOLDER)): p.read_text() for p in FOLDER.rglob("*.yaml")}
    assert sorted(on_disk) == sorted(expected), "run: python -m kd_lightning.bench.cifar100_suite"
    for name, content in expected.items():
        assert on_disk[name] == content, f"{name} differs from kd_lightning.bench.cifar100_suite"


def _configs():
    for run in STUDY.runs:
        yield run.name, yaml.safe_load(Path(run.config).read_text())


def test_every_config_follows_the_crd_protocol():
    for name, config in _configs():
        init = config["model"]["init_args"]
        student_arch = name.split(".")[1] if name.startswith("teacher.") else name.split(".")[0]
        lr = 0.01 if student_arch.startswith(("shufflenet", "mobilenet")) else 0.05
        assert config["trainer"]["max_epochs"] == 240, name
        assert init["optimizer"] == {
            "class_path": "torch.optim.SGD",
            "init_args": {"lr": lr, "momentum": 0.9, "weight_decay": 5e-4},
        }, name
        assert init["lr_scheduler"]["init_args"] == {"milestones": [150, 180, 210], "gamma": 0.1}
        assert config["data"]["init_args"]["batch_size"] == 64
        terms = {t["init_args"]["name"]: t["init_args"] for t in init.get("loss_terms", [])}
        method = name.split(".")[-1]
        if method == "kd":
            assert terms["kd"]["weight"] == 0.9 and terms["ce"]["weight"] == 0.1
            assert terms["kd"]["loss"]["init_args"] == {"temperature": 4.0}
        if method == "dkd":
            assert terms["ce"]["weight"] == 1.0 and terms["dkd"]["warmup_epochs"] == 20
            assert terms["dkd"]["loss"]["init_args"] == {
                "alpha": 1.0,
                "beta": 8.0,
                "temperature": 4.0,
            }
        if method == "crd":
            assert terms["crd"]["weight"] == 0.8
            assert terms["crd"]["loss"]["init_args"]["n_data"] == 50_000


def test_published_figures_and_table_columns():
    published = {r.name: r.published for r in STUDY.runs}
    # Spot checks against the papers (CRD Tables 1-2 / RepDistiller README, DKD Tables 1-2).
    assert published["teacher.resnet32x4"]["test_acc"] == 79.42
    assert published["resnet8x4.alone"]["test_acc"] == 72.50
    assert published["resnet8x4.kd"]["test_acc"] == 73.33
    assert published["resnet8x4.dkd"]["test_acc"] == 76.32
    assert published["resnet8x4.crd"]["test_acc"] == 75.51
    assert published["wrn_16_2.dkd"]["test_acc"] == 76.23
    assert published["shufflenetv2.kd"]["test_acc"] == 74.45
    assert "Table 2" in published["shufflenetv2.crd"]["source"]
    assert len(STUDY.runs) == 5 + 7 * (1 + len(suite.METHODS))
    results = [
        {"run": "resnet8x4.alone", "seed": 0, "method": "Supervised", "test_acc": 0.70,
         "test_acc_best_val": 0.72, "val_is_test": True, "params": 1, "seconds": 1},
        {"run": "resnet8x4.kd", "seed": 0, "method": "OfflineDistillation", "test_acc": 0.73,
         "test_acc_best_val": 0.74, "val_is_test": True, "params": 1, "seconds": 1},
    ]  # fmt: skip
    rows = summarise(
        results,
        ["resnet8x4.alone", "resnet8x4.kd"],
        baselines={r.name: STUDY.baseline_of(r) for r in STUDY.runs},
        published=published,
    )
    markdown = format_markdown(rows, "cifar100")
    assert "| published % | ours − published |" in markdown
    assert "| 74.00 ± 0.00 † |" in markdown and "| 73.33 | +0.67 |" in markdown


@pytest.fixture(scope="module")
def random_teachers(tmp_path_factory):
    """A checkpoint per teacher architecture: random weights, in this library's format."""
    folder = tmp_path_factory.mktemp("cifar_teachers")
    paths = {}
    for name in {t for t, _ in suite.PAIRS}:
        torch.manual_seed(0)
        model = CIFAR_MODELS[name](num_classes=100)
        path = folder / f"{name}.ckpt"
        torch.save(
            {
                "state_dict": {f"student.{k}": v for k, v in model.state_dict().items()},
                CHECKPOINT_KEY: {"student_spec": model_spec(model), "num_classes": 100},
            },
            path,
        )
        paths[name] = path
    return paths


def _set_key(node, key, value):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                node[k] = value
            else:
                _set_key(v, key, value)
    elif isinstance(node, list):
        for item in node:
            _set_key(item, key, value)


def _cases():
    for run in STUDY.runs:
        marks = () if run.name in FAST else (pytest.mark.slow,)
        yield pytest.param(run, id=run.name, marks=marks)


@pytest.mark.parametrize("run", list(_cases()))
def test_config_runs_one_step_on_synthetic_cifar(run, random_teachers, tmp_path):
    config = yaml.safe_load(Path(run.config).read_text())
    for dep in run.needs.values():
        _set_key(config, "checkpoint_path", str(random_teachers[dep.split(".", 1)[1]]))
    _set_key(config, "n_data", SYNTHETIC_TRAIN)  # CRD's memory bank: one row per training image
    # One step on noise with random teachers checks the wiring, not the protocol's learning rate:
    # at lr 0.05, FitNets' x100 hint between random networks can break the weights in one step
    # (the non-finite guard then stops the run, as it should).
    _set_key(config, "lr", 1.0e-4)
    config["data"] = {
        "class_path": "kd_lightning.data.SyntheticTransferSet",
        "init_args": {
            "num_classes": 100, "num_samples": SYNTHETIC_TRAIN, "val_samples": 4,
            "test_samples": 4, "batch_size": 2, "augment": True,
        },
    }  # fmt: skip
    trainer = config["trainer"]
    trainer.pop("callbacks", None)
    trainer.update(
        fast_dev_run=1, logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
        accelerator="cpu", enable_model_summary=False,
    )  # fmt: skip
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(config))
    with quiet_lightning():
        cli = build_cli(["-c", str(resolved)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1
    assert math.isfinite(float(metrics["train/loss"]))
    for term in config["model"]["init_args"].get("loss_terms", []):
        name = term["init_args"]["name"]
        assert math.isfinite(float(metrics[f"train/loss_{name}"])), name
