"""Distillation losses: pure torch functions, each with its formula, and `distillation_loss`, the one
function training calls to combine them per batch (and the one the golden tests check). No Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline import shards

if TYPE_CHECKING:
    from pipeline.spec import DistillSpec


def binary_soft_loss(student_logit: torch.Tensor, teacher_logit: torch.Tensor, temperature: float) -> torch.Tensor:
    """The soft term of binary CTR distillation (Hinton et al., 2015, for a Bernoulli output):

        soft = T^2 * BCE(sigmoid(s / T), sigmoid(t / T))

    where BCE(p, q) = -(q log p + (1 - q) log(1 - p)) averaged over the batch. The T^2 factor keeps the
    term's gradient scale independent of T.
    """
    soft_target = torch.sigmoid(teacher_logit.to(student_logit.dtype) / temperature)
    return temperature**2 * F.binary_cross_entropy_with_logits(student_logit / temperature, soft_target)


def logit_mse_loss(student_logit: torch.Tensor, teacher_logit: torch.Tensor) -> torch.Tensor:
    """Logit matching (Ba & Caruana, 2014; Rocket Launching, Zhou et al., 2018):

        loss = mean((s - t)^2)

    It is the T -> infinity limit of the binary KD soft term: T^2 BCE(sigmoid(s/T), sigmoid(t/T)) ->
    (s - t)^2 / 8 + const, up to terms that vanish as 1/T^2.
    """
    return F.mse_loss(student_logit, teacher_logit.to(student_logit.dtype))


def multiclass_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Multi-class distillation (Hinton et al., 2015):

        loss = T^2 * mean_rows KL(softmax(t / T) || softmax(s / T))

    Args:
        student_logits, teacher_logits: (B, C).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return temperature**2 * kl


def topk_kd_loss(student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logits: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Multi-class distillation from sparse soft labels: only the teacher's top-k classes are stored.

    Both distributions are renormalised over the k stored classes K of each row:

        p_t(c) = softmax_{c in K}(t_c / T),  p_s(c) = softmax_{c in K}(s_c / T)
        loss = T^2 * mean_rows KL(p_t || p_s)

    With k = C this equals `multiclass_kd_loss`.

    Args:
        student_logits: (B, C) over all classes.
        topk_indices: (B, k) int64 class ids; topk_logits: (B, k) the teacher's logits for them.
    """
    gathered = student_logits.gather(1, topk_indices)  # (B, k)
    return multiclass_kd_loss(gathered, topk_logits, temperature)


def hint_loss(projected_student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., 2015): loss = mean((W h_s + b - h_t)^2).

    Args:
        projected_student_hidden: (B, d_t), the student's hidden layer through its learned projection
            (W, b: `DistillModule.projection`, trained with the student);
        teacher_hidden: (B, d_t) stored in the shards.
    """
    return F.mse_loss(projected_student_hidden, teacher_hidden.to(projected_student_hidden.dtype))


def listwise_kd_loss(student_logit: torch.Tensor, teacher_logit: torch.Tensor, group: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Listwise ranking distillation: within each request/session group g, the student's softmax over
    the group's items should match the teacher's:

        loss = T^2 * mean_groups KL(softmax_{i in g}(t_i / T) || softmax_{i in g}(s_i / T))

    Groups of a single item carry no ranking information and are skipped.

    Args:
        student_logit, teacher_logit: (B,) one score per item; group: (B,) int64 group ids.
    """
    _, group_index, sizes = torch.unique(group, return_inverse=True, return_counts=True)
    s = student_logit / temperature
    t = teacher_logit.to(student_logit.dtype) / temperature
    log_p_s = s - _segment_logsumexp(s, group_index, len(sizes))[group_index]  # (B,)
    log_p_t = t - _segment_logsumexp(t, group_index, len(sizes))[group_index]
    per_item = log_p_t.exp() * (log_p_t - log_p_s)  # KL contributions
    per_group = torch.zeros(len(sizes), dtype=s.dtype, device=s.device).index_add(0, group_index, per_item)
    ranked = sizes > 1
    if not ranked.any():
        return student_logit.sum() * 0.0  # keeps the graph; nothing to rank in this batch
    return temperature**2 * per_group[ranked].mean()


def _segment_logsumexp(values: torch.Tensor, index: torch.Tensor, segments: int) -> torch.Tensor:
    """logsumexp of `values` within each segment, computed stably (shift by the segment max)."""
    maxima = torch.full((segments,), float("-inf"), dtype=values.dtype, device=values.device)
    maxima = maxima.scatter_reduce(0, index, values.detach(), reduce="amax")
    sums = torch.zeros(segments, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, (values - maxima[index]).exp())
    return maxima + sums.log()


def distillation_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], distill: DistillSpec | None,
                      task: str, hint_pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every loss term of one batch and their weighted sum `loss`: the terms logged are the terms summed.

        loss = alpha * hard + (1 - alpha) * soft + hint_weight * hint + listwise_weight * listwise

    hard: BCE (binary) or cross-entropy (multiclass) on the labels; soft: `binary_soft_loss` or
    `multiclass_kd_loss` / `topk_kd_loss` (`soft_loss: kd`), or `logit_mse_loss` (`mse`); hint:
    `hint_loss`; listwise: `listwise_kd_loss` over `batch["group"]` (binary). Without `distill` (a
    hard-label model) the loss is the hard term alone.

    Args:
        logits: (B,) or (B, C); batch: the collated shard batch (`shards.ShardCollate`);
        hint_pred: the projected student hidden layer (B, d_t) when the hint loss is on.
    """
    label = batch["label"]
    if task == "multiclass":
        hard = F.cross_entropy(logits, label)
    else:
        hard = F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype))
    terms = {"hard_loss": hard}
    if distill is None:
        return terms | {"loss": hard}
    terms["soft_loss"] = _soft_term(logits, batch, distill, task)
    loss = distill.alpha * hard + (1.0 - distill.alpha) * terms["soft_loss"]
    if hint_pred is not None:
        terms["hint_loss"] = hint_loss(hint_pred, batch[shards.TEACHER_HIDDEN])
        loss = loss + distill.hint_weight * terms["hint_loss"]
    if distill.listwise_weight > 0 and task == "binary":
        terms["listwise_loss"] = listwise_kd_loss(logits, batch[shards.TEACHER_LOGIT], batch["group"],
                                                  distill.temperature)
        loss = loss + distill.listwise_weight * terms["listwise_loss"]
    return terms | {"loss": loss}


def _soft_term(logits: torch.Tensor, batch: dict[str, torch.Tensor], distill: DistillSpec, task: str) -> torch.Tensor:
    """The soft term for the task and `distill.soft_loss`; top-k soft labels always use tempered KD."""
    if shards.TOPK_INDICES in batch:
        return topk_kd_loss(logits, batch[shards.TOPK_INDICES], batch[shards.TOPK_VALUES], distill.temperature)
    teacher = batch[shards.target_column(task)]
    if distill.soft_loss == "mse":
        return logit_mse_loss(logits, teacher)
    if task == "multiclass":
        return multiclass_kd_loss(logits, teacher, distill.temperature)
    return binary_soft_loss(logits, teacher, distill.temperature)
