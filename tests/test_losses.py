"""KD loss against hand-computed values and its limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import binary_kd_loss


def _bce(p: float, q: float) -> float:
    """Cross-entropy of Bernoulli(p) predicted against target q, by hand."""
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kd_loss_matches_hand_computed_value():
    s, t, y = [0.5, -1.0, 2.0], [1.0, -2.0, 0.5], [1.0, 0.0, 0.0]
    alpha, temp = 0.3, 2.0
    hard = sum(_bce(_sigmoid(si), yi) for si, yi in zip(s, y)) / 3
    soft = sum(_bce(_sigmoid(si / temp), _sigmoid(ti / temp)) for si, ti in zip(s, t)) / 3
    expected = alpha * hard + (1 - alpha) * temp**2 * soft
    out = binary_kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=alpha, temperature=temp)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["hard"].item() == pytest.approx(hard, rel=1e-6)
    assert out["soft"].item() == pytest.approx(soft, rel=1e-6)
    assert expected == pytest.approx(2.18605, abs=1e-4)  # a literal golden value, independent of both codes


def test_alpha_one_is_plain_bce():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    y = (torch.rand(64, generator=gen) < 0.3).float()
    out = binary_kd_loss(s, t, y, alpha=1.0, temperature=3.0)
    assert out["loss"].item() == pytest.approx(F.binary_cross_entropy_with_logits(s, y).item(), rel=1e-6)


def test_alpha_zero_is_minimised_by_matching_the_teacher():
    t = torch.tensor([-2.0, 0.0, 1.5])
    y = torch.tensor([0.0, 1.0, 1.0])
    at_teacher = binary_kd_loss(t.clone(), t, y, alpha=0.0, temperature=2.0)["loss"].item()
    for shift in (-0.5, 0.5):
        assert binary_kd_loss(t + shift, t, y, alpha=0.0, temperature=2.0)["loss"].item() > at_teacher


def test_soft_term_gradient_is_temperature_scaled_logit_difference():
    # d/ds [T^2 BCE(sigmoid(s/T), sigmoid(t/T))] = T (sigmoid(s/T) - sigmoid(t/T)) per row (then / N).
    s = torch.tensor([0.7, -0.3], requires_grad=True)
    t = torch.tensor([0.1, 0.4])
    temp = 4.0
    binary_kd_loss(s, t, torch.zeros(2), alpha=0.0, temperature=temp)["loss"].backward()
    expected = temp * (torch.sigmoid(s.detach() / temp) - torch.sigmoid(t / temp)) / 2
    assert torch.allclose(s.grad, expected, atol=1e-6)
