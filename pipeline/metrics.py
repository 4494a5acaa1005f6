"""Evaluation metrics of one run: quality, calibration, agreement with the teacher, slices, latency.

Pure numpy on per-row (label, logit[, group, slice]) arrays collected on held-out days; torch is
imported inside `measure_latency` only (the pure commands need no torch). How sure the comparisons are (the
paired bootstrap) lives in `pipeline/verdict.py`, the report in `pipeline/report.py`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from scipy.special import expit, logsumexp

from pipeline.verdict import verdict


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic: P(score of a click > score of a non-click), ties count 1/2."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy's rankdata). pandas, not scipy.stats: training
    workers score validation with `auc`, and scipy.stats would add half a second to every worker's start."""
    return pd.Series(np.asarray(values)).rank(method="average").to_numpy()


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits), computed stably from logits."""
    labels = np.asarray(labels, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    # -[y log s(z) + (1-y) log(1-s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-group AUC weighted by the group's impressions, over groups with both classes; rows without
    a group (null) are left out.

    Every group at once: ranks within each group (pandas' grouped rank), then each group's Mann-Whitney U from
    sums per group, with no Python loop over groups (an evaluation day can hold millions of users)."""
    labels = np.asarray(labels).astype(bool)
    codes = pd.factorize(np.asarray(groups))[0]  # (N,) group number, -1 for a null group
    kept = codes >= 0
    labels, codes, scores = labels[kept], codes[kept], np.asarray(scores)[kept]
    ranks = pd.Series(scores).groupby(codes).rank(method="average").to_numpy()  # 1-based, within the group
    rows = np.bincount(codes).astype(np.float64)
    positives = np.bincount(codes, weights=labels, minlength=len(rows))
    positive_ranks = np.bincount(codes, weights=ranks * labels, minlength=len(rows))
    negatives = rows - positives
    both = (positives > 0) & (negatives > 0)
    if not both.any():
        return float("nan")
    p, n = positives[both], negatives[both]
    aucs = (positive_ranks[both] - p * (p + 1) / 2) / (p * n)
    return float((aucs * rows[both]).sum() / rows[both].sum())


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 10, strategy: str = "uniform") -> dict:
    """Reliability bins and the expected calibration error.

    strategy "uniform": equal-width bins on [0, 1] (a probability of exactly 1 falls in the last bin);
    "quantile": equal-mass bins, each holding N / bins rows (to one row) in order of probability, which at a
    1% click rate spreads the rows over many bins where equal widths put nearly all of them in the first.
    Only non-empty bins are listed. ECE = sum_b rows_b / N * |observed_b - mean_pred_b|, observed_b being the
    bin's click rate.
    """
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if strategy == "quantile":
        sizes = np.full(bins, len(probs) // bins)
        sizes[: len(probs) % bins] += 1  # as np.array_split cuts: the first bins hold one row more
        index = np.empty(len(probs), dtype=np.int64)
        index[np.argsort(probs, kind="stable")] = np.repeat(np.arange(bins), sizes)
    else:
        index = np.minimum((probs * bins).astype(np.int64), bins - 1)  # (N,) bin of each row
    rows = np.bincount(index, minlength=bins)
    pred_sum = np.bincount(index, weights=probs, minlength=bins)
    click_sum = np.bincount(index, weights=labels, minlength=bins)
    low = np.full(bins, np.inf)
    high = np.full(bins, -np.inf)
    np.minimum.at(low, index, probs)
    np.maximum.at(high, index, probs)
    table, ece = [], 0.0
    for b in np.flatnonzero(rows):
        mean_pred, observed = pred_sum[b] / rows[b], click_sum[b] / rows[b]
        ece += rows[b] / len(labels) * abs(observed - mean_pred)
        edges = (b / bins, (b + 1) / bins) if strategy == "uniform" else (float(low[b]), float(high[b]))
        table.append({"lo": edges[0], "hi": edges[1], "mean_pred": float(mean_pred),
                      "observed": float(observed), "rows": int(rows[b])})
    return {"ece": float(ece), "bins": table, "strategy": strategy}


def calibration_scores(labels: np.ndarray, logits: np.ndarray, bins: int) -> dict:
    """What calibration is judged on: log-loss, mean predicted CTR, and ECE over equal-width and equal-mass
    bins (`calibration`, `calibration_quantile`)."""
    probs = expit(np.asarray(logits, dtype=np.float64))
    return {"log_loss": log_loss(labels, logits), "mean_ctr_pred": float(np.mean(probs)),
            "calibration": calibration(labels, probs, bins), "calibration_quantile": calibration(labels, probs, bins,
                                                                                                 "quantile")}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / norm) if norm > 0 else float("nan")  # constant scores: undefined


def agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict:
    """How closely a student follows its teacher, row by row.

    Returns pearson (of the logits), spearman (rank correlation, average ranks for ties) and
    mean_abs_prob_diff = mean |sigmoid(student) - sigmoid(teacher)|.
    """
    student = np.asarray(student_logits, dtype=np.float64)
    teacher = np.asarray(teacher_logits, dtype=np.float64)
    return {"pearson": _pearson(student, teacher),
            "spearman": _pearson(average_ranks(student), average_ranks(teacher)),
            "mean_abs_prob_diff": float(np.mean(np.abs(expit(student) - expit(teacher))))}


def multiclass_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    """Accuracy, top-5 accuracy and cross-entropy of (N, C) class logits against integer labels."""
    labels, logits = np.asarray(labels, dtype=np.int64), np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))
    k = min(5, logits.shape[1])
    top_k = np.argpartition(-logits, k - 1, axis=1)[:, :k]  # (N, k) in no particular order
    # -log softmax(z)_y = logsumexp(z) - z_y
    cross_entropy = logsumexp(logits, axis=1) - logits[rows, labels]
    return {"accuracy": float(np.mean(logits.argmax(axis=1) == labels)),
            "top5_accuracy": float(np.mean((top_k == labels[:, None]).any(axis=1))),
            "log_loss": float(np.mean(cross_entropy))}


def _binary_scores(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray | None) -> dict:
    scores = {"auc": auc(labels, logits), "log_loss": log_loss(labels, logits)}  # (a slice's; see calibration_scores)
    if groups is not None:
        scores["gauc"] = gauc(labels, logits, groups)
    return scores


def slice_metrics(labels: np.ndarray, logits: np.ndarray, slice_values: np.ndarray,
                  groups: np.ndarray | None = None, max_slices: int = 20, task: str = "binary",
                  min_positives: int = 50) -> list[dict]:
    """Metrics per value of a categorical column, for the `max_slices` largest slices by rows.

    Binary rows are {value, rows, positives, click_rate, scored, auc, log_loss[, gauc when groups]}; a slice
    with fewer than `min_positives` clicks is too noisy to rank models on: it is listed with scored False
    and a reason instead of scores. Multiclass rows are {value, rows, accuracy, top5_accuracy, log_loss}.
    """
    labels, logits, slice_values = np.asarray(labels), np.asarray(logits), np.asarray(slice_values)
    values, inverse, counts = np.unique(slice_values, return_inverse=True, return_counts=True)
    largest = np.argsort(-counts, kind="stable")[:max_slices]
    out = []
    for v in largest:
        mask = inverse.reshape(-1) == v
        row = {"value": _plain(values[v]), "rows": int(counts[v])}
        if task == "multiclass":
            row |= multiclass_metrics(labels[mask], logits[mask])
        else:
            row |= _binary_slice(labels[mask], logits[mask], None if groups is None else np.asarray(groups)[mask],
                                 min_positives)
        out.append(row)
    return out


def _binary_slice(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray | None, min_positives: int) -> dict:
    positives = int(np.sum(labels))
    row = {"positives": positives, "click_rate": float(np.mean(labels)), "scored": positives >= min_positives}
    if not row["scored"]:
        return row | {"reason": f"fewer than {min_positives} positives"}
    return row | _binary_scores(labels, logits, groups)


def _plain(value):
    """A numpy scalar as the Python value json can write."""
    return value.item() if isinstance(value, np.generic) else value


def score_model(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray | None = None, *,
                teacher_logits: np.ndarray | None = None, slice_values: np.ndarray | None = None,
                bins: int = 10, max_slices: int = 20, task: str = "binary", min_slice_positives: int = 50) -> dict:
    """Every quality metric of one model on the evaluation rows.

    Binary: auc, log_loss, mean_ctr_pred, calibration and calibration_quantile {ece, bins, strategy}, gauc
    (with groups), agreement (with teacher_logits), slices (with slice_values). Multiclass (logits (N, C)): accuracy,
    top5_accuracy, log_loss, agreement {top1_agreement} and slices likewise.
    """
    if task == "multiclass":
        metrics = multiclass_metrics(labels, logits)
        if teacher_logits is not None:
            same = np.asarray(logits).argmax(axis=1) == np.asarray(teacher_logits).argmax(axis=1)
            metrics["agreement"] = {"top1_agreement": float(np.mean(same))}
    else:
        metrics = _binary_scores(labels, logits, groups) | calibration_scores(labels, logits, bins)
        if teacher_logits is not None:
            metrics["agreement"] = agreement(logits, teacher_logits)
    if slice_values is not None:
        metrics["slices"] = slice_metrics(labels, logits, slice_values, groups, max_slices, task, min_slice_positives)
    return metrics


def time_calls(call, calls: int, warmup: int) -> np.ndarray:
    """Seconds of each of `calls` calls of `call()`, one at a time, after `warmup` untimed calls (allocator,
    caches, lazy initialisation). The timing loop of every latency figure the pipeline reports."""
    for _ in range(warmup):
        call()
    seconds = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter()
        call()
        seconds[i] = time.perf_counter() - started
    return seconds


def measure_latency(model, inputs_one_row: dict, batch_inputs: dict, runs: int = 200, threads: int = 1) -> dict:
    """Serving latency of one model: batch-1 p50/p99 in ms and batched throughput in rows/s.

    Timed with `time_calls` per forward pass under `torch.inference_mode`, after warm-up passes,
    on `threads` intra-op threads (restored afterwards, as is the model's train/eval mode).
    """
    import torch

    def forward(inputs: dict) -> None:
        model(inputs)
        if on_gpu:  # CUDA calls are asynchronous: wait for the result
            torch.cuda.synchronize()

    on_gpu = any(t.is_cuda for t in batch_inputs.values())
    batch_size = len(next(iter(batch_inputs.values())))
    previous_threads, was_training = torch.get_num_threads(), model.training
    torch.set_num_threads(threads)
    model.eval()
    try:
        with torch.inference_mode():
            single = time_calls(lambda: forward(inputs_one_row), runs, warmup=max(5, runs // 10))
            batched_runs = max(3, runs // 20)  # throughput on full batches
            batched_seconds = time_calls(lambda: forward(batch_inputs), batched_runs, warmup=1).sum()
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    single_ms = single * 1000
    return {"batch1_p50_ms": float(np.percentile(single_ms, 50)), "batch1_p99_ms": float(np.percentile(single_ms, 99)),
            "batched_rows_per_s": batch_size * batched_runs / batched_seconds, "batch_size": batch_size,
            "threads": threads}


_ROLES = (("teacher", "teacher"), ("student_distilled", "distilled"), ("student_hard", "hard"))  # (name, role)


def summarize(models: dict[str, dict], bootstrap: dict | None = None) -> dict:
    """What the run means for shipping the distilled student, from the per-model metrics.

    Differences of AUC (accuracy for multiclass) with their paired-bootstrap intervals (`eval.bootstrap`
    of metrics.json, see `pipeline/verdict.py`); gap_recovery = (distilled - hard) / (teacher - hard) only
    when the teacher's lead is larger than its noise, else None with gap_recovery_reason; compression and
    latency are teacher / student. Models are found by name ("teacher", "student_distilled",
    "student_hard") or else by "role".
    """
    teacher, distilled, hard = (find_model(models, name, role) for name, role in _ROLES)
    metric = "accuracy" if any("accuracy" in m and "auc" not in m for m in (teacher, distilled, hard)) else "auc"
    t, d, h = (_number(m.get(metric)) for m in (teacher, distilled, hard))
    return {
        "metric": metric,
        **verdict(t, d, h, bootstrap, "AUC" if metric == "auc" else metric),
        "compression_params": _ratio(_field(teacher, "params", "total"), _field(distilled, "params", "total")),
        "compression_bytes": _ratio(teacher.get("bytes"), distilled.get("bytes")),
        "latency_speedup": _ratio(_field(teacher, "latency", "batch1_p50_ms"),
                                  _field(distilled, "latency", "batch1_p50_ms")),
    }


def model_names(models: dict[str, dict]) -> dict[str, str]:
    """{"teacher" | "distilled" | "hard": model name} for the roles a run has, found as `find_model` finds them."""
    names = {role: _find_name(models, name, role) for name, role in _ROLES}
    return {role: name for role, name in names.items() if name is not None}


def find_model(models: dict[str, dict], name: str, role: str) -> dict:
    """The model called `name`, else the first with that `role`, else {}."""
    found = _find_name(models, name, role)
    return {} if found is None else models[found]


def _find_name(models: dict[str, dict], name: str, role: str) -> str | None:
    if name in models:
        return name
    return next((n for n, m in models.items() if m.get("role") == role), None)


def _field(model: dict, section: str, key: str):
    return (model.get(section) or {}).get(key)


def _number(value) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def _ratio(numerator, denominator) -> float | None:
    numerator, denominator = _number(numerator), _number(denominator)
    return numerator / denominator if numerator is not None and denominator else None

