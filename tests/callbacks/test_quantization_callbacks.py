"""Quantization-aware distillation and post-training int8 quantization of a student."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.callbacks import (
    QuantizationAwareTraining,
    load_compressed_student,
    load_quantized,
    quantize_student,
    save_quantized,
)
from kd_lightning.compression import model_size_bytes
from kd_lightning.data import DigitsTransferSet
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.models.spec import model_spec
from kd_lightning.teachers import PretrainedTeacher, load_student
from tests.conftest import fast_trainer


def _has_fake_quant(module):
    return any("FakeQuantize" in type(m).__name__ for m in module.modules())


def test_quantization_aware_distillation(tmp_path):
    L.seed_everything(0)
    data = DigitsTransferSet(batch_size=64)
    teacher = MLP(10, hidden_sizes=[16]).eval()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = MLP(10, hidden_sizes=[16])
    float_before = student.hidden[0][0].weight.detach().clone()
    module = OfflineDistillation(student, teacher)
    seen = {}

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen["optimizer_sees_fake_quant_student"] = {
                id(p) for p in pl_module.student.parameters()
            } <= params
            seen["fake_quant"] = _has_fake_quant(pl_module.student)

    callback = QuantizationAwareTraining(save_path=str(tmp_path / "int8.pt"))
    trainer = fast_trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=1, callbacks=[callback, Spy()]
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    assert seen == {"optimizer_sees_fake_quant_student": True, "fake_quant": True}
    # The original float module was copied, not trained; the fake-quantized copy trained.
    assert torch.equal(student.hidden[0][0].weight, float_before)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k

    # The int8 model computes what the fake-quantized student simulated.
    x = data.dataset("test").inputs[:64]
    int8 = callback.quantized_model
    with torch.no_grad():
        simulated = module.student.eval()(x)
        real = int8(x)
    assert (simulated.argmax(-1) == real.argmax(-1)).float().mean() >= 0.95
    assert (simulated - real).abs().mean() < 0.05 * simulated.abs().max()

    # Files: the int8 student and the QAT checkpoint both rebuild to the same outputs.
    torch.testing.assert_close(load_quantized(tmp_path / "int8.pt")(x), real)
    rebuilt = load_compressed_student(tmp_path / "qat.ckpt")
    assert _has_fake_quant(rebuilt)
    torch.testing.assert_close(rebuilt(x), simulated)
    # Every loader reads the artifact and its compression record: load_student and a teacher
    # built from the QAT checkpoint give the fake-quantized student too.
    torch.testing.assert_close(load_student(tmp_path / "qat.ckpt")(x), simulated)
    torch.testing.assert_close(PretrainedTeacher(str(tmp_path / "qat.ckpt"))(x), simulated)


def test_int8_cnn_is_more_than_three_times_smaller():
    """The acceptance's size claim holds for the digits CNN (the teacher's architecture).

    A tiny MLP does not reach 3x: per-channel scales and zip-format overhead per tensor are
    a large share of a few thousand int8 weights (measured: MLP [256] 2.7x with QAT)."""
    torch.manual_seed(0)
    cnn = SmallCNN(10, width=32)
    data = DigitsTransferSet(batch_size=32)
    int8 = quantize_student(cnn, "static", datamodule=data, num_calibration_batches=2)
    assert model_size_bytes(cnn) / model_size_bytes(int8) >= 3.0


def test_post_training_quantization_of_a_checkpoint(tmp_path):
    L.seed_everything(0)
    data = DigitsTransferSet(batch_size=64)
    module = Supervised(MLP(10, hidden_sizes=[64]))
    trainer = fast_trainer(max_epochs=2, limit_train_batches=10, limit_val_batches=1)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "fp32.ckpt")
    x = data.dataset("test").inputs
    with torch.no_grad():
        reference = module.student.eval()(x).argmax(-1)
    for scheme in ("dynamic", "static"):
        int8 = quantize_student(tmp_path / "fp32.ckpt", scheme, datamodule=data)
        with torch.no_grad():
            agreement = (int8(x).argmax(-1) == reference).float().mean().item()
        assert agreement >= 0.97, (scheme, agreement)
        save_quantized(
            int8, tmp_path / f"{scheme}.pt", student_spec=model_spec(module.student),
            scheme=scheme, example_shape=[2, 1, 8, 8],
        )  # fmt: skip
        torch.testing.assert_close(load_quantized(tmp_path / f"{scheme}.pt")(x), int8(x))
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_student(module.student, "static")


def test_no_example_input_fails_before_any_step():
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    loader = DataLoader(TensorDataset(torch.rand(8, 64), torch.randint(0, 10, (8,))), batch_size=4)
    module = Supervised(MLP(10, hidden_sizes=[8]), num_classes=10)
    with pytest.raises(ValueError, match="set example_shape"):
        fast_trainer(callbacks=[QuantizationAwareTraining(), Count()]).fit(module, loader)
    assert not steps
    fast_trainer(max_steps=1, callbacks=[QuantizationAwareTraining(example_shape=[2, 64])]).fit(
        Supervised(MLP(10, hidden_sizes=[8]), num_classes=10), loader
    )


def _tuple_loader(n, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.rand(n, 64, generator=g) * scale, torch.randint(0, 10, (n,), generator=g)
    )
    return DataLoader(data, batch_size=8, shuffle=False)


def _qat_run(max_epochs, tmp_path=None, ckpt_path=None):
    torch.manual_seed(0)
    module = Supervised(MLP(10, hidden_sizes=[8]), num_classes=10)
    callback = QuantizationAwareTraining(example_shape=[2, 64])
    trainer = fast_trainer(max_epochs=max_epochs, callbacks=[callback], limit_val_batches=2)
    # Validation inputs 4x wider than training ones: an observer that moved on them shows it.
    trainer.fit(
        module, _tuple_loader(32), _tuple_loader(16, scale=4.0, seed=1), ckpt_path=ckpt_path
    )
    return trainer, module, callback


def _state(module):
    return {k: v.clone() for k, v in module.student.state_dict().items()}


def test_validate_test_and_predict_leave_the_qat_student_unchanged():
    trainer, module, _ = _qat_run(max_epochs=1)
    before = _state(module)
    wide = _tuple_loader(16, scale=4.0, seed=2)
    trainer.validate(module, wide, verbose=False)
    trainer.test(module, wide, verbose=False)
    trainer.predict(module, wide)
    with torch.no_grad():
        module.eval()(torch.rand(8, 64) * 9)
    after = module.student.state_dict()
    assert [k for k, v in after.items() if not torch.equal(v, before[k])] == []


def test_qat_resume_equals_the_uninterrupted_run_and_the_checkpoint_rebuilds(tmp_path):
    """Resuming runs a sanity validation on the resumed student; it must not move it."""
    trainer, _, callback = _qat_run(max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, straight, _ = _qat_run(max_epochs=2)
    _, resumed, _ = _qat_run(max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")
    expected, got = _state(straight), _state(resumed)
    assert [k for k, v in got.items() if not torch.equal(v, expected[k])] == []

    # The record every loader reads, written into the checkpoint's kd_lightning metadata.
    checkpoint = {}
    callback.on_save_checkpoint(trainer, straight, checkpoint)
    # Supervised holds its student as `model`: the record names where it sits.
    record = {"module": "model", "example_shape": [2, 64], "example_dtype": "float32"}
    record["backend"] = torch.backends.quantized.engine
    assert checkpoint["kd_lightning"]["compression"] == {"qat": record}
    # A checkpoint holding only that record rebuilds the student.
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)
    saved["kd_lightning"]["compression"] = {"qat": record}
    torch.save(saved, tmp_path / "record_only.ckpt")
    rebuilt = load_compressed_student(tmp_path / "record_only.ckpt")
    x = torch.rand(16, 64) * 4
    reference = _qat_run(max_epochs=1)[1].student.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), reference(x))
