"""Hinton et al. (2015), section 2: the gradients of soft-target distillation, derived by hand."""

import torch

from kd_lightning.functional import logit_matching_mse, soft_target_kl


def test_soft_target_gradient_is_q_minus_p_over_t():
    # dC/dz_i = (q_i - p_i) / T for C = KL(p || q) of one sample, before the T^2 factor.
    torch.manual_seed(0)
    temperature = 3.0
    z = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, dtype=torch.float64)
    soft_target_kl(z, v, temperature, scale_by_t2=False).backward()
    q = torch.softmax(z.detach() / temperature, -1)
    p = torch.softmax(v / temperature, -1)
    torch.testing.assert_close(z.grad, (q - p) / temperature, rtol=0, atol=1e-6)


def test_t_squared_factor_scales_the_gradient():
    torch.manual_seed(1)
    z = torch.randn(4, 5, requires_grad=True)
    v = torch.randn(4, 5)
    (g_plain,) = torch.autograd.grad(soft_target_kl(z, v, 5.0, scale_by_t2=False), z)
    (g_scaled,) = torch.autograd.grad(soft_target_kl(z, v, 5.0), z)
    torch.testing.assert_close(g_scaled, 25.0 * g_plain)


def test_high_temperature_kd_gradient_approaches_logit_matching():
    # For zero-mean logits, dC/dz_i -> (z_i - v_i) / (N T^2) as T grows; times T^2 (our scaled
    # loss) that is (z_i - v_i) / N, i.e. the logit-matching gradient divided by N.
    torch.manual_seed(2)
    n = 10
    z = torch.randn(3, n, dtype=torch.float64)
    v = torch.randn(3, n, dtype=torch.float64)
    z, v = (z - z.mean(-1, keepdim=True)).requires_grad_(), v - v.mean(-1, keepdim=True)
    (g_mse,) = torch.autograd.grad(logit_matching_mse(z, v), z)
    errors = []
    for temperature in (2.0, 20.0, 200.0, 2000.0):
        (g_kd,) = torch.autograd.grad(soft_target_kl(z, v, temperature), z)
        errors.append(((g_kd * n - g_mse).norm() / g_mse.norm()).item())
    # The gap shrinks like 1/T (the next term of the expansion of exp(z/T)).
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-3


def test_hard_label_ce_ignores_unlabeled_and_is_zero_without_labels():
    from kd_lightning.functional import hard_label_cross_entropy

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]], requires_grad=True)
    target = torch.tensor([0, -1, 1])
    expected = (-torch.log_softmax(logits, -1)[0, 0] - torch.log_softmax(logits, -1)[2, 1]) / 2
    torch.testing.assert_close(hard_label_cross_entropy(logits, target), expected)
    none = hard_label_cross_entropy(logits, torch.full((3,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()
