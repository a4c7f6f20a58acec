"""Language-model objectives through ``kd-lightning fit`` from YAML.

- A tiny GPT-2 student distilled from a per-token top-k teacher cache (``teacher: null``): the
  cache is built from the teacher checkpoint by ``prepare_data`` and is the only teacher.
- The fused output-layer loss selected by a YAML objective: the final hidden states
  (``lm_head:input``) and output weights (``lm_head:parameter.weight``) of student and teacher
  reach FusedLinearTokenDistillationLoss, which logs the same value, step by step, as the
  dense token loss on the two models' logits.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.cli import main as cli_main
from kd_lightning.data import TeacherCache, load_tokenizer
from kd_lightning.digest import file_digest
from kd_lightning.models import HFModel
from kd_lightning.models.spec import model_spec
from tests.text.conftest import tiny_gpt2_config

GPT2 = {"class_path": "kd_lightning.models.HFModel",
        "init_args": {"model_type": "gpt2", "task": "causal-lm", "config": tiny_gpt2_config()}}  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_teacher_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny GPT-2 (random, peaked weights) saved as a checkpoint the library's teachers load."""
    torch.manual_seed(0)
    config = {**tiny_gpt2_config(len(load_tokenizer(tokenizer_dir))), "initializer_range": 0.5}
    teacher = HFModel(model_type="gpt2", config=config, task="causal-lm")
    state = {f"student.{k}": v for k, v in teacher.state_dict().items()}
    path = tmp_path_factory.mktemp("gpt2_teacher") / "teacher.ckpt"
    torch.save({"state_dict": state, "kd_lightning": {"student_spec": model_spec(teacher)}}, path)
    return path


def _config(name: str, corpus: Path, tokenizer: Path, model: dict, cache: dict | None) -> Path:
    data = {"tokenizer": str(tokenizer), "data_dir": str(corpus), "block_size": 16,
            "batch_size": 4, "shuffle_seed": 0}  # fmt: skip
    if cache is not None:
        data["teacher_cache"] = {"class_path": "kd_lightning.data.TeacherCache", "init_args": cache}
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 6,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": name},
            },
        },  # fmt: skip
        "model": model,
        "data": {"class_path": "kd_lightning.data.CausalLMTransferSet", "init_args": data},
    }
    path = Path(f"{name}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, name: str) -> dict[str, list[float]]:
    cli_main(["fit", "-c", str(config)])
    rows = list(csv.DictReader(open(f"runs/{name}/version_0/metrics.csv")))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


def _term(name: str, loss: str, args: dict, weight: float = 1.0, **sources) -> dict:
    return {"class_path": "kd_lightning.objective.LossTerm",
            "init_args": {"name": name, "weight": weight, **sources,
                          "loss": {"class_path": f"kd_lightning.losses.{loss}", "init_args": args}}}  # fmt: skip


def test_gpt2_student_distils_from_a_top_k_cache_alone(
    gpt2_teacher_checkpoint, text_corpus, tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cache = {"path": "cache/lm_top8.kdtc", "teacher_checkpoint": str(gpt2_teacher_checkpoint),
             "granularity": "token", "topk": 8, "temperature": 2.0, "dtype": "float16",
             "splits": ["train", "val"], "progress": False}  # fmt: skip
    kd = _term("kd", "SparseTokenDistillationLoss", {"temperature": 2.0, "topk": 8},
               weight=0.9, teacher="topk")  # fmt: skip
    ce = {"class_path": "kd_lightning.objective.LossTerm",
          "init_args": {"name": "ce", "weight": 0.1, "loss": "kd_lightning.losses.TokenCrossEntropyLoss"}}  # fmt: skip
    model = {"class_path": "kd_lightning.methods.OfflineDistillation",
             "init_args": {"student": GPT2, "teacher": None, "loss_terms": [kd, ce],
                           "optimizer": {"class_path": "torch.optim.AdamW",
                                         "init_args": {"lr": 1e-2}}}}  # fmt: skip
    config = _config("lm_top8", text_corpus, tokenizer_dir, model, cache)
    metrics = _fit(config, "lm_top8")
    provenance = TeacherCache("cache/lm_top8.kdtc").provenance
    assert provenance.teacher_digest == file_digest(gpt2_teacher_checkpoint)
    assert (provenance.granularity, provenance.topk, provenance.temperature) == ("token", 8, 2.0)
    kd_steps = metrics["train/loss_kd_step"]
    assert len(kd_steps) == 6 and all(math.isfinite(v) and v > 0 for v in kd_steps)
    assert kd_steps[-1] < kd_steps[0]  # the student moves towards the cached teacher
    assert metrics["val/loss_kd"] and math.isfinite(metrics["val/perplexity"][-1])


def test_yaml_objective_selects_the_fused_output_layer_loss(
    gpt2_teacher_checkpoint, text_corpus, tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = {"objective": "jsd", "beta": 0.3, "temperature": 2.0}
    fused = _term("fused", "FusedLinearTokenDistillationLoss", args,
                  student=["lm_head:input", "lm_head:parameter.weight"],
                  teacher=["lm_head:input", "lm_head:parameter.weight"])  # fmt: skip
    plain = _term("plain", "TokenDistillationLoss", args, weight=0.0)  # logged, not trained on
    teacher = {"class_path": "kd_lightning.teachers.PretrainedTeacher",
               "init_args": {"checkpoint_path": str(gpt2_teacher_checkpoint)}}  # fmt: skip
    model = {"class_path": "kd_lightning.methods.OfflineDistillation",
             "init_args": {"student": GPT2, "teacher": teacher, "loss_terms": [fused, plain],
                           "optimizer": {"class_path": "torch.optim.AdamW",
                                         "init_args": {"lr": 1e-2}}}}  # fmt: skip
    metrics = _fit(_config("lm_fused", text_corpus, tokenizer_dir, model, None), "lm_fused")
    fused_steps, plain_steps = metrics["train/loss_fused_step"], metrics["train/loss_plain_step"]
    assert len(fused_steps) == 6
    assert fused_steps == pytest.approx(plain_steps, rel=1e-5)  # the same loss, fused
    assert fused_steps[-1] < fused_steps[0]  # and its gradient trains the student


def test_parameter_spec_captures_the_output_layer_weight_itself():
    from kd_lightning.features import FeatureCapture, FeatureSpec

    model = HFModel(model_type="gpt2", config=tiny_gpt2_config(30), task="causal-lm")
    capture = FeatureCapture(model, ["lm_head:input", "lm_head:parameter.weight"])
    with capture as features:
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    weight = features["lm_head:parameter.weight"]
    assert weight is model.lm_head.weight  # the parameter itself: gradients reach it
    torch.testing.assert_close(features["lm_head:input"] @ weight.T, logits)
    with pytest.raises(ValueError, match=r"'parameter.<name>'"):
        FeatureSpec.parse("lm_head:parameter")
