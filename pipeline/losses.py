"""Distillation losses: pure torch functions, each with its formula. No Ray."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_kd_loss(
    student_logit: torch.Tensor,
    teacher_logit: torch.Tensor,
    label: torch.Tensor,
    alpha: float,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Binary CTR distillation (Hinton et al., 2015, for a Bernoulli output).

        loss = alpha * BCE(sigmoid(s), y) + (1 - alpha) * T^2 * BCE(sigmoid(s / T), sigmoid(t / T))

    where BCE(p, q) = -(q log p + (1 - q) log(1 - p)) averaged over the batch. The T^2 factor keeps the
    soft term's gradient scale independent of T. alpha = 1 is plain BCE on the click labels.

    Returns:
        dict with `loss` (what to minimise), `hard` and `soft` (the two unweighted terms, for logging).
    """
    label = label.to(student_logit.dtype)
    hard = F.binary_cross_entropy_with_logits(student_logit, label)
    soft_target = torch.sigmoid(teacher_logit.to(student_logit.dtype) / temperature)
    soft = F.binary_cross_entropy_with_logits(student_logit / temperature, soft_target)
    loss = alpha * hard + (1.0 - alpha) * temperature**2 * soft
    return {"loss": loss, "hard": hard.detach(), "soft": soft.detach()}
