"""How sure a run is of its comparisons: a paired bootstrap over the evaluation rows, and the verdicts it allows.

Every model is scored on the same resamples of the eval rows (rows drawn with replacement), so the
differences between models keep their pairing: the noise the rows share cancels. Gap recovery and
"distillation helped" are only stated when the difference they rest on is larger than its uncertainty.
Pure numpy; `pipeline/metrics.py` computes the point values, `summarize` there calls `verdict` here.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
# (name in metrics.json, minuend role, subtrahend role): the comparisons a distillation run makes.
COMPARISONS = (("teacher_minus_hard", "teacher", "hard"), ("distilled_minus_hard", "distilled", "hard"),
               ("teacher_minus_distilled", "teacher", "distilled"))
_CHUNK_ELEMENTS = 4_000_000  # resample counts held at once: rounds x rows, about 16 MB of int32


def paired_bootstrap(labels: np.ndarray, logits: dict[str, np.ndarray], rounds: int, task: str = "binary",
                     pairs: dict[str, tuple[str, str]] | None = None, seed: int = 0) -> dict | None:
    """95% percentile intervals of each model's AUC (accuracy for multiclass) and of differences between models.

    Args:
        logits: {model: (N,) logits, or (N, C) class logits for multiclass}, all on the same rows.
        rounds: resamples; 0 disables (returns None).
        pairs: {name: (model a, model b)}: intervals of metric(a) - metric(b) on the same resamples.

    Returns:
        {"metric", "rounds", "seed", "confidence", "models": {model: [lo, hi]}, "differences": {name: [lo, hi]}}.
    """
    if rounds <= 0 or not logits or not len(labels):
        return None
    metric = "accuracy" if task == "multiclass" else "auc"
    per_round = bootstrap_rounds(labels, logits, rounds, task, seed)  # {model: (rounds,)}
    differences = {name: per_round[a] - per_round[b] for name, (a, b) in (pairs or {}).items()}
    return {"metric": metric, "rounds": rounds, "seed": seed, "confidence": CONFIDENCE,
            "models": {name: _interval(values) for name, values in per_round.items()},
            "differences": {name: _interval(values) for name, values in differences.items()}}


def comparison_pairs(names: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The `COMPARISONS` a run can make, as `paired_bootstrap` pairs, from {role: model name}."""
    return {name: (names[a], names[b]) for name, a, b in COMPARISONS if a in names and b in names}


def bootstrap_rounds(labels: np.ndarray, logits: dict[str, np.ndarray], rounds: int, task: str = "binary",
                     seed: int = 0) -> dict[str, np.ndarray]:
    """{model: (rounds,) metric on each resample}; every model sees the same resamples."""
    labels = np.asarray(labels)
    rng, rows = np.random.default_rng(seed), len(labels)
    if task == "multiclass":
        hits = np.stack([np.asarray(z).argmax(axis=1) == labels for z in logits.values()], axis=1)  # (N, M)
        score = _accuracy_scorer(hits.astype(np.float64))
    else:
        score = _aucs_scorer([_auc_scorer(labels, z) for z in logits.values()])
    chunk = max(1, _CHUNK_ELEMENTS // max(rows, 1))
    per_round = np.concatenate([score(resample_counts(rng, rows, min(chunk, rounds - start)))
                                for start in range(0, rounds, chunk)])  # (rounds, M)
    return {name: per_round[:, m] for m, name in enumerate(logits)}


def _aucs_scorer(aucs: list):
    """counts (R, N) -> (R, M) AUC of each model."""
    return lambda counts: np.stack([auc(counts) for auc in aucs], axis=1)


def _accuracy_scorer(hits: np.ndarray):
    """counts (R, N) -> (R, M) accuracy of each model, from hits (N, M): 1.0 where its top class is the label."""
    return lambda counts: counts.astype(np.float64) @ hits / hits.shape[0]  # one BLAS product for all models


def resample_counts(rng: np.random.Generator, rows: int, rounds: int) -> np.ndarray:
    """(rounds, rows) int32: how often each row is drawn in each resample of `rows` draws with replacement."""
    counts = np.empty((rounds, rows), dtype=np.int32)
    for r in range(rounds):  # one round at a time: its counts stay in cache while bincount scatters into them
        drawn = rng.integers(0, rows, size=rows, dtype=np.int32).astype(np.intp)  # intp: bincount's fast path
        counts[r] = np.bincount(drawn, minlength=rows)
    return counts


def weighted_auc(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(R,) AUC of the rows repeated `counts` (R, N) times: the Mann-Whitney statistic with ties as 1/2."""
    return _auc_scorer(np.asarray(labels), scores)(np.atleast_2d(counts))


def _auc_scorer(labels: np.ndarray, scores: np.ndarray):
    """counts (R, N) -> (R,) AUC. Sorting is done once here; each resample is then a cumulative sum.

    AUC = sum_i w_i (W_neg below s_i + W_neg tied with s_i / 2) / (W_pos W_neg) over positives i, where
    the weights w are the rows' counts in the resample.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    neg = neg[np.argsort(scores[neg], kind="stable")]
    below = np.searchsorted(scores[neg], scores[pos], side="left")  # (P,) negatives strictly below
    up_to = np.searchsorted(scores[neg], scores[pos], side="right")  # (P,) negatives below or tied

    def score(counts: np.ndarray) -> np.ndarray:
        cumulative = np.zeros((len(counts), len(neg) + 1), dtype=np.int32)  # a total of N draws fits int32
        np.cumsum(np.take(counts, neg, axis=1), axis=1, out=cumulative[:, 1:])  # (R, Nneg + 1) weight below
        w_pos = np.take(counts, pos, axis=1).astype(np.float64)  # (R, P)
        pairs = (np.take(cumulative, below, axis=1) + np.take(cumulative, up_to, axis=1)) / 2  # (R, P)
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample with one class only: NaN
            return (w_pos * pairs).sum(axis=1) / (w_pos.sum(axis=1) * cumulative[:, -1])

    return score


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def verdict(teacher: float | None, distilled: float | None, hard: float | None, bootstrap: dict | None,
            metric: str) -> dict:
    """Gap recovery and whether distillation helped, each stated only as far as the bootstrap allows.

    gap_recovery = (distilled - hard) / (teacher - hard), defined when the lower end of the interval of
    teacher - hard is above 0 (without a bootstrap: when teacher > hard, marked unchecked).
    """
    values = {"teacher": teacher, "distilled": distilled, "hard": hard}
    intervals = (bootstrap or {}).get("differences", {})
    out = {}
    for name, a, b in COMPARISONS:
        known = values[a] is not None and values[b] is not None
        out[name] = values[a] - values[b] if known else None
        out[f"{name}_ci"] = intervals.get(name) if known else None
    recovery, reason = _gap_recovery(out, bootstrap is not None)
    helped, sentence = _distillation(out["distilled_minus_hard"], out["distilled_minus_hard_ci"], metric)
    return out | {"gap_recovery": recovery, "gap_recovery_reason": reason, "distillation": helped,
                  "distillation_verdict": sentence}


def _gap_recovery(differences: dict, checked: bool) -> tuple[float | None, str | None]:
    lead, ci, gain = (differences[k] for k in ("teacher_minus_hard", "teacher_minus_hard_ci", "distilled_minus_hard"))
    if lead is None or gain is None:
        return None, None
    if ci is not None and ci[0] > 0 and lead > 0:
        return gain / lead, None
    if ci is None and lead > 0:
        return gain / lead, "not checked against noise: no bootstrap, eval.bootstrap was 0"
    noise = f", {_ci_text(ci)}" if ci is not None else ""
    return None, f"n/a: the teacher is not better than the hard-label student (lead {lead:+.4f}{noise})"


def _distillation(gain: float | None, ci: list[float] | None, metric: str) -> tuple[str | None, str | None]:
    """("helped" | "hurt" | "within noise" | "unknown", a plain sentence) about distilled - hard."""
    if gain is None:
        return None, None
    measured = f"distilled - hard {gain:+.4f} {metric}"
    if ci is None:
        return "unknown", f"On the eval days {measured}; its noise is unknown: no bootstrap, eval.bootstrap was 0."
    if ci[0] > 0:
        return "helped", f"Distillation helped on the eval days: {measured} ({_ci_text(ci)})."
    if ci[1] < 0:
        return "hurt", f"Distillation hurt on the eval days: {measured} ({_ci_text(ci)})."
    return "within noise", (f"Distillation made no measurable difference on the eval days: {measured} "
                            f"({_ci_text(ci)}), within noise.")


def _ci_text(ci: list[float]) -> str:
    return f"{CONFIDENCE:.0%} CI [{ci[0]:+.4f}, {ci[1]:+.4f}]"
