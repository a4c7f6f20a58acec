"""Feature capture: hooks read the right tensors, keep autograd, and leave nothing behind."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kd_lightning.features import (
    FeatureCapture,
    FeatureSpec,
    feature_shapes,
    list_layer_names,
    unwrap_model,
    validate_layer_names,
)


class Scale(nn.Module):
    def forward(self, x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
        return x * factor


class DictEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.proj(tokens), "aux": tokens.mean(dim=1)}


class TinyNet(nn.Module):
    """CNN stem -> tokens -> attention: exercises tensor, tuple, dict and keyword-only I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.encoder = DictEncoder()
        self.scale = Scale()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.layer2(self.layer1(self.stem(x)))
        tokens = fmap.flatten(2).transpose(1, 2)
        tokens, _ = self.attn(tokens, tokens, tokens)
        tokens = self.encoder(tokens)["hidden"]
        return self.head(self.scale(x=tokens.mean(dim=1)))


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


def test_output_and_input_equal_the_modules_own_tensors(model, x):
    capture = FeatureCapture(model, ["layer1", "layer1.1", "layer2:input", ":input", "stem:output"])
    with capture as feats:
        model(x)
    stem = model.stem(x)
    layer1 = model.layer1(stem)
    assert torch.equal(feats["layer1"], layer1)
    assert torch.equal(feats["layer1.1"], model.layer1[1](model.layer1[0](stem)))
    # The input of layer2 is the output of layer1, captured before layer2 runs.
    assert torch.equal(feats["layer2:input"], layer1)
    assert feats[":input"] is x
    assert torch.equal(feats["stem:output"], stem)
    assert list(feats) == capture.layers or set(feats) == set(capture.layers)


def test_tuple_dict_and_keyword_selection(model, x):
    layers = [
        "attn",
        "attn:output.1",
        "encoder:output.aux",
        "encoder",
        "scale:input",
        "scale:input.x",
    ]
    with FeatureCapture(model, layers) as feats:
        model(x)
    tokens = model.layer2(model.layer1(model.stem(x))).flatten(2).transpose(1, 2)
    attn_out, attn_weights = model.attn(tokens, tokens, tokens)
    assert torch.equal(feats["attn"], attn_out)  # first tensor of the (output, weights) tuple
    assert torch.equal(feats["attn:output.1"], attn_weights)
    assert feats["attn:output.1"].shape == (2, 16, 16)
    encoded = model.encoder(attn_out)
    assert torch.equal(feats["encoder:output.aux"], encoded["aux"])
    assert torch.equal(feats["encoder"], encoded["hidden"])  # first value of the dict
    # `scale` is called with a keyword argument only: found both implicitly and by name.
    assert torch.equal(feats["scale:input"], encoded["hidden"].mean(dim=1))
    assert feats["scale:input.x"] is feats["scale:input"]


def test_spec_parsing():
    assert FeatureSpec.parse("blocks.5.attn") == FeatureSpec(
        "blocks.5.attn", "blocks.5.attn", "output"
    )
    spec = FeatureSpec.parse("blocks.5.attn:output.1.hidden")
    assert (spec.path, spec.kind, spec.selectors) == ("blocks.5.attn", "output", (1, "hidden"))
    assert FeatureSpec.parse(":input").path == ""
    with pytest.raises(ValueError, match="'output' or 'input'"):
        FeatureSpec.parse("layer1:outptu")
    with pytest.raises(ValueError, match="empty selector"):
        FeatureSpec.parse("layer1:output..0")


def test_hooks_removed_and_tensors_released_after_exit(model, x):
    capture = FeatureCapture(model, ["layer1", "layer2:input"])
    assert _all_hooks(model) == 0
    with capture as feats:
        assert _all_hooks(model) == 2 and capture.active
        model(x)
        assert capture.features is feats
    assert _all_hooks(model) == 0 and not capture.active
    with pytest.raises(RuntimeError, match="only available inside"):
        _ = capture.features
    # The capture holds no reference: the tensor dies with the caller's dict.
    ref = weakref.ref(feats["layer1"])
    del feats
    gc.collect()
    assert ref() is None


def test_hooks_removed_when_forward_raises(model):
    capture = FeatureCapture(model, ["layer1"])
    with pytest.raises(RuntimeError), capture:
        model(torch.randn(2, 5, 8, 8))  # wrong channel count
    assert _all_hooks(model) == 0


def test_reentering_active_capture_is_an_error(model):
    capture = FeatureCapture(model, ["layer1"])
    with capture, pytest.raises(RuntimeError, match="already active"), capture:
        pass
    assert _all_hooks(model) == 0


def test_layer_that_did_not_run_names_itself(model):
    with FeatureCapture(model, ["head"]) as feats:
        model.stem(torch.randn(1, 3, 4, 4))
    with pytest.raises(KeyError, match="'head'.*did not run"):
        feats["head"]


def test_student_features_keep_graph_teacher_under_no_grad_does_not(model, x):
    student = model.train()
    with FeatureCapture(student, ["layer1"]) as feats:
        student(x)
    assert feats["layer1"].requires_grad
    feats["layer1"].square().mean().backward()
    # The loss touches only an intermediate feature, yet the gradient reaches the stem.
    assert student.stem.weight.grad is not None and student.stem.weight.grad.abs().sum() > 0
    assert student.head.weight.grad is None

    teacher = TinyNet().eval()
    with torch.no_grad(), FeatureCapture(teacher, ["layer1"]) as teacher_feats:
        teacher(x)
    assert not teacher_feats["layer1"].requires_grad


def test_hundred_steps_leave_no_hooks_and_no_tensors(model):
    x = torch.randn(1, 3, 4, 4)  # tiny on purpose: the test counts objects, not FLOPs
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    capture = FeatureCapture(model, ["layer1", "layer2:input", "attn"])

    captured: list[weakref.ref] = []

    def step() -> None:
        with capture as feats:
            logits = model(x)
        loss = logits.logsumexp(-1).mean() + sum(f.square().mean() for f in feats.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        captured.extend(weakref.ref(f) for f in feats.values())
        assert _all_hooks(model) == 0 and capture._features is None

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))

    step()  # optimizer state and grads are allocated once
    before = live_tensors()
    for _ in range(100):
        step()
    # Freed by reference counting alone (no cycle through the hooks), and nothing else piles up.
    assert len(captured) == 303 and all(ref() is None for ref in captured)
    assert live_tensors() == before


def test_wrong_layer_name_suggests_close_valid_names(model):
    with pytest.raises(ValueError) as error:
        FeatureCapture(model, ["layer1", "layr2", "attn.out_prj"], model_name="student")
    message = str(error.value)
    assert "student" in message and "'layr2'" in message and "'layer2'" in message
    assert "'attn.out_proj'" in message
    assert "list_layer_names" in message
    with pytest.raises(ValueError, match="parameter or buffer.*'stem'"):
        validate_layer_names(model, ["stem.weight"])
    with pytest.raises(ValueError, match="listed twice"):
        validate_layer_names(model, ["layer1", "layer1"])
    assert "layer1.0" in list_layer_names(model)


def test_bf16_autocast_capture_keeps_module_dtype(model, x):
    model.train()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        FeatureCapture(model, ["stem", "layer2:input", "head"]) as feats,
    ):
        logits = model(x)
    assert feats["stem"].dtype == torch.bfloat16  # conv runs in bf16 under autocast
    assert feats["head"].dtype == logits.dtype == torch.bfloat16
    assert torch.equal(feats["head"], logits)
    feats["stem"].float().square().mean().backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.dtype == torch.float32


def test_data_parallel_wrapper_names_with_or_without_module_prefix(model, x):
    wrapped = nn.DataParallel(model)  # without GPUs it simply calls the module
    assert unwrap_model(wrapped) is model
    with FeatureCapture(wrapped, ["module.layer1", "layer1"]) as feats:
        wrapped(x)
    assert torch.equal(feats["module.layer1"], feats["layer1"])
    assert torch.equal(feats["layer1"], model.layer1(model.stem(x)))


def test_ddp_wrapped_model(model, x, tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(model.train())
        with FeatureCapture(ddp, ["module.layer2", "layer1:input"]) as feats:
            logits = ddp(x)
        assert _all_hooks(model) == 0
        assert torch.equal(feats["layer1:input"], model.stem(x))
        (logits.sum() + feats["module.layer2"].sum()).backward()
        assert model.stem.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_feature_shapes_leaves_model_state_alone(model, x):
    model.train()
    model.attn.eval()  # a mixed-mode model keeps each module's own flag
    running_mean = model.layer1[1].running_mean.clone()
    shapes = feature_shapes(model, ["layer1", "attn", "head:input"], x)
    assert shapes == {
        "layer1": torch.Size([2, 8, 8, 8]),
        "attn": torch.Size([2, 16, 16]),
        "head:input": torch.Size([2, 16]),
    }
    assert model.training and model.layer1.training and not model.attn.training
    assert torch.equal(model.layer1[1].running_mean, running_mean)
    assert _all_hooks(model) == 0
