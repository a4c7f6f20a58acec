"""SparseTokenDistillationLoss: the token loss read from a top-k teacher cache.

Properties checked against independent references: with k = V it is the dense token loss
(value and gradient, float64 rel 1e-10) for every objective, shift and reduction; for k < V the
forward KL equals a direct per-token loop over the coarsened distributions (top-k entries plus
the rest bucket) and never exceeds the dense divergence (data-processing inequality); the
forward KL without shift equals the classification SparseSoftTargetKLLoss on flattened tokens;
padding rows and -inf teacher entries change nothing / stay finite; shape and k errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.functional import sparse_token_divergence, token_divergence
from kd_lightning.functional.sparse_soft_target import sparse_soft_target_kl, topk_log_probs
from kd_lightning.losses import SparseTokenDistillationLoss

OBJECTIVES = ["forward_kl", "reverse_kl", "jsd", "total_variation"]
B, L, V = 3, 6, 9


def batch(seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, V, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(B, L, V, generator=generator, dtype=dtype) * 2
    target = torch.randint(0, V, (B, L), generator=generator)
    target[0, 3] = -100
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    return student, teacher, target, mask


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shift,reduction", [(True, "token"), (False, "sequence")])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_k_equal_to_the_vocabulary_is_the_dense_token_loss(
    objective, shift, reduction, temperature
):
    student, teacher, target, mask = batch()
    options = dict(objective=objective, temperature=temperature, shift=shift, reduction=reduction)
    values, indices = topk_log_probs(teacher, V, temperature)
    dense_student = student.clone().requires_grad_(True)
    sparse_student = student.clone().requires_grad_(True)
    dense = token_divergence(dense_student, teacher, target, mask, **options)
    sparse = sparse_token_divergence(sparse_student, values, indices, target, mask, **options)
    dense.backward()
    sparse.backward()
    assert sparse.dtype == torch.float64
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-10)
    torch.testing.assert_close(sparse_student.grad, dense_student.grad, rtol=1e-10, atol=1e-14)


def _direct_forward_kl(student, values, indices, weights, temperature):
    """sum over tokens of weight * KL(p~ || q~), one token at a time, from the definition."""
    total = 0.0
    for n in range(student.shape[0]):
        if weights[n] == 0:
            continue
        q = torch.softmax(student[n] / temperature, dim=-1).tolist()
        top = indices[n].tolist()
        p_top = [math.exp(v) for v in values[n].tolist()]
        q_top = [q[i] for i in top]
        p_rest, q_rest = 1.0 - sum(p_top), sum(q[j] for j in range(len(q)) if j not in top)
        kl = sum(p * math.log(p / s) for p, s in zip(p_top, q_top, strict=True))
        kl += p_rest * math.log(p_rest / q_rest)
        total += float(weights[n]) * kl
    return total * temperature**2


def test_forward_kl_below_k_is_the_kl_of_the_top_k_plus_one_bucket():
    student, teacher, target, mask = batch(seed=1)
    values, indices = topk_log_probs(teacher, 3, 2.0)
    loss = sparse_token_divergence(student, values, indices, target, mask, temperature=2.0)
    # Shift: position t is kept when target[t+1] is kept and mask[t], mask[t+1] are 1.
    keep = torch.zeros(B, L, dtype=torch.float64)
    keep[:, :-1] = (target[:, 1:] != -100) & (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    weights = (keep / keep.sum()).reshape(-1)
    expected = _direct_forward_kl(
        student.reshape(-1, V), values.reshape(-1, 3), indices.reshape(-1, 3), weights, 2.0
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("k", [1, 4, 8])
def test_coarsening_never_exceeds_the_dense_divergence(objective, k):
    student, teacher, target, mask = batch(seed=2)
    values, indices = topk_log_probs(teacher, k, 1.5)
    options = dict(objective=objective, temperature=1.5, shift=False)
    sparse = sparse_token_divergence(student, values, indices, target, mask, **options)
    dense = token_divergence(student, teacher, target, mask, **options)
    assert 0.0 < sparse.item() <= dense.item() + 1e-12


def test_unshifted_forward_kl_is_the_classification_sparse_kl_on_flat_tokens():
    student, teacher, _, _ = batch(seed=3)
    flat_student, flat_teacher = student.reshape(-1, V), teacher.reshape(-1, V)
    values, indices = topk_log_probs(flat_teacher, 4, 3.0)
    token = sparse_token_divergence(flat_student, values, indices, shift=False, temperature=3.0)
    sample = sparse_soft_target_kl(flat_student, values, indices, temperature=3.0)
    assert token.item() == pytest.approx(sample.item(), rel=1e-12)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_padding_rows_change_nothing_and_get_no_gradient(objective):
    student, teacher, target, mask = batch(seed=4)
    values, indices = topk_log_probs(teacher, 4, 1.0)
    clean = sparse_token_divergence(student, values, indices, target, mask, objective=objective)
    values, indices = values.clone(), indices.clone()
    values[1, 4:] = math.nan  # what a broken cache could hold where the mask is 0
    indices[1, 4:] = 0  # repeated indices
    student = student.clone()
    student[1, 4:] = math.inf
    student.requires_grad_(True)
    dirty = sparse_token_divergence(student, values, indices, target, mask, objective=objective)
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)
    assert torch.isfinite(student.grad).all() and (student.grad[1, 4:] == 0).all()
    # Shift: the last kept position of sequence 1 is 2 (it predicts token 3, the last real one).
    assert (student.grad[1, 3:] == 0).all() and (student.grad[1, 2] != 0).any()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_minus_inf_teacher_entries_in_the_top_k_stay_finite(objective):
    student, teacher, target, mask = batch(seed=5)
    teacher[..., :3] = -math.inf  # a masked vocabulary: the top 6 include three -inf entries
    values, indices = topk_log_probs(teacher, V - 2, 1.0)
    assert torch.isinf(values).any()
    student.requires_grad_(True)
    loss = sparse_token_divergence(student, values, indices, target, mask, objective=objective)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(student.grad).all()


def test_module_equals_the_function_and_names_its_settings():
    student, teacher, target, mask = batch(seed=6)
    values, indices = topk_log_probs(teacher, 5, 2.0)
    loss = SparseTokenDistillationLoss(objective="jsd", beta=0.3, temperature=2.0, topk=5)
    value = loss(student=student, teacher=(values, indices), target=target, mask=mask)
    expected = sparse_token_divergence(
        student, values, indices, target, mask, objective="jsd", beta=0.3, temperature=2.0
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert "topk=5" in repr(loss) and "beta=0.3" in repr(loss)


def test_errors_name_both_sides_and_the_fix():
    student, teacher, target, mask = batch(seed=7)
    values, indices = topk_log_probs(teacher, 4, 1.0)
    with pytest.raises(
        ValueError, match=r"holds the top-4 entries per token but the loss expects topk=8"
    ):
        SparseTokenDistillationLoss(topk=8)(student=student, teacher=(values, indices))
    with pytest.raises(TypeError, match="got dense logits"):
        SparseTokenDistillationLoss()(student=student, teacher=teacher)
    with pytest.raises(ValueError, match="granularity: token"):
        sparse_token_divergence(student, values[:, 0], indices[:, 0])
    with pytest.raises(ValueError, match="same shape"):
        sparse_token_divergence(student, values, indices[..., :3])
    with pytest.raises(ValueError, match=r"vocabulary index 9 but the student's vocabulary has 9"):
        sparse_token_divergence(student, values, indices.masked_fill(indices == 0, V))
    with pytest.raises(ValueError, match=r"topk must be None \(any k\) or a positive integer"):
        SparseTokenDistillationLoss(topk=0)
    with pytest.raises(ValueError, match=r"objective must be one of"):
        SparseTokenDistillationLoss(objective="kl")
