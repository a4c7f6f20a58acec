"""Connectors: small modules, trained with the student, that map a student feature to the teacher's shape.

Student and teacher layers rarely agree in width, resolution or even layout (a CNN's
``(B, C, H, W)`` map against a transformer's ``(B, N, D)`` tokens). FitNets (Romero et al. 2015,
"FitNets: Hints for Thin Deep Nets") introduced the regressor that closes the gap: a learned
map applied to the student's hint layer before it is compared with the teacher's. The
connectors here are that regressor in its common forms:

==========================  ======================  ======================
connector                   student feature         output
==========================  ======================  ======================
``LinearConnector``         ``(B, D)``/``(B, N, D)``  ``(B, D')``/``(B, N, D')``
``Conv1x1Connector``        ``(B, C, H, W)``        ``(B, C', H', W')``
``FeatureMapToTokens``      ``(B, C, H, W)``        ``(B, N, D)``
``TokensToFeatureMap``      ``(B, N, D)``           ``(B, C, H, W)``
``TokenPoolConnector``      ``(B, N, D)``           ``(B, D')``
==========================  ======================  ======================

No connector (``None``) means the student feature is compared as it is.
:func:`check_feature_shapes` verifies a student/teacher pair at start-up and, on a mismatch,
names the connector (with its ``init_args``) that fixes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models.spec import records_init_args

__all__ = [
    "Conv1x1Connector",
    "FeatureMapToTokens",
    "LinearConnector",
    "TokenPoolConnector",
    "TokensToFeatureMap",
    "check_feature_shapes",
    "suggest_connector",
]

_RESIZE_MODES = ("auto", "pool", "bilinear", "nearest")


def _pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def _check_resize(resize: str) -> str:
    if resize not in _RESIZE_MODES:
        raise ValueError(f"resize must be one of {list(_RESIZE_MODES)}, got {resize!r}")
    return resize


def _resize_2d(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` to ``size``: ``auto`` averages when shrinking, else bilinear."""
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "auto":
        shrinking = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
        mode = "pool" if shrinking else "bilinear"
    if mode == "pool":
        return F.adaptive_avg_pool2d(x, size)
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode="nearest")


def _expect(x: torch.Tensor, ndim: int, dim: int, size: int, who: str, layout: str) -> None:
    if x.ndim != ndim or x.shape[dim] != size:
        raise ValueError(
            f"{who} expects {layout} with {layout.split(', ')[dim].strip('()')}={size}, "
            f"got shape {tuple(x.shape)}"
        )


def _grid(num_tokens: int, who: str) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        hint = (
            " (one extra token: set cls_token: true)"
            if math.isqrt(num_tokens - 1) ** 2 == num_tokens - 1
            else ""
        )
        raise ValueError(
            f"{who}: {num_tokens} tokens do not form a square grid{hint}; give grid_size"
        )
    return side, side


@records_init_args
class LinearConnector(nn.Module):
    """Linear projection of the last dimension: ``(B, D) -> (B, D')`` or ``(B, N, D) -> (B, N, D')``.

    Args:
        in_features: student width D.
        out_features: teacher width D'.
        bias: learn an additive bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"LinearConnector expects (B, D) or (B, N, D) with D={self.proj.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        return self.proj(x)


@records_init_args
class Conv1x1Connector(nn.Module):
    """FitNets regressor: 1x1 convolution (+ BatchNorm), optionally resized to the teacher's grid.

    ``(B, C, H, W) -> (B, C', H', W')`` where ``(H', W') = output_size`` (or ``(H, W)`` when
    ``output_size`` is None). The 1x1 convolution and the resize commute, so the resize runs
    on whichever side has fewer pixels; BatchNorm comes last, on the tensor that is compared.

    Args:
        in_channels: student channels C.
        out_channels: teacher channels C'.
        batch_norm: follow the convolution with ``BatchNorm2d`` (the convolution then has no bias).
        output_size: teacher spatial size ``(H', W')`` (an int means square); None keeps ``(H, W)``.
        resize: ``"auto"`` (adaptive average pooling when shrinking, bilinear when enlarging),
            ``"pool"``, ``"bilinear"`` or ``"nearest"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        batch_norm: bool = True,
        output_size: int | tuple[int, int] | None = None,
        resize: str = "auto",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.output_size = _pair(output_size, "output_size")
        self.resize = _check_resize(resize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _expect(x, 4, 1, self.conv.in_channels, "Conv1x1Connector", "(B, C, H, W)")
        size = self.output_size
        if size is not None and size[0] * size[1] < x.shape[-2] * x.shape[-1]:
            x = self.conv(_resize_2d(x, size, self.resize))
        else:
            x = self.conv(x)
            if size is not None:
                x = _resize_2d(x, size, self.resize)
        return self.norm(x)


@records_init_args
class FeatureMapToTokens(nn.Module):
    """CNN -> transformer bridge: ``(B, C, H, W) -> (B, N, D)``.

    The map is optionally resized to a ``sqrt(num_tokens)`` square grid, flattened row-major
    into ``H*W`` tokens and projected to D. With ``cls_token`` a class token, the mean of the
    projected tokens (the CNN's global average pool), is prepended: ``N = 1 + num_tokens``,
    to line up with a ViT teacher whose sequence starts with ``[CLS]``.

    Args:
        in_channels: student channels C.
        out_dim: teacher token width D.
        num_tokens: spatial tokens wanted (a perfect square); None keeps ``H*W``.
        cls_token: prepend a pooled class token.
        resize: how to reach the token grid, see :class:`Conv1x1Connector`.
    """

    def __init__(
        self,
        in_channels: int,
        out_dim: int,
        num_tokens: int | None = None,
        cls_token: bool = False,
        resize: str = "auto",
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_dim)
        self.grid = None if num_tokens is None else _grid(num_tokens, "FeatureMapToTokens")
        self.cls_token = cls_token
        self.resize = _check_resize(resize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _expect(x, 4, 1, self.proj.in_features, "FeatureMapToTokens", "(B, C, H, W)")
        if self.grid is not None:
            x = _resize_2d(x, self.grid, self.resize)
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        if self.cls_token:
            tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return tokens


@records_init_args
class TokensToFeatureMap(nn.Module):
    """Transformer -> CNN bridge: ``(B, N, D) -> (B, C, H, W)``.

    Drops the leading class token when ``cls_token``, lays the remaining tokens on their
    row-major grid (square ``sqrt(N)`` unless ``grid_size`` is given), projects D -> C
    (a 1x1 convolution, computed as a linear map on the tokens) and resizes to ``output_size``.

    Args:
        in_dim: student token width D.
        out_channels: teacher channels C.
        output_size: teacher spatial size ``(H, W)``; None keeps the token grid.
        cls_token: the sequence starts with a class token to drop.
        grid_size: token grid ``(h, w)`` for non-square grids.
        resize: see :class:`Conv1x1Connector`.
    """

    def __init__(
        self,
        in_dim: int,
        out_channels: int,
        output_size: int | tuple[int, int] | None = None,
        cls_token: bool = False,
        grid_size: int | tuple[int, int] | None = None,
        resize: str = "auto",
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_channels)
        self.output_size = _pair(output_size, "output_size")
        self.cls_token = cls_token
        self.grid_size = _pair(grid_size, "grid_size")
        self.resize = _check_resize(resize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _expect(x, 3, 2, self.proj.in_features, "TokensToFeatureMap", "(B, N, D)")
        if self.cls_token:
            x = x[:, 1:]
        batch, num_tokens, _ = x.shape
        h, w = self.grid_size or _grid(num_tokens, "TokensToFeatureMap")
        if h * w != num_tokens:
            raise ValueError(
                f"TokensToFeatureMap: grid_size {(h, w)} needs {h * w} tokens, got {num_tokens}"
            )
        fmap = self.proj(x).transpose(1, 2).reshape(batch, -1, h, w)
        if self.output_size is not None:
            fmap = _resize_2d(fmap, self.output_size, self.resize)
        return fmap


@records_init_args
class TokenPoolConnector(nn.Module):
    """Pool tokens to one vector, then project: ``(B, N, D) -> (B, D')``.

    Args:
        in_dim: student token width D.
        out_dim: teacher width D'; None skips the projection (``D' = D``).
        pool: ``"mean"`` over the tokens, or ``"cls"`` to take the first token.
        cls_token: with ``pool="mean"``, leave the leading class token out of the mean.
    """

    def __init__(
        self, in_dim: int, out_dim: int | None = None, pool: str = "mean", cls_token: bool = False
    ) -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be one of ['mean', 'cls'], got {pool!r}")
        self.in_dim = in_dim
        self.pool = pool
        self.cls_token = cls_token
        self.proj = nn.Identity() if out_dim is None else nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _expect(x, 3, 2, self.in_dim, "TokenPoolConnector", "(B, N, D)")
        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            pooled = (x[:, 1:] if self.cls_token else x).mean(dim=1)
        return self.proj(pooled)


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(["B", *(str(s) for s in shape[1:])]) + ")"


def _yaml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def suggest_connector(
    student_shape: Sequence[int], teacher_shape: Sequence[int]
) -> dict[str, Any] | None:
    """The connector config (``{"class_path", "init_args"}``) mapping student to teacher shape.

    Shapes include the batch dimension. Returns None when the shapes already agree or when no
    connector here bridges them (e.g. a feature map against a pooled vector).
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s[1:] == t[1:]:
        return None
    cls: type | None = None
    args: dict[str, Any] = {}
    if len(s) == len(t) == 2 or (len(s) == len(t) == 3 and s[1] == t[1]):
        cls, args = LinearConnector, {"in_features": s[-1], "out_features": t[-1]}
    elif len(s) == len(t) == 4:
        cls, args = Conv1x1Connector, {"in_channels": s[1], "out_channels": t[1]}
        if s[2:] != t[2:]:
            args["output_size"] = list(t[2:])
    elif len(s) == 4 and len(t) == 3:
        cls, args = FeatureMapToTokens, {"in_channels": s[1], "out_dim": t[2]}
        num_tokens, square = t[1], math.isqrt(t[1]) ** 2 == t[1]
        if not square and math.isqrt(t[1] - 1) ** 2 == t[1] - 1:
            num_tokens, args["cls_token"] = t[1] - 1, True
        elif not square:
            return None
        if num_tokens != s[2] * s[3]:
            args["num_tokens"] = num_tokens
    elif len(s) == 3 and len(t) == 4:
        cls, args = TokensToFeatureMap, {"in_dim": s[2], "out_channels": t[1]}
        if math.isqrt(s[1]) ** 2 != s[1]:
            if math.isqrt(s[1] - 1) ** 2 != s[1] - 1:
                return None
            args["cls_token"] = True
        args["output_size"] = list(t[2:])
    elif len(s) == 3 and len(t) == 2:
        cls, args = TokenPoolConnector, {"in_dim": s[2], "out_dim": t[1]}
    if cls is None:
        return None
    return {"class_path": _class_path(cls), "init_args": args}


def _run_connector(connector: nn.Module, shape: Sequence[int]) -> torch.Size:
    """Output shape of ``connector`` on zeros, without touching its BatchNorm statistics."""
    param = next(iter(connector.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    flags = [(m, m.training) for m in connector.modules()]
    connector.eval()
    try:
        with torch.no_grad():
            return connector(torch.zeros((1, *shape[1:]), device=device, dtype=dtype)).shape
    finally:
        for module, flag in flags:
            module.training = flag


def check_feature_shapes(
    student_shape: Sequence[int],
    teacher_shape: Sequence[int],
    connector: nn.Module | None = None,
    *,
    where: str = "",
    student_layer: str | None = None,
    teacher_layer: str | None = None,
) -> torch.Size:
    """Check at start-up that a (connected) student feature matches the teacher feature.

    The connector runs once on zeros of ``student_shape`` (batch 1, eval mode, no grad, so its
    BatchNorm statistics are untouched); the batch dimension is not compared.

    Args:
        student_shape: shape of the captured student feature (batch first).
        teacher_shape: shape of the captured teacher feature (batch first).
        connector: the module applied to the student feature, or None.
        where: context for the message, e.g. the loss term's name.
        student_layer: the student's layer spec, for the message.
        teacher_layer: the teacher's layer spec, for the message.

    Returns:
        The shape the connector produces (batch 1), or ``student_shape`` without connector.

    Raises:
        ValueError: the shapes disagree (or the connector fails on the student shape); the
            message names both layers and shapes and the connector config that fixes it.
    """
    s_name = f"student layer {student_layer!r}" if student_layer else "student feature"
    t_name = f"teacher layer {teacher_layer!r}" if teacher_layer else "teacher feature"
    prefix = f"{where}: " if where else ""
    suggestion = suggest_connector(student_shape, teacher_shape)
    if suggestion is not None:
        fix = f"add `connector: {_yaml(suggestion)}`"
    else:
        fix = (
            "no connector maps these layouts; capture a student layer whose layout matches "
            "the teacher's (e.g. the pooled features instead of a feature map)"
        )
    if connector is None:
        if tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
            return torch.Size(student_shape)
        raise ValueError(
            f"{prefix}{s_name} gives {_fmt(student_shape)} but {t_name} gives "
            f"{_fmt(teacher_shape)}: {fix}"
        )
    name = type(connector).__name__
    try:
        out = _run_connector(connector, student_shape)
    except Exception as error:
        raise ValueError(
            f"{prefix}{name} cannot take {s_name} of shape {_fmt(student_shape)} ({error}); "
            f"{t_name} gives {_fmt(teacher_shape)}: {fix.replace('add', 'use', 1)}"
        ) from error
    if tuple(out[1:]) != tuple(teacher_shape[1:]):
        raise ValueError(
            f"{prefix}{name} maps {s_name} {_fmt(student_shape)} to {_fmt(out)} but {t_name} "
            f"gives {_fmt(teacher_shape)}: {fix.replace('add', 'use', 1)}"
        )
    return out
