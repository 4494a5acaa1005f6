"""The distillation losses against hand-computed values and their limits, through `distillation_loss`,
the function training calls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import distillation_loss
from pipeline.spec import DistillSpec


def binary_kd_loss(student, teacher, label, alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """Binary KD as training computes it: `distillation_loss` on a batch of (label, teacher_logit)."""
    return distillation_loss(student, {"label": label, "teacher_logit": teacher},
                             DistillSpec(alpha=alpha, temperature=temperature, soft_loss="kd"), "binary")


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
    assert out["hard_loss"].item() == pytest.approx(hard, rel=1e-6)
    assert out["soft_loss"].item() == pytest.approx(temp**2 * soft, rel=1e-6)  # logged as summed: T^2-scaled
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


# Issue 3 losses: golden values from independent formulas.
from pipeline.losses import hint_loss, listwise_kd_loss, logit_mse_loss, multiclass_kd_loss, topk_kd_loss


def test_logit_mse_golden():
    assert logit_mse_loss(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(5.0)


@pytest.mark.parametrize("temperature", [50.0, 200.0])
def test_binary_kd_approaches_logit_matching_as_temperature_grows(temperature):
    # T^2 [BCE(s/T, t/T) - BCE(t/T, t/T)] -> (s - t)^2 / 8 as T -> infinity.
    # float64: both terms grow like T^2 and we look at their small difference
    s, t = torch.tensor([0.8, -1.5, 2.0], dtype=torch.float64), torch.tensor([0.1, -0.5, 3.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    soft = binary_kd_loss(s, t, zero, alpha=0.0, temperature=temperature)["loss"]
    floor = binary_kd_loss(t, t, zero, alpha=0.0, temperature=temperature)["loss"]
    assert (soft - floor).item() == pytest.approx(logit_mse_loss(s, t).item() / 8, rel=5e-3)


def _kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def test_multiclass_kd_golden():
    s, t, temp = [[1.0, 0.0, -1.0]], [[0.5, 0.5, 2.0]], 2.0
    expected = temp**2 * _kl_by_hand(_softmax([x / temp for x in t[0]]), _softmax([x / temp for x in s[0]]))
    got = multiclass_kd_loss(torch.tensor(s), torch.tensor(t), temperature=temp).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert multiclass_kd_loss(torch.tensor(t), torch.tensor(t), temperature=temp).item() == pytest.approx(0, abs=1e-7)


def test_topk_renormalises_over_the_stored_classes():
    student = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])
    indices, teacher_topk = torch.tensor([[0, 2]]), torch.tensor([[1.0, 3.0]])
    expected = _kl_by_hand(_softmax([1.0, 3.0]), _softmax([2.0, 1.0]))  # only classes 0 and 2 matter
    assert topk_kd_loss(student, indices, teacher_topk, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_topk_with_all_classes_equals_full_kd():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    order = t.argsort(dim=1, descending=True)
    sparse = topk_kd_loss(s, order, t.gather(1, order), temperature=3.0)
    assert sparse.item() == pytest.approx(multiclass_kd_loss(s, t, temperature=3.0).item(), rel=1e-5)


def test_hint_loss_golden():
    projection = torch.nn.Linear(2, 1)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 2.0]]))
        projection.bias.fill_(0.5)
    hs, ht = torch.tensor([[1.0, 1.0], [0.0, -1.0]]), torch.tensor([[3.0], [0.0]])
    # projections 3.5 and -1.5 against 3 and 0: ((0.5)^2 + (1.5)^2) / 2 = 1.25
    assert hint_loss(projection(hs), ht).item() == pytest.approx(1.25)


def test_listwise_kd_golden_and_singletons_skipped():
    s = torch.tensor([1.0, 0.0, 2.0, 0.5, 9.0])
    t = torch.tensor([0.0, 1.0, 2.0, 2.0, -3.0])
    group = torch.tensor([7, 7, 9, 9, 4])  # group 4 has one item: skipped
    g7 = _kl_by_hand(_softmax([0.0, 1.0]), _softmax([1.0, 0.0]))
    g9 = _kl_by_hand(_softmax([2.0, 2.0]), _softmax([2.0, 0.5]))
    assert listwise_kd_loss(s, t, group).item() == pytest.approx((g7 + g9) / 2, rel=1e-6)


def test_listwise_kd_is_zero_when_rankings_agree_up_to_a_shift():
    s = torch.tensor([1.0, 2.0, 3.0])
    assert listwise_kd_loss(s, s + 10.0, torch.tensor([1, 1, 1])).item() == pytest.approx(0.0, abs=1e-6)
