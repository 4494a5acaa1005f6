"""Evaluation metrics and the side-by-side report. Pure numpy: no Ray, no torch.

Metrics are computed from per-row (label, logit[, group]) arrays collected on held-out days.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic: P(score of a click > score of a non-click), ties count 1/2."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks handle ties
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits), computed stably from logits."""
    labels = np.asarray(labels, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    # -[y log s(z) + (1-y) log(1-s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-group AUC weighted by the group's impressions, over groups with both classes."""
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    labels, scores, groups = labels[order], scores[order], groups[order]
    boundaries = np.flatnonzero(np.diff(groups)) + 1
    weighted, weight = 0.0, 0
    for lab, sco in zip(np.split(labels, boundaries), np.split(scores, boundaries)):
        value = auc(lab, sco)
        if not np.isnan(value):
            weighted += value * len(lab)
            weight += len(lab)
    return weighted / weight if weight else float("nan")


def score_model(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """The quality metrics of one model on the evaluation rows."""
    metrics = {"auc": auc(labels, logits), "log_loss": log_loss(labels, logits),
               "mean_ctr_pred": float(np.mean(1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))))}
    if groups is not None:
        metrics["gauc"] = gauc(labels, logits, groups)
    return metrics


def render_table(models: dict[str, dict], ceiling_auc: float | None) -> str:
    """Markdown table: one row per model, the ceiling (true-CTR AUC) last when known."""
    header = "| model | family | params | AUC | GAUC | log-loss |\n|---|---|---:|---:|---:|---:|"
    rows = []
    for name, m in models.items():
        gauc_cell = f"{m['gauc']:.4f}" if m.get("gauc") is not None else "-"
        rows.append(f"| {name} | {m['family']} | {m['params']['total']:,} | {m['auc']:.4f} | {gauc_cell} "
                    f"| {m['log_loss']:.4f} |")
    if ceiling_auc is not None:
        rows.append(f"| ceiling (true CTR) | - | - | {ceiling_auc:.4f} | - | - |")
    return "\n".join([header, *rows])


def render_report(metrics: dict) -> str:
    """`report.md`: the table plus what the numbers mean for shipping the student."""
    models = metrics["models"]
    teacher, distilled, hard = (models[k]["auc"] for k in ("teacher", "student_distilled", "student_hard"))
    gap = teacher - hard
    recovery = (distilled - hard) / gap if gap > 0 else float("nan")
    compression = models["teacher"]["params"]["total"] / max(models["student_distilled"]["params"]["total"], 1)
    lines = [
        f"# Distillation report: {metrics['job']}",
        "",
        f"Evaluated on {metrics['eval']['rows']:,} rows from {', '.join(metrics['eval']['days'])} "
        f"(held out from training: {', '.join(metrics['train']['days'])}).",
        "",
        render_table(models, metrics["eval"].get("ceiling_auc")),
        "",
        f"- Distilled student vs hard-label student: {distilled - hard:+.4f} AUC.",
        f"- Gap recovery (distilled - hard) / (teacher - hard): {recovery:.1%}." if gap > 0
        else "- The teacher does not beat the hard-label student here: gap recovery is undefined.",
        f"- Compression: the student has {compression:.1f}x fewer parameters than the teacher.",
        f"- Soft labels: {metrics['label']['total_rows']:,} rows ({metrics['label']['status']}).",
    ]
    return "\n".join(lines) + "\n"
