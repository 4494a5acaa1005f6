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
    soft = binary_soft_loss(student_logit, teacher_logit, temperature)
    loss = alpha * hard + (1.0 - alpha) * soft
    return {"loss": loss, "hard": hard.detach(), "soft": (soft / temperature**2).detach()}


def binary_soft_loss(student_logit: torch.Tensor, teacher_logit: torch.Tensor, temperature: float) -> torch.Tensor:
    """The soft term of binary KD, scaled: T^2 * BCE(sigmoid(s / T), sigmoid(t / T))."""
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


def hint_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: torch.nn.Module) -> torch.Tensor:
    """FitNets hint loss (Romero et al., 2015): loss = mean((W h_s + b - h_t)^2), with W, b learned.

    Args:
        student_hidden: (B, d_s); teacher_hidden: (B, d_t) stored in the shards;
        projection: maps d_s -> d_t (e.g. `torch.nn.Linear(d_s, d_t)`), trained with the student.
    """
    return F.mse_loss(projection(student_hidden), teacher_hidden.to(student_hidden.dtype))


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
