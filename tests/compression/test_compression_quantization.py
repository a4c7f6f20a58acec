"""Int8 post-training quantization and QAT: smaller on disk, same predictions, trainable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao import nn as ao_nn

from kd_lightning.compression import (
    apply_masks,
    convert_qat,
    global_prune_masks,
    model_size_bytes,
    prepare_qat,
    quantize_dynamic_int8,
    quantize_static_int8,
    select_parameters,
)

pytestmark = pytest.mark.filterwarnings(
    # Running a converted model calls torch.quantize_per_tensor, which torch 2.13 marks as
    # deprecated (quantized dtypes move to torchao); expected until the torchao migration.
    "ignore:.*quantize_per_tensor.*deprecated.*:UserWarning"
)


def _digits_mlp(hidden=256):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).eval()


def _small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    # Non-trivial BatchNorm statistics, so fusing it into the conv is actually exercised.
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def test_dynamic_int8_mlp_is_3x_smaller_and_agrees_with_fp32():
    model = _digits_mlp()
    quantized = quantize_dynamic_int8(model)
    x = torch.randn(512, 64)
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    ratio = model_size_bytes(model) / model_size_bytes(quantized)
    assert ratio >= 3.0
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95
    assert (ref - out).abs().max() < 0.05 * ref.abs().max()
    # The float model is untouched; the copy holds int8 weights.
    assert type(model[0]) is nn.Linear
    assert quantized[0].weight().dtype == torch.qint8


def test_dynamic_quantization_keeps_pruned_weights_zero():
    model = _digits_mlp(128)
    masks = global_prune_masks({n: p.abs() for n, p in select_parameters(model).items()}, 0.7)
    apply_masks(model, masks)
    quantized = quantize_dynamic_int8(model)
    weight = quantized[0].weight().dequantize()
    assert (weight[~masks["0.weight"]] == 0).all()
    # The pruned float model keeps its masks and still trains through them.
    assert hasattr(model[0], "weight_mask")
    model(torch.randn(4, 64)).sum().backward()
    assert (model[0].weight_orig.grad[~masks["0.weight"]] == 0).all()
    assert model[0].weight_orig.grad.abs().sum() > 0


def test_static_int8_cnn_matches_fp32_after_calibration():
    model = _small_cnn()
    calibration = [torch.randn(32, 1, 8, 8) * 2 + 0.5 for _ in range(4)]
    quantized = quantize_static_int8(model, calibration[0][:2], calibration)
    x = torch.randn(256, 1, 8, 8) * 2 + 0.5
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9
    assert (ref - out).abs().max() < 0.1 * ref.abs().max()
    assert model_size_bytes(quantized) < model_size_bytes(model)
    kinds = {type(m) for m in quantized.modules()}
    assert {ao_nn.intrinsic.quantized.ConvReLU2d, ao_nn.quantized.Linear} <= kinds, kinds
    with pytest.raises(ValueError, match="calibration_batches is empty"):
        quantize_static_int8(model, calibration[0], [])


def test_qat_model_trains_and_converts_to_int8():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()  # 4 classes
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    qat = prepare_qat(model, x[:2])
    assert qat.training
    assert any("FakeQuantize" in type(m).__name__ for m in qat.modules())
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(qat(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # Training the QAT copy left the float model alone.
    assert all(p.grad is None for p in model.parameters())

    quantized = convert_qat(qat)
    assert qat.training  # convert_qat works on a copy
    with torch.no_grad():
        fake = qat.eval()(x)
        real = quantized(x)
    assert (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.97
    assert (real.argmax(1) == y).float().mean() >= 0.8
    kinds = {type(m) for m in quantized.modules()}
    assert {ao_nn.intrinsic.quantized.LinearReLU, ao_nn.quantized.Linear} <= kinds, kinds
    with pytest.raises(ValueError, match="expects the model returned by prepare_qat"):
        convert_qat(model)


class FlatOrImageCNN(nn.Module):
    """Python control flow on the input, like the zoo's SmallCNN: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = _small_cnn()[:-1]
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        if x.dim() == 2:
            x = x.view(x.shape[0], 1, 8, 8)
        return self.classifier(self.features(x))


def test_untraceable_forward_is_quantized_child_by_child():
    torch.manual_seed(0)
    model = FlatOrImageCNN().eval()
    x = torch.randn(128, 64) * 2 + 0.5
    quantized = quantize_static_int8(model, x[:2], [x[:64], x[64:]])
    assert isinstance(quantized, FlatOrImageCNN)  # the parent stays, its children converted
    kinds = {type(m) for m in quantized.modules()}
    assert {ao_nn.intrinsic.quantized.ConvReLU2d, ao_nn.quantized.Linear} <= kinds, kinds
    with torch.no_grad():
        ref, out = model(x), quantized(x)
        assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9
        torch.testing.assert_close(quantized(x.view(-1, 1, 8, 8)), out)  # both branches run

    qat = prepare_qat(model, x[:2])
    qat(x).sum().backward()
    assert all(p.grad is not None for p in qat.parameters())
    converted = convert_qat(qat)
    assert ao_nn.quantized.Linear in {type(m) for m in converted.modules()}

    class Gate(nn.Module):  # a leaf module nothing inside of which FX can trace
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.scale if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx cannot trace Gate"):
        prepare_qat(Gate(), torch.randn(2, 3))


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match="choose one of"):
        quantize_dynamic_int8(_digits_mlp(8), backend="tpu")
