"""Transformer feature losses and the token cross-entropy against loops written from the equations.

Each reference below is a plain Python loop over the kept tokens (or query/key pairs), written
from the docstring's equation, never the code's own earlier output. Also: padding changes
nothing (not even NaN there), layer maps sum their pairs, gradients reach the student (and a
loss's projection) but never the teacher, float64 passes gradcheck, bfloat16 autocast stays
finite in float32, and shape mismatches name both shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.functional.transformer import (
    attention_map_loss,
    hidden_state_cosine,
    hidden_state_mse,
    token_cross_entropy,
)
from kd_lightning.losses import (
    AttentionMapLoss,
    HiddenStateCosineLoss,
    HiddenStateMSELoss,
    TokenCrossEntropyLoss,
)

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def _hidden(seed: int, dim: int = 3) -> torch.Tensor:
    return torch.randn(
        2, 4, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _maps(seed: int, heads: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, heads, 4, 4, generator=generator, dtype=torch.float64)
    keys = MASK[:, None, None, :].bool()
    return torch.softmax(scores.masked_fill(~keys, -math.inf), dim=-1)  # padded keys get 0


def _kept(mask=MASK):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def test_hidden_state_mse_is_the_mean_over_real_tokens_and_features():
    s, t = _hidden(0), _hidden(1)
    kept = _kept()
    total = sum(float((s[b, i, d] - t[b, i, d]) ** 2) for b, i in kept for d in range(3))
    expected = total / (len(kept) * 3)
    assert hidden_state_mse(s, t, MASK).item() == pytest.approx(expected, rel=1e-12)
    # without a mask every token counts: the plain element-wise MSE
    assert hidden_state_mse(s, t).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-12)


def test_hidden_state_cosine_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]]])
    # tokens: orthogonal (1 - 0 = 1), parallel (0), padding (left out)
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_state_cosine(s, t, mask).item() == pytest.approx(0.5, abs=1e-7)
    assert hidden_state_cosine(s, t).item() == pytest.approx((1 + 0 + (1 - 1 / 2**0.5)) / 3)


@pytest.mark.parametrize("divergence", ["mse", "kl"])
def test_attention_map_loss_against_a_loop_over_real_queries_and_keys(divergence):
    s, t = _maps(0), _maps(1)
    total, count = 0.0, 0
    for b in range(2):
        real = [i for i in range(4) if MASK[b, i]]
        for h in range(2):
            for i in real:
                if divergence == "kl":
                    total += sum(float(t[b, h, i, j] * (t[b, h, i, j] / s[b, h, i, j]).log())
                                 for j in real)  # fmt: skip
                    count += 1
                else:
                    total += sum(float((s[b, h, i, j] - t[b, h, i, j]) ** 2) for j in real)
                    count += len(real)
    expected = total / count
    assert attention_map_loss(s, t, MASK, divergence).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "core, make",
    [(hidden_state_mse, _hidden), (hidden_state_cosine, _hidden), (attention_map_loss, _maps)],
)
def test_padding_changes_nothing_not_even_nan(core, make):
    s, t = make(0), make(1)
    clean = core(s, t, MASK)
    dirty_s, dirty_t = s.clone().requires_grad_(True), t.clone()
    pad = ~MASK.bool()
    if s.dim() == 3:
        dirty_s.data[pad] = float("nan")
        dirty_t[pad] = 1e6
    else:  # padded query rows
        dirty_s.data[pad[:, None, :, None].expand_as(s)] = float("nan")
        dirty_t[pad[:, None, :, None].expand_as(t)] = 7.0
    value = core(dirty_s, dirty_t, MASK)
    assert value.item() == pytest.approx(clean.item(), rel=1e-12)
    value.backward()
    assert torch.isfinite(dirty_s.grad).all()
    pad_grad = dirty_s.grad[pad] if s.dim() == 3 else dirty_s.grad.transpose(1, 2)[pad]
    assert (pad_grad == 0).all()


def test_a_layer_map_sums_its_pairs():
    s, t = [_hidden(0), _hidden(2)], [_hidden(1), _hidden(3)]
    pairs = hidden_state_mse(s[0], t[0], MASK) + hidden_state_mse(s[1], t[1], MASK)
    assert hidden_state_mse(s, t, MASK).item() == pytest.approx(pairs.item(), rel=1e-12)
    with pytest.raises(ValueError, match="2 student and 1 teacher layers"):
        hidden_state_mse(s, t[:1], MASK)


def test_projection_is_tinybert_w_h_shared_by_the_pairs_and_trained():
    loss = HiddenStateMSELoss(student_dim=3, teacher_dim=5).double()
    s = [_hidden(0).requires_grad_(True), _hidden(2)]
    t = [_hidden(1, dim=5).requires_grad_(True), _hidden(3, dim=5)]
    value = loss(student=s, teacher=t, mask=MASK)
    w = loss.projection
    expected = hidden_state_mse([w(s[0]), w(s[1])], t, MASK)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    value.backward()
    assert w.weight.grad.abs().sum() > 0 and s[0].grad.abs().sum() > 0
    assert t[0].grad is None  # the teacher is detached
    with pytest.raises(ValueError, match="both student_dim and teacher_dim"):
        HiddenStateMSELoss(student_dim=3)


def test_token_cross_entropy_is_next_token_nll_over_kept_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    terms = []
    for b in range(2):
        for i in range(4):  # position i predicts label i + 1
            if labels[b, i + 1] != -100 and mask[b, i] and mask[b, i + 1]:
                terms.append(-torch.log_softmax(logits[b, i], -1)[labels[b, i + 1]].item())
    expected = sum(terms) / len(terms)
    got = token_cross_entropy(logits, labels, mask, shift=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # unshifted, unmasked: exactly torch's cross-entropy with ignore_index
    plain = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    unshifted = TokenCrossEntropyLoss(shift=False)(student=logits, target=labels)
    assert unshifted.item() == pytest.approx(plain.item(), rel=1e-12)


LOSSES = {
    "mse": (lambda: HiddenStateMSELoss(), _hidden),
    "mse_projected": (lambda: HiddenStateMSELoss(3, 3), _hidden),
    "cosine": (lambda: HiddenStateCosineLoss(), _hidden),
    "attention_mse": (lambda: AttentionMapLoss("mse"), _maps),
    "attention_kl": (lambda: AttentionMapLoss("kl"), _maps),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_float64_gradcheck_and_bfloat16_autocast(name):
    make_loss, make = LOSSES[name]
    loss = make_loss().double()
    s, t = make(0).requires_grad_(True), make(1)
    assert loss(student=s, teacher=t, mask=MASK).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: loss(student=x, teacher=t, mask=MASK), (s,))
    loss = loss.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(student=s.detach().bfloat16(), teacher=t.bfloat16(), mask=MASK)
    reference = loss(student=s.detach().bfloat16().float(), teacher=t.bfloat16().float(), mask=MASK)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(reference.item(), rel=2e-2, abs=1e-3)


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 3\).*\(2, 4, 5\)"):
        hidden_state_mse(_hidden(0), _hidden(1, dim=5))
    with pytest.raises(ValueError, match="same number of heads"):
        attention_map_loss(_maps(0, heads=2), _maps(1, heads=4))
    with pytest.raises(ValueError, match="attention mask must be"):
        hidden_state_mse(_hidden(0), _hidden(1), MASK[:, :3])
    with pytest.raises(ValueError, match="divergence must be one of"):
        AttentionMapLoss("js")
