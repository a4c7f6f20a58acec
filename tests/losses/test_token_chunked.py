"""Memory-bounded token KD: chunked and fused-linear forms equal the naive form.

Values and gradients (to logits, hidden states, output weight and bias) are compared with the
autograd of the naive form (float64 rel 1e-10, float32 rel 1e-5), over every objective, with
masked tokens, -inf teacher entries and chunk sizes that do not divide the token count. A
dispatch-level probe checks that no (N, V) tensor is ever created by the fused form.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kd_lightning.functional.token import token_divergence
from kd_lightning.functional.token_chunked import (
    chunked_token_divergence,
    default_chunk_rows,
    fused_linear_token_divergence,
)
from kd_lightning.losses.token import FusedLinearTokenDistillationLoss, TokenDistillationLoss

OBJECTIVES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.3),
    ("jsd", 0.0),
    ("jsd", 1.0),
    ("total_variation", 0.5),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
B, L, H, V = 3, 5, 6, 11


def assert_rel_close(actual, expected, rel):
    """Elementwise ``|a - e| <= rel * max|e|`` (relative to the tensor's scale)."""
    scale = expected.abs().max().item()
    assert scale > 0
    assert (actual - expected).abs().max().item() <= rel * scale


def problem(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=generator, dtype=dtype)
    weight = torch.randn(V, H, generator=generator, dtype=dtype)
    bias = torch.randn(V, generator=generator, dtype=dtype)
    teacher_hidden = torch.randn(B, L, H + 2, generator=generator, dtype=dtype)
    teacher_weight = torch.randn(V, H + 2, generator=generator, dtype=dtype)
    teacher_bias = torch.randn(V, generator=generator, dtype=dtype)
    target = torch.randint(0, V, (B, L), generator=generator)
    target[0, 3] = -100
    mask = torch.ones(B, L)
    mask[2, 3:] = 0
    teacher = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    teacher[..., 0] = -math.inf
    teacher[1, 1, 4:7] = -math.inf
    return dict(
        hidden=hidden.requires_grad_(True),
        weight=weight.requires_grad_(True),
        bias=bias.requires_grad_(True),
        teacher=teacher,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        target=target,
        mask=mask,
    )


def naive(data, **options):
    logits = F.linear(data["hidden"], data["weight"], data["bias"])
    teacher = options.pop("teacher", data["teacher"])
    loss = token_divergence(logits, teacher, data["target"], data["mask"], **options)
    return loss, torch.autograd.grad(loss, (data["hidden"], data["weight"], data["bias"]))


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_naive(objective, beta, dtype, chunk_size):
    data = problem(dtype)
    options = dict(objective=objective, beta=beta, temperature=1.5, reduction="sequence")
    expected, expected_grads = naive(data, **options)
    logits = F.linear(data["hidden"], data["weight"], data["bias"])
    loss = chunked_token_divergence(
        logits, data["teacher"], data["target"], data["mask"], chunk_size=chunk_size, **options
    )
    grads = torch.autograd.grad(loss, (data["hidden"], data["weight"], data["bias"]))
    rel = TOLERANCE[dtype]
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(expected.item(), rel=rel)
    for grad, reference in zip(grads, expected_grads, strict=True):
        assert_rel_close(grad, reference, rel)


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_fused_linear_equals_naive(objective, beta, dtype, teacher_form):
    data = problem(dtype, seed=1)
    options = dict(objective=objective, beta=beta, temperature=0.7, shift=True)
    teacher = dict(teacher=data["teacher"])
    if teacher_form == "hidden":
        # The teacher's own logits from hidden + weight (no -inf entries on this path).
        teacher = dict(
            teacher=data["teacher_hidden"],
            teacher_weight=data["teacher_weight"],
            teacher_bias=data["teacher_bias"],
        )
        naive_teacher = F.linear(
            data["teacher_hidden"], data["teacher_weight"], data["teacher_bias"]
        )
        expected, expected_grads = naive(data, teacher=naive_teacher, **options)
    else:
        expected, expected_grads = naive(data, **options)
    loss = fused_linear_token_divergence(
        data["hidden"],
        data["weight"],
        target=data["target"],
        mask=data["mask"],
        student_bias=data["bias"],
        chunk_size=4,
        **teacher,
        **options,
    )
    grads = torch.autograd.grad(loss, (data["hidden"], data["weight"], data["bias"]))
    rel = TOLERANCE[dtype]
    assert loss.item() == pytest.approx(expected.item(), rel=rel)
    for grad, reference in zip(grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        assert_rel_close(grad, reference, rel)


def test_fused_scales_by_incoming_gradient_and_skips_frozen_inputs():
    data = problem(torch.float64, seed=2)
    _, (_, expected_weight_grad, _) = naive(data, objective="jsd")
    hidden = data["hidden"].detach()  # frozen trunk: only the head trains, and no bias
    weight = data["weight"]
    loss = fused_linear_token_divergence(
        hidden,
        weight,
        data["teacher"],
        data["target"],
        data["mask"],
        objective="jsd",
        student_bias=data["bias"].detach(),
        chunk_size=2,
    )
    (3.0 * loss).backward()
    assert_rel_close(weight.grad, 3.0 * expected_weight_grad, 1e-10)
    with torch.no_grad():
        value = fused_linear_token_divergence(
            data["hidden"],
            weight,
            data["teacher"],
            data["target"],
            data["mask"],
            objective="jsd",
            student_bias=data["bias"],
        )
    assert value.item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("form", ["chunked", "fused"])
def test_dropped_tokens_change_nothing(form):
    data = problem(torch.float64, seed=3)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[:, -1] = False  # shift
    keep[:, :-1] &= data["target"][:, 1:] != -100
    keep[:, :-1] &= (data["mask"][:, 1:] != 0) & (data["mask"][:, :-1] != 0)

    def run(hidden, teacher):
        hidden = hidden.detach().requires_grad_(True)
        if form == "chunked":
            logits = F.linear(hidden, data["weight"], data["bias"])
            loss = chunked_token_divergence(
                logits, teacher, data["target"], data["mask"], chunk_size=2
            )
        else:
            loss = fused_linear_token_divergence(
                hidden,
                data["weight"],
                teacher,
                data["target"],
                data["mask"],
                student_bias=data["bias"],
                chunk_size=2,
            )
        return loss, torch.autograd.grad(loss, hidden)[0]

    loss, grad = run(data["hidden"], data["teacher"])
    hidden, teacher = data["hidden"].detach().clone(), data["teacher"].clone()
    hidden[~keep] = math.nan
    teacher[~keep] = math.inf
    changed, changed_grad = run(hidden, teacher)
    assert torch.isfinite(loss) and changed.item() == loss.item()
    assert torch.equal(changed_grad, grad)
    assert torch.all(grad[~keep] == 0) and torch.all(grad[keep].abs().sum(-1) > 0)


class LargestNewTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op writes into fresh memory (not an alias)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, value.numel())
        return out


def test_fused_never_creates_full_logits():
    tokens, vocab, hidden_size, chunk = 64, 40, 8, 8
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(tokens, hidden_size, generator=generator)
    teacher_weight = torch.randn(vocab, hidden_size, generator=generator)
    probe = LargestNewTensor()
    with probe:
        loss = fused_linear_token_divergence(
            hidden,
            weight,
            teacher_hidden,
            teacher_weight=teacher_weight,
            objective="jsd",
            shift=False,
            chunk_size=chunk,
        )
        loss.backward()
    assert probe.largest <= max(chunk * vocab, vocab * hidden_size, tokens * hidden_size)
    assert probe.largest < tokens * vocab
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_chunked_forward_holds_no_full_probabilities():
    tokens, vocab, chunk = 64, 40, 8
    student = torch.randn(tokens, vocab, requires_grad=True)
    teacher = torch.randn(tokens, vocab)
    probe = LargestNewTensor()
    with probe:
        loss = chunked_token_divergence(student, teacher, shift=False, chunk_size=chunk)
    assert probe.largest <= chunk * vocab
    loss.backward()  # the only (N, V) tensor: the logits' gradient
    assert torch.isfinite(student.grad).all()


def test_modules_memory_bounded_forms_equal_plain_module():
    data = problem(torch.float64, seed=4)
    logits = F.linear(data["hidden"], data["weight"], data["bias"])
    args = dict(teacher=data["teacher"], target=data["target"], mask=data["mask"])
    plain = TokenDistillationLoss(objective="reverse_kl", temperature=2.0)(student=logits, **args)
    chunked = TokenDistillationLoss(objective="reverse_kl", temperature=2.0, chunk_size=3)(
        student=logits, **args
    )
    fused = FusedLinearTokenDistillationLoss(objective="reverse_kl", temperature=2.0)(
        student=data["hidden"], student_weight=data["weight"], student_bias=data["bias"], **args
    )
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)


def test_fused_crops_padded_vocabulary_rows_or_names_both_sizes():
    data = problem(torch.float64, seed=5)
    padded_weight = torch.cat([data["teacher_weight"], torch.randn(5, H + 2, dtype=torch.float64)])
    loss = FusedLinearTokenDistillationLoss(crop_vocab=True)
    teacher_args = dict(teacher=data["teacher_hidden"], teacher_weight=padded_weight)
    value = loss(student=data["hidden"], student_weight=data["weight"], **teacher_args)
    reference = token_divergence(
        F.linear(data["hidden"], data["weight"]),
        F.linear(data["teacher_hidden"], data["teacher_weight"]),
    )
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    with pytest.raises(
        ValueError, match=r"Student vocabulary size 11 != teacher vocabulary size 16"
    ):
        FusedLinearTokenDistillationLoss()(
            student=data["hidden"], student_weight=data["weight"], **teacher_args
        )


def test_fused_under_bf16_autocast_is_float32_and_close():
    data = problem(torch.float32, seed=6)
    hidden = data["hidden"].detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_token_divergence(
            hidden, data["weight"], data["teacher"], data["target"], data["mask"], objective="jsd"
        )
    loss.backward()
    reference = token_divergence(
        F.linear(hidden.detach().float(), data["weight"].detach().bfloat16().float()),
        data["teacher"],
        data["target"],
        data["mask"],
        objective="jsd",
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad.float()).all()
    assert data["weight"].grad.dtype == torch.float32


def test_default_chunk_is_a_sixteenth_of_the_tokens_within_bounds():
    # ceil(4096 / 16) = 256 rows of 128000 logits: between 2**23 // 128000 = 65 and 2**26 // 128000 = 524.
    assert default_chunk_rows(4096, 128_000) == 256
    assert default_chunk_rows(100_000, 128_000) == 524  # at most 64M logits per chunk
    assert default_chunk_rows(1024, 128_000) == 65  # at least 8M logits per chunk
    assert default_chunk_rows(64, 40) >= 64  # tiny problems: one chunk
