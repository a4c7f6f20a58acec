"""Connectors: documented shapes, exact layouts derived by hand, trainability, start-up checks."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.connectors import (
    Conv1x1Connector,
    FeatureMapToTokens,
    LinearConnector,
    TokenPoolConnector,
    TokensToFeatureMap,
    check_feature_shapes,
    suggest_connector,
)

CASES = [
    # (connector, student shape, documented output shape)
    (LinearConnector(32, 64), (2, 32), (2, 64)),
    (LinearConnector(32, 64), (2, 5, 32), (2, 5, 64)),
    (Conv1x1Connector(8, 16), (2, 8, 4, 4), (2, 16, 4, 4)),
    (Conv1x1Connector(8, 16, output_size=2), (2, 8, 4, 4), (2, 16, 2, 2)),
    (Conv1x1Connector(8, 16, batch_norm=False, output_size=(8, 6)), (2, 8, 4, 4), (2, 16, 8, 6)),
    (FeatureMapToTokens(8, 24), (2, 8, 4, 4), (2, 16, 24)),
    (FeatureMapToTokens(8, 24, num_tokens=4), (2, 8, 4, 4), (2, 4, 24)),
    (FeatureMapToTokens(8, 24, num_tokens=16, cls_token=True), (2, 8, 8, 8), (2, 17, 24)),
    (TokensToFeatureMap(24, 8), (2, 16, 24), (2, 8, 4, 4)),
    (TokensToFeatureMap(24, 8, output_size=(8, 8), cls_token=True), (2, 17, 24), (2, 8, 8, 8)),
    (TokensToFeatureMap(24, 8, grid_size=(2, 3)), (2, 6, 24), (2, 8, 2, 3)),
    (TokenPoolConnector(24, 12), (2, 17, 24), (2, 12)),
    (TokenPoolConnector(24, 12, pool="cls"), (2, 17, 24), (2, 12)),
    (TokenPoolConnector(24), (2, 17, 24), (2, 24)),
]


@pytest.mark.parametrize(("connector", "in_shape", "out_shape"), CASES)
def test_documented_shape_and_gradient_reaches_every_parameter(connector, in_shape, out_shape):
    torch.manual_seed(0)
    connector.train()
    x = torch.randn(in_shape, requires_grad=True)
    out = connector(x)
    assert out.shape == out_shape
    (out - torch.randn(out_shape)).square().mean().backward()
    for name, param in connector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None
    assert check_feature_shapes(in_shape, out_shape, connector) == (1, *out_shape[1:])


def test_conv1x1_resize_order_is_exact():
    """Resize and 1x1 conv commute, so the cheap order equals resize(conv(x))."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    shrink = Conv1x1Connector(8, 4, batch_norm=False, output_size=(4, 4))
    torch.testing.assert_close(shrink(x), F.adaptive_avg_pool2d(shrink.conv(x), (4, 4)))
    grow = Conv1x1Connector(8, 4, batch_norm=False, output_size=(12, 12))
    expected = F.interpolate(grow.conv(x), size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(grow(x), expected)


def test_feature_map_to_tokens_is_row_major_with_mean_cls_token():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 5)
    connector = FeatureMapToTokens(8, 6, cls_token=True)
    tokens = connector(x)
    for row in range(3):
        for col in range(5):
            expected = connector.proj(x[:, :, row, col])
            torch.testing.assert_close(tokens[:, 1 + row * 5 + col], expected)
    torch.testing.assert_close(tokens[:, 0], connector.proj(x.mean(dim=(2, 3))))


def test_tokens_to_feature_map_drops_cls_and_inverts_the_layout():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 2 * 3, 6)
    connector = TokensToFeatureMap(6, 4, cls_token=True, grid_size=(2, 3))
    fmap = connector(tokens)
    for row in range(2):
        for col in range(3):
            torch.testing.assert_close(
                fmap[:, :, row, col], connector.proj(tokens[:, 1 + row * 3 + col])
            )
    # Round trip of the layouts: identity projections give the original map back.
    to_tokens, to_map = FeatureMapToTokens(4, 4), TokensToFeatureMap(4, 4)
    for proj in (to_tokens.proj, to_map.proj):
        nn.init.eye_(proj.weight)
        nn.init.zeros_(proj.bias)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(to_map(to_tokens(x)), x)


def test_token_pool_mean_leaves_out_cls_token():
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 6)
    connector = TokenPoolConnector(6, 3, cls_token=True)
    torch.testing.assert_close(connector(tokens), connector.proj(tokens[:, 1:].mean(dim=1)))


def test_wrong_inputs_and_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"C=8, got shape \(2, 4, 4, 4\)"):
        Conv1x1Connector(8, 16)(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="D=32"):
        LinearConnector(32, 8)(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="square grid.*cls_token"):
        TokensToFeatureMap(8, 8)(torch.zeros(1, 17, 8))
    with pytest.raises(ValueError, match="square grid"):
        FeatureMapToTokens(8, 8, num_tokens=10)
    with pytest.raises(ValueError, match="resize must be one of"):
        Conv1x1Connector(8, 8, resize="cubic")
    with pytest.raises(ValueError, match="pool must be one of"):
        TokenPoolConnector(8, 8, pool="max")


def test_mismatch_without_connector_names_both_layers_and_the_fix():
    with pytest.raises(ValueError) as error:
        check_feature_shapes(
            (8, 32, 4, 4), (8, 64, 4, 4), None, student_layer="features.3", teacher_layer="layer2"
        )
    message = str(error.value)
    assert "student layer 'features.3' gives (B, 32, 4, 4)" in message
    assert "teacher layer 'layer2' gives (B, 64, 4, 4)" in message
    assert (
        "connector: {class_path: kd_lightning.connectors.Conv1x1Connector, "
        "init_args: {in_channels: 32, out_channels: 64}}" in message
    )
    # Batch size is not compared; equal feature shapes need no connector.
    assert check_feature_shapes((8, 32, 4, 4), (2, 32, 4, 4)) == (8, 32, 4, 4)


PAIRS = [
    ((2, 32), (2, 64)),
    ((2, 5, 32), (2, 5, 64)),
    ((2, 32, 4, 4), (2, 64, 4, 4)),
    ((2, 32, 8, 8), (2, 64, 4, 4)),
    ((2, 32, 8, 8), (2, 16, 96)),
    ((2, 32, 8, 8), (2, 17, 96)),
    ((2, 32, 4, 4), (2, 16, 96)),
    ((2, 64, 48), (2, 64, 8, 8)),
    ((2, 65, 48), (2, 64, 4, 4)),
    ((2, 65, 48), (2, 96)),
]


@pytest.mark.parametrize(("student_shape", "teacher_shape"), PAIRS)
def test_suggested_connector_fixes_the_mismatch(student_shape, teacher_shape):
    suggestion = suggest_connector(student_shape, teacher_shape)
    module_name, _, class_name = suggestion["class_path"].rpartition(".")
    connector = getattr(importlib.import_module(module_name), class_name)(**suggestion["init_args"])
    out = check_feature_shapes(student_shape, teacher_shape, connector)
    assert out[1:] == teacher_shape[1:]


def test_unbridgeable_layouts_say_so():
    assert suggest_connector((2, 32, 4, 4), (2, 64)) is None
    with pytest.raises(ValueError, match="no connector maps these layouts.*pooled"):
        check_feature_shapes((2, 32, 4, 4), (2, 64), where="fitnets")


def test_wrong_or_failing_connector_is_reported_and_state_is_untouched():
    connector = Conv1x1Connector(32, 48)
    connector.train()
    with pytest.raises(
        ValueError, match=r"maps student feature \(B, 32, 4, 4\) to \(B, 48, 4, 4\)"
    ):
        check_feature_shapes((2, 32, 4, 4), (2, 64, 4, 4), connector, where="hint 0")
    with pytest.raises(ValueError, match=r"hint 0: Conv1x1Connector cannot take .*in_channels: 16"):
        check_feature_shapes((2, 16, 4, 4), (2, 48, 4, 4), connector, where="hint 0")
    # The check ran in eval mode: training flag restored, BatchNorm statistics untouched.
    assert connector.training and connector.norm.training
    assert connector.norm.num_batches_tracked.item() == 0
    assert torch.equal(connector.norm.running_mean, torch.zeros(48))


def test_features_module_reexports_connectors():
    features = importlib.import_module("kd_lightning.features")
    assert features.Conv1x1Connector is Conv1x1Connector
    assert features.check_feature_shapes is check_feature_shapes
