"""The study preflight accepts every method of ``kd_lightning.methods`` on the digits data.

Each method is preflighted through its row of ``experiments/digits/study.yaml`` (with the
runs it needs as stand-ins), exactly as ``kd-lightning study`` checks it before training; a
new method without a digits row fails here until it has one. Two methods once failed: BYOT
(its exits were only built in ``setup``) and PS-KD (alpha_t needs the run's ``max_epochs``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import kd_lightning.methods as methods
from kd_lightning.bench.plan import plan_study
from kd_lightning.bench.preflight import preflight, startup_checks
from kd_lightning.bench.study_file import Study
from kd_lightning.data import DigitsTransferSet
from kd_lightning.losses.self_knowledge import BranchHintLoss
from kd_lightning.methods import PSKD, BranchSelfDistillation, DistillationModule
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.objective import LossTerm
from tests.conftest import fast_trainer

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits"


# Methods that only make sense for causal language models (they generate text) have no digits
# row; each must have a config in experiments/text/ instead, slice-tested through `fit`
# (tests/text/test_on_policy_configs.py).
LANGUAGE_MODEL_ONLY = {methods.OnPolicyDistillation: "onpolicy_gkd.yaml"}


def _method_classes() -> list[type]:
    """Every concrete method exported by kd_lightning.methods (base class and LM-only excluded)."""
    found = [getattr(methods, name) for name in methods.__all__]
    return [
        c for c in found
        if inspect.isclass(c) and issubclass(c, DistillationModule) and c is not DistillationModule
        and c not in LANGUAGE_MODEL_ONLY
    ]  # fmt: skip


def test_language_model_only_methods_have_a_text_config():
    text = DIGITS.parent / "text"
    for method, config in LANGUAGE_MODEL_ONLY.items():
        spec = yaml.safe_load((text / config).read_text())
        assert spec["model"]["class_path"].endswith(method.__name__)


def _resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _digits_study(tmp_path: Path) -> Study:
    spec = yaml.safe_load((DIGITS / "study.yaml").read_text())
    spec.update(seeds=[0], output_dir=str(tmp_path / "out"))
    return Study.from_dict(spec, base_dir=DIGITS, source="experiments/digits/study.yaml")


def _row_per_method(study: Study) -> dict[type, str]:
    rows: dict[type, str] = {}
    for run in study.runs:
        config = run.load_config()
        config_class = (config.get("model") or {}).get("class_path")
        class_path = run.overrides.get("model.class_path", config_class)
        if class_path:
            rows.setdefault(_resolve(class_path), run.name)
    return rows


def test_every_method_has_a_digits_row_and_passes_the_preflight(tmp_path):
    study = _digits_study(tmp_path)
    rows = _row_per_method(study)
    classes = _method_classes()
    assert len(classes) >= 10  # the 10 methods as of writing: no method silently dropped
    missing = [c.__name__ for c in classes if c not in rows]
    assert not missing, f"give each method a row in experiments/digits/study.yaml: {missing}"
    chosen = [rows[c] for c in classes]
    plan = plan_study(study, study.select(chosen))
    checked = preflight(plan, study.needed)  # raises PreflightError naming each failing run
    assert set(chosen) <= set(checked)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def _byot(**kwargs) -> BranchSelfDistillation:
    return BranchSelfDistillation(SmallCNN(width=8), branches=["stage1"], **kwargs)


def test_byot_check_example_builds_exits_for_the_check_and_leaves_the_module_as_it_was():
    data = DigitsTransferSet(batch_size=16)
    module = _byot(feature_layer="pool")
    keys = set(module.state_dict())
    torch.manual_seed(3)
    module.check_example(data.example_batch())
    drawn_after_check = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), drawn_after_check)  # the random state was restored
    assert module.heads is None and module.head_config is None
    assert set(module.state_dict()) == keys  # no exit weights left behind
    fast_trainer(max_steps=2, limit_val_batches=1).fit(module, data)  # setup builds the exits
    assert module.heads is not None and len(module.heads) == 1


def test_byot_check_example_runs_the_objective_over_the_exits():
    data = DigitsTransferSet(batch_size=16)
    # exit0's embedding is head_width=64 wide; the deepest logits are 10 wide: only a check
    # that runs the exits and the objective on the example can see the mismatch.
    hint = LossTerm(BranchHintLoss(), name="hint", student="exit0.embedding", teacher="student")
    module = _byot(head_width=64, loss_terms=[hint])
    with pytest.raises(ValueError, match="hint"):
        module.check_example(data.example_batch())
    assert module.heads is None


def test_the_preflight_attaches_the_planned_trainer_so_pskd_sees_max_epochs():
    data = DigitsTransferSet(batch_size=16)
    module = PSKD(MLP(hidden_sizes=[16]), num_classes=10)
    example = data.example_batch()
    with pytest.raises(ValueError, match="max_epochs"):
        startup_checks(module, data, example)  # no trainer: alpha_t has no T
    seen = []
    original = PSKD.check_example

    def spy(self, batch, stage="fit"):
        seen.append(self.progress.max_epochs)
        original(self, batch, stage)

    module.check_example = spy.__get__(module)
    startup_checks(module, data, example, fast_trainer(max_epochs=7))
    assert seen == [7]
    assert module._trainer is None  # detached again
