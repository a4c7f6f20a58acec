"""Sparse (top-k + rest bucket) soft targets: equal to the dense KL at k = C, hand values below."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.functional.soft_target import soft_target_kl
from kd_lightning.functional.sparse_soft_target import sparse_soft_target_kl, topk_log_probs
from kd_lightning.losses.sparse_soft_target import SparseSoftTargetKLLoss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_equals_dense_kl_when_k_is_the_number_of_classes(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 7, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 7, generator=generator) * 3
    values, indices = topk_log_probs(teacher, 7, temperature)
    sparse = sparse_soft_target_kl(student, values, indices, temperature)
    dense = soft_target_kl(student, teacher, temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    (grad_sparse,) = torch.autograd.grad(sparse, student)
    (grad_dense,) = torch.autograd.grad(dense, student)
    torch.testing.assert_close(grad_sparse, grad_dense, rtol=1e-5, atol=1e-6)


def test_hand_computed_value_with_rest_bucket() -> None:
    # Teacher p = (0.5, 0.3, 0.2, 0) over 4 classes at T = 1; top-2 keeps classes 0, 1 and a
    # rest bucket of 0.2. Uniform student: q_i = 0.25, q_rest = 0.5.
    log_p = torch.log(torch.tensor([[0.5, 0.3]]))
    indices = torch.tensor([[0, 1]])
    student = torch.zeros(1, 4)
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    got = sparse_soft_target_kl(student, log_p, indices, temperature=1.0)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # T^2 scaling at T = 2 with the same (already tempered) probabilities.
    got_t2 = sparse_soft_target_kl(student, log_p, indices, temperature=2.0)
    assert got_t2.item() == pytest.approx(4 * want, rel=1e-6)


def test_zero_when_top_classes_and_tail_mass_match() -> None:
    # The student matches the teacher's top-2 and total tail mass but shapes its tail
    # differently: the coarsened KL is 0 (it cannot see inside the tail) while the full KL > 0.
    teacher_p = torch.tensor([[0.5, 0.3, 0.2, 0.0001]])
    teacher_p = teacher_p / teacher_p.sum()
    student_p = torch.stack(
        [teacher_p[0, 0], teacher_p[0, 1], torch.tensor(0.1), torch.tensor(0.0)]
    )
    student_p[3] = 1 - student_p[:3].sum()
    student = student_p.log()[None]
    values, indices = topk_log_probs(teacher_p.log(), 2, temperature=1.0)
    sparse = sparse_soft_target_kl(student, values, indices, temperature=1.0)
    full = soft_target_kl(student, teacher_p.log(), temperature=1.0)
    assert sparse.item() == pytest.approx(0.0, abs=1e-6)
    assert full.item() > 0.05


def test_never_exceeds_the_full_kl_and_gradient_spreads_tail_mass() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(8, 10, generator=generator, requires_grad=True)
    teacher = torch.randn(8, 10, generator=generator) * 2
    for k in (1, 3, 9):
        values, indices = topk_log_probs(teacher, k, 2.0)
        sparse = sparse_soft_target_kl(student, values, indices, 2.0)
        assert sparse.item() <= soft_target_kl(student, teacher, 2.0).item() + 1e-6
    # Gradient on a tail logit j: (q_j - p_rest q_j / q_rest) / T, times T^2 / B.
    values, indices = topk_log_probs(teacher, 3, 2.0)
    (grad,) = torch.autograd.grad(sparse_soft_target_kl(student, values, indices, 2.0), student)
    q = torch.softmax(student.detach() / 2.0, dim=-1)
    tail = torch.ones_like(q, dtype=torch.bool).scatter(-1, indices, False)
    p_rest = 1 - values.exp().sum(-1, keepdim=True)
    q_rest = (q * tail).sum(-1, keepdim=True)
    want = (q - p_rest * q / q_rest) / 2.0 * 4.0 / 8
    torch.testing.assert_close(grad[tail], want[tail], rtol=1e-4, atol=1e-6)


def test_module_contract_and_errors() -> None:
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    values, indices = topk_log_probs(teacher, 2, 4.0)
    loss = SparseSoftTargetKLLoss(temperature=4.0)(student=student, teacher=(values, indices))
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(TypeError, match="top-k knowledge"):
        SparseSoftTargetKLLoss()(student=student, teacher=teacher)
    with pytest.raises(ValueError, match="temperature"):
        SparseSoftTargetKLLoss(temperature=0)
    # bf16 autocast: float32 result close to the float32 value.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = SparseSoftTargetKLLoss()(student=student.bfloat16(), teacher=(values, indices))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(loss.item(), rel=2e-2)
