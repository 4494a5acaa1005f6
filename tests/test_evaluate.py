"""Metrics against independent computations (scikit-learn) and a hand-made GAUC example."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from pipeline.evaluate import auc, gauc, log_loss, render_report, render_table, score_model


@pytest.fixture
def scored():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=2000)
    labels = (rng.random(2000) < 1 / (1 + np.exp(-logits))).astype(int)
    return labels, logits


def test_auc_matches_sklearn(scored):
    labels, logits = scored
    assert auc(labels, logits) == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)


def test_auc_handles_ties_like_sklearn():
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = np.array([0.1, 0.1, 0.5, 0.5, 0.9, 0.2])
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_auc_of_one_class_is_nan():
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_log_loss_matches_sklearn(scored):
    labels, logits = scored
    probs = 1 / (1 + np.exp(-logits))
    assert log_loss(labels, logits) == pytest.approx(sk_log_loss(labels, probs), rel=1e-9)


def test_log_loss_is_stable_for_extreme_logits():
    assert log_loss(np.array([1, 0]), np.array([1000.0, -1000.0])) == pytest.approx(0.0, abs=1e-12)


def test_gauc_on_a_hand_made_example():
    # user 1: AUC 1.0 over 3 rows; user 2: AUC 1/4 over 4 rows (only 0.8 > 0.2 of 4 pairs); user 3: only clicks -> skipped.
    groups = np.array([1, 1, 1, 2, 2, 2, 2, 3])
    labels = np.array([1, 0, 0, 1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.9, 0.1, 0.2, 0.5])
    assert gauc(labels, scores, groups) == pytest.approx((1.0 * 3 + 0.25 * 4) / 7)


def test_score_model_and_report_are_consistent(scored):
    labels, logits = scored
    metrics = score_model(labels, logits, groups=np.arange(len(labels)) % 7)
    models = {name: dict(metrics, family="mlp", params={"total": size})
              for name, size in (("teacher", 1000), ("student_distilled", 100), ("student_hard", 100))}
    models["student_hard"]["auc"] = metrics["auc"] - 0.02
    models["teacher"]["auc"] = metrics["auc"] + 0.02
    report = render_report({"job": "t", "models": models, "eval": {"rows": 2000, "days": ["2026-11-04"],
                            "ceiling_auc": 0.8}, "train": {"days": ["2026-11-01"]},
                            "label": {"total_rows": 5, "status": "labelled"}})
    assert "Gap recovery (distilled - hard) / (teacher - hard): 50.0%" in report
    assert "10.0x fewer parameters" in report
    assert f"{metrics['auc']:.4f}" in render_table(models, None)
