"""CRD: the NCE objective against a loop reference, negative sampling, memory-bank state, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.functional.contrastive import crd_nce_loss, sample_negatives
from kd_lightning.losses.contrastive import CRDLoss


def _nce_reference(anchor, memory, index, negatives, temperature, log_z) -> float:
    """-(log h_pos + sum log(1 - h_neg)) averaged over the batch, one score at a time."""
    n_data, n_neg = memory.shape[0], negatives.shape[1]
    noise = n_neg / n_data
    total = 0.0
    for b in range(anchor.shape[0]):

        def p(row, b=b):
            score = sum(
                x * y for x, y in zip(memory[row].tolist(), anchor[b].tolist(), strict=True)
            )
            return math.exp(score / temperature - log_z)

        p_pos = p(index[b].item())
        total -= math.log(p_pos / (p_pos + noise))
        for row in negatives[b].tolist():
            total -= math.log(noise / (p(row) + noise))
    return total / anchor.shape[0]


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_crd_nce_matches_loop_reference_with_given_and_estimated_normalizers():
    torch.manual_seed(0)
    v_s, v_t = _unit(3, 4), _unit(3, 4)
    mem_s, mem_t = _unit(10, 4), _unit(10, 4)
    index = torch.tensor([2, 7, 0])
    negatives = sample_negatives(index, 10, 5)
    temperature = 0.5
    log_z = torch.tensor([1.3, -0.4])
    expected = _nce_reference(v_s, mem_t, index, negatives, temperature, 1.3) + _nce_reference(
        v_t, mem_s, index, negatives, temperature, -0.4
    )
    got = crd_nce_loss(v_s, v_t, mem_s, mem_t, index, negatives, temperature, log_z)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # Estimated Z = M * mean(exp(score / T)) over the batch's positive and negative scores.
    def estimate(anchor, memory):
        rows = torch.cat([index[:, None], negatives], dim=1)
        scores = (memory[rows] * anchor[:, None, :]).sum(-1) / temperature
        return math.log(10 * scores.exp().mean().item())

    z_s, z_t = estimate(v_s, mem_t), estimate(v_t, mem_s)
    expected = _nce_reference(v_s, mem_t, index, negatives, temperature, z_s) + _nce_reference(
        v_t, mem_s, index, negatives, temperature, z_t
    )
    got = crd_nce_loss(v_s, v_t, mem_s, mem_t, index, negatives, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_negatives_are_uniform_over_the_other_samples():
    torch.manual_seed(1)
    index = torch.tensor([0, 3, 5])
    negatives = sample_negatives(index, 6, 3000)
    assert negatives.shape == (3, 3000) and negatives.dtype == torch.long
    assert (negatives != index[:, None]).all()
    for b in range(3):
        counts = torch.bincount(negatives[b], minlength=6).float()
        others = counts[torch.arange(6) != index[b]]
        assert counts[index[b]] == 0 and (others - 600).abs().max() < 100


def test_aligned_embeddings_give_a_lower_loss_than_random_ones():
    torch.manual_seed(2)
    n_data, index = 50, torch.arange(8)
    v_s = _unit(8, 16)
    mem_s = _unit(n_data, 16)
    aligned_t = mem_s.clone()
    aligned_t[index] = v_s  # the teacher bank's positives are the student's own embeddings
    negatives = sample_negatives(index, n_data, 20)
    log_z = torch.tensor([math.log(n_data), math.log(n_data)])
    args = (index, negatives, 0.07, log_z)
    aligned = crd_nce_loss(v_s, mem_s[index], mem_s, aligned_t, *args)
    random = crd_nce_loss(v_s, _unit(8, 16), mem_s, _unit(n_data, 16), *args)
    assert aligned.item() < random.item()


def test_crd_memory_banks_move_in_training_only():
    torch.manual_seed(3)
    loss = CRDLoss(student_dim=6, teacher_dim=4, n_data=20, feat_dim=5, num_negatives=7)
    student, teacher, index = torch.randn(3, 6), torch.randn(3, 4), torch.tensor([4, 9, 11])

    loss.eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(student=student, teacher=teacher, index=index)
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())

    loss.train()
    old_s = loss.memory_student.clone()
    with torch.no_grad():
        new_s = F.normalize(loss.embed_student(student), dim=1)
    loss(student=student, teacher=teacher, index=index)
    expected = F.normalize(0.5 * old_s[index] + 0.5 * new_s, dim=1)
    assert torch.allclose(loss.memory_student[index], expected, atol=1e-6)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(loss.memory_student[untouched], old_s[untouched])
    assert not torch.equal(loss.memory_teacher[index], before["memory_teacher"][index])

    # Z is estimated on the first training batch, then frozen.
    assert bool(loss.normalizer_set)
    z = loss.log_normalizer.clone()
    loss(student=torch.randn(3, 6), teacher=torch.randn(3, 4), index=torch.tensor([0, 1, 2]))
    assert torch.equal(loss.log_normalizer, z)


def test_crd_training_aligns_student_with_teacher():
    """A few optimisation steps over the student features and heads lower the loss."""
    torch.manual_seed(4)
    n_data = 16
    teacher = torch.randn(n_data, 6)
    student = torch.nn.Parameter(torch.randn(n_data, 5))
    loss = CRDLoss(student_dim=5, teacher_dim=6, n_data=n_data, feat_dim=8, num_negatives=15)
    optimizer = torch.optim.Adam([student, *loss.parameters()], lr=0.05)
    index = torch.arange(n_data)
    values = []
    for _ in range(25):
        value = loss(student=student, teacher=teacher, index=index)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert sum(values[-5:]) / 5 < 0.5 * sum(values[:5]) / 5


def test_crd_validation():
    with pytest.raises(ValueError, match="n_data"):
        CRDLoss(student_dim=4, teacher_dim=4, n_data=1)
    with pytest.raises(ValueError, match="momentum"):
        CRDLoss(student_dim=4, teacher_dim=4, n_data=10, momentum=1.0)
    loss = CRDLoss(student_dim=4, teacher_dim=4, n_data=10, num_negatives=4096)
    assert loss.num_negatives == 9
    with pytest.raises(ValueError, match="index"):
        loss(student=torch.randn(2, 4), teacher=torch.randn(2, 4))
    with pytest.raises(ValueError, match="student_dim"):
        loss(student=torch.randn(2, 5), teacher=torch.randn(2, 4), index=torch.tensor([0, 1]))
