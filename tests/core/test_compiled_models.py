"""Compiled students and teachers with feature terms (``torch.compile``).

A compiled graph runs the forward hooks that existed when it was traced and does not look for
new ones, so per-step capture hooks would be skipped (FitNets failed with ``'stage2'``). A
capture on a compiled model registers its hooks once, before any trace, and discards graphs
traced earlier. The default run traces with dynamo's ``eager`` backend (seconds: the hooks are
dynamo's business, not the code generator's); the slow test compiles with inductor.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from kd_lightning.connectors import Conv1x1Connector
from kd_lightning.data import DigitsTransferSet
from kd_lightning.features import FeatureCapture
from kd_lightning.losses import FitNetsHintLoss, SoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import SmallCNN
from kd_lightning.objective import LossTerm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_capture_on_a_model_compiled_and_run_before_sees_its_layer():
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        compiled(x)  # traced without hooks: that graph must not be reused
        capture = FeatureCapture(compiled, ["stage2", "pool:input"])
        with capture as features:
            logits = compiled(x)
        expected = model.stage2(model.stage1(x))
    assert torch.equal(features["stage2"], expected)
    assert torch.equal(features["pool:input"], expected)
    assert torch.equal(logits, model(x))
    assert capture.persistent and _hooks(model) == 2  # registered once, kept between steps
    with torch.no_grad(), capture as again:
        compiled(2 * x)
    assert torch.equal(again["stage2"], model.stage2(model.stage1(2 * x)))
    capture.close()
    assert _hooks(model) == 0


def _run(compile_backend: str | None, steps: int = 3) -> tuple[OfflineDistillation, L.Trainer]:
    L.seed_everything(0, verbose=False)
    student, teacher = SmallCNN(width=4), SmallCNN(width=8)
    if compile_backend is not None:
        student = torch.compile(student, backend=compile_backend)
        teacher = torch.compile(teacher, backend=compile_backend)
        with torch.no_grad():  # run in eval mode before the method hooks it: the start-up
            student.eval()(torch.zeros(2, 1, 8, 8))  # check then matched this hook-less graph
        student.train()
    hint = LossTerm(FitNetsHintLoss(), name="hint", student="stage2", teacher="stage2",
                    connector=Conv1x1Connector(8, 16))  # fmt: skip
    terms = [LossTerm(SoftTargetKLLoss(4.0), name="kd"), hint]
    module = OfflineDistillation(student, teacher, loss_terms=terms)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DigitsTransferSet(batch_size=16))
    return module, trainer


def _assert_same_training(compiled, plain) -> None:
    (module, trainer), (reference, reference_trainer) = compiled, plain
    for key in ("train/loss_hint", "train/loss_kd", "val/loss_hint"):
        torch.testing.assert_close(trainer.callback_metrics[key],
                                   reference_trainer.callback_metrics[key])  # fmt: skip
    ours = {k.replace("_orig_mod.", ""): v for k, v in module.state_dict().items()}
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key], value, msg=key)
    # One capture per hooked model, its hooks registered once (not per step).
    assert _hooks(module.student) == 1 and _hooks(module.teacher) == 1


def test_fitnets_trains_a_compiled_student_from_a_compiled_teacher_as_uncompiled():
    _assert_same_training(_run("eager"), _run(None))


@pytest.mark.slow
def test_fitnets_with_inductor_compiled_models():
    _assert_same_training(_run("inductor", steps=2), _run(None, steps=2))
