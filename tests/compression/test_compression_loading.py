"""QAT observers follow train/eval mode; compressed states load into fresh float models.

The eval-mode claim is checked bitwise on every tensor of ``state_dict()``; the loading claim
by comparing outputs and states of the loaded model with the model that was saved.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from kd_lightning.compression import (
    COMPRESSION_KEY,
    compression_record,
    freeze_observers_in_eval,
    global_prune_masks,
    install_masks,
    is_qat_prepared,
    is_qat_state,
    load_compressed_state_dict,
    magnitude_saliency,
    prepare_for_state_dict,
    prepare_qat,
    qat_record,
)
from kd_lightning.compression.loading import _METADATA_KEY
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.teachers import CHECKPOINT_KEY

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*torch\\.ao\\.quantization is deprecated.*",
    "ignore:.*quantize_per_tensor.*deprecated.*:UserWarning",
)

EXAMPLE = torch.rand(2, 1, 8, 8)


def _trained_qat(net: nn.Module, steps: int = 3) -> nn.Module:
    """A QAT model whose observers have seen data and whose weights moved (a few SGD steps)."""
    torch.manual_seed(0)
    model = prepare_qat(net, EXAMPLE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    after = model.state_dict()
    assert set(after) == set(before)
    return [k for k, v in after.items() if not torch.equal(v, before[k])]


@pytest.mark.parametrize(
    "net", [MLP(10, hidden_sizes=[16]), SmallCNN(10, width=8)], ids=["mlp", "cnn"]
)
def test_eval_forward_changes_no_tensor_and_training_still_observes(net):
    model = _trained_qat(net)
    model.eval()
    before = _snapshot(model)
    with torch.no_grad():  # a range far outside what the observers saw
        model(torch.randn(8, 1, 8, 8) * 50)
        model(torch.randn(8, 1, 8, 8) * 50)
    assert _changed(before, model) == []

    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 8, 8) * 50)
    changed = _changed(before, model)
    # Every activation observer saw a wider range; no parameter changed (no optimizer step).
    assert any(k.endswith("activation_post_process.max_val") for k in changed)
    assert not any(k.endswith(("weight", "bias")) for k in changed)


def test_eval_output_of_a_never_trained_qat_model_is_the_float_output():
    """An observer that saw no data has no int8 grid: its tensor passes unrounded, so the
    prepared MLP computes exactly the float MLP (Linear + ReLU, no BatchNorm to fold)."""
    torch.manual_seed(0)
    net = MLP(10, hidden_sizes=[16]).eval()
    x = torch.randn(8, 1, 8, 8)
    model = prepare_qat(net, EXAMPLE).eval()
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


def test_eval_freeze_survives_copies_and_convert_leaves_the_model_alone():
    from kd_lightning.compression import convert_qat

    model = _trained_qat(MLP(10, hidden_sizes=[16]))
    # Idempotent; input, hidden and output activations + the two weights.
    assert freeze_observers_in_eval(model) == 5
    clone = copy.deepcopy(model).eval()
    before = _snapshot(clone)
    with torch.no_grad():
        clone(torch.randn(4, 1, 8, 8) * 50)
    assert _changed(before, clone) == []
    before = _snapshot(model)
    convert_qat(model.eval())
    assert _changed(before, model) == []
    assert model.training is False


@pytest.mark.parametrize(
    "net", [MLP(10, hidden_sizes=[16]), SmallCNN(10, width=8)], ids=["mlp", "cnn"]
)
def test_qat_state_loads_into_a_fresh_float_model_with_identical_outputs(net):
    model = _trained_qat(net).eval()
    state = model.state_dict()
    record = json.loads(json.dumps(qat_record("", EXAMPLE)))  # plain data only
    assert record == {
        "qat": {
            "module": "",
            "backend": torch.backends.quantized.engine,
            "example_shape": [2, 1, 8, 8],
            "example_dtype": "float32",
        }
    }
    fresh = type(net)(
        **({"hidden_sizes": [16]} if isinstance(net, MLP) else {"width": 8}), num_classes=10
    )
    assert is_qat_state(state) and not is_qat_prepared(fresh)
    loaded = load_compressed_state_dict(fresh, state, record).eval()
    assert is_qat_prepared(loaded)
    assert _changed(_snapshot(model), loaded) == []
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _Method(nn.Module):
    """What a distillation method looks like to a loader: a student next to other models."""

    def __init__(self):
        super().__init__()
        self.student = MLP(10, hidden_sizes=[16])
        self.head = nn.Linear(4, 4)


def test_prepare_for_state_dict_replaces_the_recorded_submodule_and_prunes():
    torch.manual_seed(0)
    saved = _Method()
    saved.student = _trained_qat(saved.student)
    install_masks(
        saved.head, global_prune_masks({"weight": magnitude_saliency(saved.head.weight)}, 0.5)
    )
    record = qat_record("student", EXAMPLE)
    state = saved.state_dict()

    fresh = _Method()
    float_student = fresh.student
    returned = prepare_for_state_dict(fresh, state, record)
    assert returned is fresh and fresh.student is not float_student
    assert is_qat_prepared(fresh.student)
    fresh.load_state_dict(state)  # strict: every key fits
    assert _changed(_snapshot(saved), fresh) == []
    fresh.head(torch.zeros(1, 4))  # the pruning pre-hook recomputes weight = orig * mask
    assert (fresh.head.weight == 0).sum() == 8  # half of 4 x 4
    # Called again on the prepared model, nothing changes (resuming a prepared run).
    student = fresh.student
    assert prepare_for_state_dict(fresh, state, record) is fresh and fresh.student is student

    # The student alone, with its keys' prefix stripped: module_path says where it was.
    alone = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    loaded = load_compressed_state_dict(
        MLP(10, hidden_sizes=[16]), alone, record, module_path="student"
    )
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), saved.student.eval()(x))


def test_a_qat_state_without_a_record_names_the_fix():
    state = _trained_qat(MLP(10, hidden_sizes=[16])).state_dict()
    with pytest.raises(
        ValueError, match=r"no record .*compression=compression_record\(checkpoint\)"
    ):
        prepare_for_state_dict(MLP(10, hidden_sizes=[16]), state)
    with pytest.raises(ValueError, match="lie outside it"):
        prepare_for_state_dict(MLP(10, hidden_sizes=[16]), state, qat_record("student", EXAMPLE))


def test_compression_record_is_read_from_the_checkpoint_metadata_and_from_earlier_files():
    assert _METADATA_KEY == CHECKPOINT_KEY
    record = qat_record("student", EXAMPLE)
    assert compression_record({CHECKPOINT_KEY: {COMPRESSION_KEY: record}}) == record
    legacy = {"kd_lightning_qat": {"backend": "x86", "example_shape": [2, 64], "float_spec": {}}}
    assert compression_record(legacy) == {
        "qat": {
            "module": "student",
            "backend": "x86",
            "example_shape": [2, 64],
            "example_dtype": "float32",
        }
    }
    assert compression_record({CHECKPOINT_KEY: {"student_spec": None}}) is None
