"""The paired bootstrap and the verdicts it allows, on seeded synthetic scores whose true AUCs are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.metrics import auc, summarize
from pipeline.verdict import bootstrap_rounds, comparison_pairs, paired_bootstrap, resample_counts, weighted_auc

PAIRS = comparison_pairs({"teacher": "teacher", "distilled": "student_distilled", "hard": "student_hard"})


def click_scores(rows: int, separation: dict[str, float], seed: int = 0, click_rate: float = 0.2):
    """Labels and one logit per model: separation * label + N(0, 1), so that AUC = Phi(separation / sqrt(2))."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(rows) < click_rate).astype(int)
    return labels, {name: mu * labels + rng.normal(size=rows) for name, mu in separation.items()}


def true_auc(separation: float) -> float:
    return float(norm.cdf(separation / np.sqrt(2)))


def test_weighted_auc_equals_the_auc_of_the_repeated_rows():
    rng = np.random.default_rng(1)
    labels = (rng.random(500) < 0.3).astype(int)
    scores = np.round(labels + rng.normal(size=500), 1)  # rounding makes ties
    counts = resample_counts(rng, 500, 3)
    expected = [auc(np.repeat(labels, c), np.repeat(scores, c)) for c in counts]
    assert weighted_auc(labels, scores, counts) == pytest.approx(expected, abs=1e-12)


def test_resample_counts_draw_every_row_count_once_per_row():
    counts = resample_counts(np.random.default_rng(0), 1000, 4)
    assert counts.shape == (4, 1000) and (counts.sum(axis=1) == 1000).all()
    assert 0.6 < (counts > 0).mean() < 0.66  # 1 - 1/e of the rows appear in a resample


def test_interval_covers_the_true_difference_and_shrinks_with_rows():
    truth = true_auc(1.0) - true_auc(0.6)  # 0.0731
    widths = []
    for rows in (4000, 16000):
        labels, logits = click_scores(rows, {"teacher": 1.0, "student_hard": 0.6})
        result = paired_bootstrap(labels, logits, 200, pairs={"teacher_minus_hard": ("teacher", "student_hard")})
        lo, hi = result["differences"]["teacher_minus_hard"]
        assert lo < truth < hi
        for name, mu in (("teacher", 1.0), ("student_hard", 0.6)):
            assert result["models"][name][0] < true_auc(mu) < result["models"][name][1]
        widths.append(hi - lo)
    assert widths[0] == pytest.approx(0.05, abs=0.015)  # about 4 x the standard error at 4000 rows
    assert 0.35 < widths[1] / widths[0] < 0.65  # 4x the rows: about half the width


def test_pairing_cancels_the_noise_the_models_share():
    labels, logits = click_scores(5000, {"teacher": 1.0})
    logits["student_hard"] = logits["teacher"] + np.random.default_rng(9).normal(scale=0.01, size=5000)
    result = paired_bootstrap(labels, logits, 200, pairs={"teacher_minus_hard": ("teacher", "student_hard")})
    lo, hi = result["differences"]["teacher_minus_hard"]
    teacher_lo, teacher_hi = result["models"]["teacher"]
    assert hi - lo < 0.05 * (teacher_hi - teacher_lo)  # independent intervals would be ~40x wider


def test_multiclass_bootstrap_of_accuracy():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, 3000)
    logits = rng.normal(size=(3000, 5))
    right = rng.random(3000) < 0.7  # the label wins on 70% of the rows, by chance on 1/5 of the rest: 76% accurate
    logits[right, labels[right]] += 10
    result = paired_bootstrap(labels, {"teacher": logits}, 200, task="multiclass")
    accuracy = np.mean(logits.argmax(axis=1) == labels)
    lo, hi = result["models"]["teacher"]
    assert result["metric"] == "accuracy" and lo < accuracy < hi and lo < 0.76 < hi
    assert hi - lo == pytest.approx(4 * np.sqrt(0.76 * 0.24 / 3000), rel=0.25)  # binomial standard error


def test_bootstrap_is_seeded_and_zero_rounds_disable_it():
    labels, logits = click_scores(2000, {"teacher": 1.0})
    first, again = bootstrap_rounds(labels, logits, 50), bootstrap_rounds(labels, logits, 50)
    assert np.array_equal(first["teacher"], again["teacher"]) and len(first["teacher"]) == 50
    assert not np.array_equal(first["teacher"], bootstrap_rounds(labels, logits, 50, seed=1)["teacher"])
    assert paired_bootstrap(labels, logits, 0) is None


def _summary(labels: np.ndarray, logits: dict[str, np.ndarray]) -> dict:
    models = {name: {"auc": auc(labels, z)} for name, z in logits.items()}
    return summarize(models, paired_bootstrap(labels, logits, 200, pairs=PAIRS))


def test_gap_recovery_is_na_when_the_teachers_lead_is_noise():
    labels, logits = click_scores(20000, {"student_hard": 0.8, "student_distilled": 0.9}, click_rate=0.05)
    logits["teacher"] = logits["student_hard"] + np.random.default_rng(9).normal(scale=0.02, size=20000)
    summary = _summary(labels, logits)
    lead, (lo, hi) = summary["teacher_minus_hard"], summary["teacher_minus_hard_ci"]
    assert 0 < lead < 0.001 and lo < 0 < hi and hi - lo < 0.002  # the teacher "wins" by noise (+0.0001)
    assert summary["distilled_minus_hard"] / lead > 100  # the ratio that used to be printed as gap recovery
    assert summary["gap_recovery"] is None
    assert summary["gap_recovery_reason"] == ("n/a: the teacher is not better than the hard-label student "
                                              f"(lead {lead:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}])")


def test_gap_recovery_and_distillation_verdicts_with_a_real_gap():
    labels, logits = click_scores(20000, {"teacher": 1.2, "student_distilled": 1.0, "student_hard": 0.8})
    summary = _summary(labels, logits)
    assert summary["teacher_minus_hard_ci"][0] > 0 and summary["gap_recovery_reason"] is None
    expected = (true_auc(1.0) - true_auc(0.8)) / (true_auc(1.2) - true_auc(0.8))  # 0.52
    assert summary["gap_recovery"] == pytest.approx(expected, abs=0.15)
    assert summary["distillation"] == "helped"
    lo, hi = summary["distilled_minus_hard_ci"]
    assert summary["distillation_verdict"] == (f"Distillation helped on the eval days: distilled - hard "
                                               f"{summary['distilled_minus_hard']:+.4f} AUC (95% CI [{lo:+.4f}, "
                                               f"{hi:+.4f}]).")


def test_distillation_within_noise_and_hurt():
    labels, logits = click_scores(20000, {"teacher": 1.2, "student_hard": 0.8})
    logits["student_distilled"] = logits["student_hard"] + np.random.default_rng(3).normal(scale=0.02, size=20000)
    summary = _summary(labels, logits)
    lo, hi = summary["distilled_minus_hard_ci"]
    assert lo < 0 < hi and summary["distillation"] == "within noise"
    assert summary["distillation_verdict"].endswith("), within noise.")
    assert abs(summary["gap_recovery"]) < 0.05  # defined (the teacher leads) and about 0
    logits["student_distilled"] = logits["student_hard"] * 0.5 + np.random.default_rng(3).normal(size=20000)
    assert _summary(labels, logits)["distillation"] == "hurt"
