"""Logit matching (Ba & Caruana 2014) by hand, and shape errors of the soft-target family."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.functional.ensemble import combine_teachers
from kd_lightning.functional.sparse_soft_target import sparse_soft_target_kl
from kd_lightning.losses import LogitMatchingMSELoss, SoftTargetKLLoss, SparseSoftTargetKLLoss


def test_logit_matching_is_half_the_summed_squared_error_per_row():
    # Ba & Caruana's objective 1/(2N) sum_n ||z_n - v_n||^2. Row 1: 1/2 (1 + 4 + 9) = 7;
    # row 2: 1/2 (4 + 0 + 1) = 2.5; mean 4.75 = C/2 * mean((z - v)^2) = 3/2 * 19/6.
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    value = LogitMatchingMSELoss()(student=student, teacher=teacher)
    assert value.item() == pytest.approx(4.75)
    assert value.item() == pytest.approx(3 / 2 * (student - teacher).pow(2).mean().item())
    value.backward()
    # Gradient (z - v) / N with N = 2 rows.
    torch.testing.assert_close(student.grad, (student - teacher).detach() / 2)


def test_issue_example_teacher_with_an_extra_dimension_is_an_error():
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 1, 10\).*squeeze"):
        SoftTargetKLLoss()(student=torch.randn(4, 10), teacher=torch.randn(4, 1, 10))
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 1, 10\)"):
        LogitMatchingMSELoss()(student=torch.randn(4, 10), teacher=torch.randn(4, 1, 10))
    # Different class counts: also named.
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 12\)"):
        SoftTargetKLLoss()(student=torch.randn(4, 10), teacher=torch.randn(4, 12))


def test_sparse_teacher_must_match_the_student_rows():
    values, indices = torch.log(torch.full((4, 1, 3), 0.2)), torch.arange(3).expand(4, 1, 3)
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 1, 3\)"):
        sparse_soft_target_kl(torch.randn(4, 10), values, indices)
    with pytest.raises(ValueError, match=r"top-k entries"):
        SparseSoftTargetKLLoss()(
            student=torch.randn(2, 3), teacher=(torch.zeros(2, 4), torch.zeros(2, 4).long())
        )


def test_per_token_sparse_rows_equal_the_flattened_batch():
    # (B, L, k) top-k values against (B, L, V) logits: the same as flattening to (B * L, .).
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 6, generator=generator)
    values, indices = torch.randn(2, 3, 6, generator=generator).log_softmax(-1).topk(2, dim=-1)
    got = sparse_soft_target_kl(student, values, indices, 2.0)
    flat = sparse_soft_target_kl(
        student.reshape(6, 6), values.reshape(6, 2), indices.reshape(6, 2), 2.0
    )
    torch.testing.assert_close(got, flat)


def test_ensemble_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(K, B, C\)"):
        combine_teachers(torch.randn(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        combine_teachers(torch.randn(2, 3, 4), torch.ones(3, 2))
