"""Token-level distillation objectives: a pure-Python loop reference and the properties.

The reference below is written from the equations alone (math module, nested lists, explicit
loops over sequences, positions and vocabulary entries); it shares no code with the library.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.functional.token import (
    check_vocab_sizes,
    token_divergence,
    token_forward_kl,
    token_generalized_jsd,
    token_reverse_kl,
    token_weights,
)
from kd_lightning.losses.token import (
    TokenDistillationLoss,
    TokenForwardKLLoss,
    TokenGeneralizedJSDLoss,
    TokenReverseKLLoss,
    TokenTotalVariationLoss,
)

OBJECTIVES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.2),
    ("jsd", 0.0),
    ("jsd", 1.0),
    ("total_variation", 0.5),
]
NEG_INF = -math.inf


def softmax(row, temperature):
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def loop_divergence(s_row, t_row, objective, beta, temperature):
    p = softmax(t_row, temperature)
    q = softmax(s_row, temperature)
    if objective == "jsd" and beta == 0.0:
        objective = "forward_kl"
    if objective == "jsd" and beta == 1.0:
        objective = "reverse_kl"
    if objective == "forward_kl":
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
    if objective == "reverse_kl":
        # Over the teacher's support: the student renormalised there.
        kept = [i for i, pi in enumerate(p) if pi > 0]
        mass = sum(q[i] for i in kept)
        return sum((q[i] / mass) * math.log((q[i] / mass) / p[i]) for i in kept)
    if objective == "jsd":
        total = 0.0
        for pi, qi in zip(p, q, strict=True):
            mi = beta * pi + (1 - beta) * qi
            if pi > 0:
                total += beta * pi * math.log(pi / mi)
            total += (1 - beta) * qi * math.log(qi / mi)
        return total
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))


def loop_loss(student, teacher, target, mask, objective, beta, temperature, shift, reduction):
    """Student/teacher (B, L, V) tensors; target/mask (B, L) or None; T^2-scaled mean."""
    s, t = student.tolist(), teacher.tolist()
    batch, length = student.shape[:2]
    per_sequence = []
    for b in range(batch):
        values = []
        for pos in range(length - 1 if shift else length):
            nxt = pos + 1 if shift else pos
            if target is not None and int(target[b, nxt]) == -100:
                continue
            if mask is not None and (mask[b, nxt] == 0 or mask[b, pos] == 0):
                continue
            values.append(loop_divergence(s[b][pos], t[b][pos], objective, beta, temperature))
        per_sequence.append(values)
    if reduction == "token":
        flat = [v for values in per_sequence for v in values]
        mean = sum(flat) / len(flat)
    else:
        means = [sum(v) / len(v) for v in per_sequence if v]
        mean = sum(means) / len(means)
    return temperature**2 * mean


def batch(seed=0, dtype=torch.float64, b=3, length=6, vocab=7):
    generator = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(b, length, vocab, generator=generator, dtype=dtype)
    teacher = 2 * torch.randn(b, length, vocab, generator=generator, dtype=dtype)
    target = torch.randint(0, vocab, (b, length), generator=generator)
    target[0, 2] = target[1, 0] = target[2, 4] = -100
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    mask[2, 0] = 0  # left padding
    return student, teacher, target, mask


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_matches_loop_reference(objective, beta, shift, reduction):
    student, teacher, target, mask = batch()
    # Sequence 0 keeps tokens with uneven counts across sequences, so the reductions differ.
    mask[0, 3:] = 0
    kwargs = dict(objective=objective, beta=beta, temperature=1.7, shift=shift)
    loss = token_divergence(student, teacher, target, mask, reduction=reduction, **kwargs)
    expected = loop_loss(student, teacher, target, mask, objective, beta, 1.7, shift, reduction)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_reductions_differ_as_documented():
    """'token' weighs tokens equally, 'sequence' weighs sequences equally (by hand, 2 sequences)."""
    student, teacher, _, _ = batch()
    student, teacher = student[:2, :4], teacher[:2, :4]
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    rows = [
        [
            loop_divergence(student[b, t].tolist(), teacher[b, t].tolist(), "forward_kl", 0, 1)
            for t in range(4)
        ]
        for b in range(2)
    ]
    token = token_forward_kl(student, teacher, mask=mask, shift=False)
    sequence = token_forward_kl(student, teacher, mask=mask, shift=False, reduction="sequence")
    assert token.item() == pytest.approx((sum(rows[0]) + rows[1][0]) / 5, rel=1e-12)
    assert sequence.item() == pytest.approx((sum(rows[0]) / 4 + rows[1][0]) / 2, rel=1e-12)


def test_flat_tokens_match_loop():
    student, teacher, target, _ = batch()
    flat_s, flat_t, flat_y = student.reshape(-1, 7), teacher.reshape(-1, 7), target.reshape(-1)
    loss = token_reverse_kl(flat_s, flat_t, flat_y, shift=False, temperature=2.0)
    expected = loop_loss(student, teacher, target, None, "reverse_kl", 0, 2.0, False, "token")
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_jsd_symmetric_at_half():
    student, teacher, target, mask = batch(seed=1)
    forward = token_generalized_jsd(student, teacher, target, mask, beta=0.5)
    swapped = token_generalized_jsd(teacher, student, target, mask, beta=0.5)
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-12)
    assert 0 < forward.item() <= math.log(2)


def test_jsd_ends_are_the_two_kls():
    """beta=0 is KL(teacher || student), beta=1 is KL(student || teacher) (TRL's convention).

    They are the limits of JSD_beta / beta and JSD_beta / (1 - beta), which pins which end is
    which independently of the special case in the code.
    """
    student, teacher, target, mask = batch(seed=2)
    forward = token_forward_kl(student, teacher, target, mask)
    reverse = token_reverse_kl(student, teacher, target, mask)
    assert forward.item() != pytest.approx(reverse.item(), rel=1e-3)
    jsd = lambda beta: token_generalized_jsd(student, teacher, target, mask, beta=beta).item()  # noqa: E731
    assert jsd(0.0) == pytest.approx(forward.item(), rel=1e-14)
    assert jsd(1.0) == pytest.approx(reverse.item(), rel=1e-14)
    eps = 1e-7
    assert jsd(eps) / eps == pytest.approx(forward.item(), rel=1e-4)
    assert jsd(1 - eps) / eps == pytest.approx(reverse.item(), rel=1e-4)


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
def test_zero_with_zero_gradient_for_equal_inputs(objective, beta):
    _, teacher, target, mask = batch(seed=3)
    student = teacher.clone().requires_grad_(True)
    loss = token_divergence(student, teacher, target, mask, objective=objective, beta=beta)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(loss.item()) < 1e-14
    assert grad.abs().max().item() < 1e-14


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("shift", [True, False])
def test_dropped_tokens_change_nothing(objective, beta, shift):
    student, teacher, target, mask = batch(seed=4)
    student.requires_grad_(True)
    kwargs = dict(objective=objective, beta=beta, shift=shift, temperature=1.3)
    loss = token_divergence(student, teacher, target, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    kept = token_weights((3, 6), target, mask, shift=shift) > 0
    assert 0 < kept.sum() < kept.numel()
    changed_s, changed_t = student.detach().clone(), teacher.clone()
    changed_s[~kept] = torch.tensor(
        [math.nan, math.inf, -math.inf, 1e4, 0, 0, 0], dtype=torch.float64
    )
    changed_t[~kept] = torch.tensor([math.inf, math.nan, 3.0, 0, 0, 0, 0], dtype=torch.float64)
    changed_s.requires_grad_(True)
    changed = token_divergence(changed_s, changed_t, target, mask, **kwargs)
    (changed_grad,) = torch.autograd.grad(changed, changed_s)
    assert changed.item() == loss.item()
    assert torch.equal(changed_grad, grad)
    assert torch.all(grad[~kept] == 0)
    assert torch.all(grad[kept].abs().sum(-1) > 0)


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minus_inf_teacher_gives_finite_loss_and_gradient(objective, beta, dtype):
    student, teacher, target, mask = batch(seed=5, dtype=dtype)
    teacher[..., 0] = -math.inf  # a padded vocabulary entry everywhere
    teacher[0, 1, 2:5] = -math.inf  # masked entries, including where the student is confident
    student[0, 1, 3] = 8.0
    student.requires_grad_(True)
    loss = token_divergence(student, teacher, target, mask, objective=objective, beta=beta)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    expected = loop_loss(student, teacher, target, mask, objective, beta, 1.0, True, "token")
    assert loss.item() == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-5)
    if objective == "reverse_kl" or (objective == "jsd" and beta == 1.0):
        assert torch.all(grad[..., 0] == 0)  # outside the teacher's support


def test_shift_is_next_token_alignment():
    """shift=True equals shift=False on positions 0..L-2 with labels and mask of the next token."""
    student, teacher, target, mask = batch(seed=6)
    shifted = token_forward_kl(student, teacher, target, mask, shift=True)
    by_hand = token_forward_kl(
        student[:, :-1],
        teacher[:, :-1],
        target[:, 1:],
        mask[:, 1:] * mask[:, :-1],
        shift=False,
    )
    assert shifted.item() == pytest.approx(by_hand.item(), rel=1e-14)
    # The first label is never read: position 0 predicts token 1.
    relabelled = target.clone()
    relabelled[:, 0] = -100
    assert token_forward_kl(student, teacher, relabelled, mask).item() == shifted.item()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_scaling_and_gradient(temperature):
    """T^2 factor, and d/dz of T^2 * KL(p || softmax(z/T)) = T (q - p) per token (by hand)."""
    student, teacher, _, _ = batch(seed=7)
    flat_s = student.reshape(-1, 7).requires_grad_(True)
    flat_t = teacher.reshape(-1, 7)
    opts = dict(temperature=temperature, shift=False)
    scaled = token_forward_kl(flat_s, flat_t, **opts)
    unscaled = token_forward_kl(flat_s, flat_t, scale_by_t2=False, **opts)
    assert scaled.item() == pytest.approx(temperature**2 * unscaled.item(), rel=1e-14)
    (grad,) = torch.autograd.grad(scaled, flat_s)
    q = torch.softmax(flat_s.detach() / temperature, -1)
    p = torch.softmax(flat_t / temperature, -1)
    torch.testing.assert_close(
        grad, temperature * (q - p) / flat_s.shape[0], rtol=1e-12, atol=1e-14
    )


def test_no_kept_token_gives_zero_with_gradient_path():
    student, teacher, _, _ = batch()
    student.requires_grad_(True)
    target = torch.full((3, 6), -100)
    loss = token_forward_kl(student, teacher, target)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_float32_softmax_under_bf16_autocast_and_float64_kept():
    student, teacher, target, mask = batch(seed=8, dtype=torch.float32)
    low_s, low_t = student.bfloat16(), teacher.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = token_generalized_jsd(low_s, low_t, target, mask, beta=0.3, temperature=2.0)
    reference = token_generalized_jsd(
        low_s.float(), low_t.float(), target, mask, beta=0.3, temperature=2.0
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert token_forward_kl(student.double(), teacher.double()).dtype == torch.float64


def test_vocabulary_mismatch_names_both_sizes():
    with pytest.raises(ValueError) as error:
        check_vocab_sizes(151936, 152064)
    message = str(error.value)
    assert "151936" in message and "152064" in message and "crop_vocab=True" in message
    assert check_vocab_sizes(151936, 152064, crop_vocab=True) == 151936
    assert check_vocab_sizes(50, 50) == 50
    student, teacher, target, mask = batch()
    padded = torch.cat([teacher, torch.full((3, 6, 2), -5.0, dtype=torch.float64)], dim=-1)
    with pytest.raises(ValueError, match=r"7 != teacher vocabulary size 9"):
        TokenForwardKLLoss()(student=student, teacher=padded, target=target, mask=mask)


def test_crop_vocab_drops_padded_rows():
    student, teacher, target, mask = batch()
    padded = torch.cat([teacher, torch.randn(3, 6, 2, dtype=torch.float64)], dim=-1)
    loss = TokenReverseKLLoss(crop_vocab=True)(
        student=student, teacher=padded, target=target, mask=mask
    )
    expected = loop_loss(student, teacher, target, mask, "reverse_kl", 0, 1.0, True, "token")
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_modules_equal_functional_and_named_objectives():
    student, teacher, target, mask = batch(seed=9)
    opts = dict(temperature=2.0, reduction="sequence")
    pairs = [
        (TokenForwardKLLoss(**opts), "forward_kl", 0.5),
        (TokenReverseKLLoss(**opts), "reverse_kl", 0.5),
        (TokenGeneralizedJSDLoss(beta=0.3, **opts), "jsd", 0.3),
        (TokenTotalVariationLoss(**opts), "total_variation", 0.5),
    ]
    for module, objective, beta in pairs:
        value = module(student=student, teacher=teacher, target=target, mask=mask)
        expected = loop_loss(student, teacher, target, mask, objective, beta, 2.0, True, "sequence")
        assert value.item() == pytest.approx(expected, rel=1e-12), objective
    generic = TokenDistillationLoss(objective="jsd", beta=0.3, **opts)
    assert generic(student=student, teacher=teacher, target=target, mask=mask).item() == (
        pytest.approx(
            pairs[2][0](student=student, teacher=teacher, target=target, mask=mask).item()
        )
    )


def test_teacher_receives_no_gradient():
    student, teacher, target, mask = batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    TokenGeneralizedJSDLoss()(student=student, teacher=teacher, target=target, mask=mask).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(objective="kl"), r"objective must be one of \('forward_kl', 'reverse_kl', 'jsd'"),
        (dict(beta=1.5), r"beta must lie in \[0, 1\]"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(reduction="mean"), r"reduction must be one of \('token', 'sequence'\)"),
        (dict(chunk_size=0), "chunk_size must be None"),
    ],
)
def test_constructor_errors_list_valid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenDistillationLoss(**kwargs)


def test_shape_errors_name_the_fix():
    student, teacher, target, mask = batch()
    flat_s, flat_t = student.reshape(-1, 7), teacher.reshape(-1, 7)
    with pytest.raises(ValueError, match="pass shift=False"):
        token_forward_kl(flat_s, flat_t)
    with pytest.raises(ValueError, match="use reduction='token'"):
        token_forward_kl(flat_s, flat_t, shift=False, reduction="sequence")
    with pytest.raises(ValueError, match=r"target must have the logits' leading shape \(3, 6\)"):
        token_forward_kl(student, teacher, target[:, :-1])
    with pytest.raises(ValueError, match="same"):
        token_forward_kl(student, teacher[:2])
