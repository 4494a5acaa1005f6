"""Metrics against independent computations (scikit-learn, scipy, numpy) and hand-made examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline.metrics import (agreement, auc, calibration, gauc, log_loss, measure_latency, multiclass_metrics,
                              score_model, slice_metrics, summarize)


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


def test_average_ranks_are_scipys_rankdata():
    from scipy.stats import rankdata

    from pipeline.metrics import average_ranks

    values = np.random.default_rng(3).integers(0, 50, 1000).astype(float)  # many ties
    assert average_ranks(values) == pytest.approx(rankdata(values))


def test_auc_of_one_class_is_nan():
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_log_loss_matches_sklearn(scored):
    labels, logits = scored
    probs = 1 / (1 + np.exp(-logits))
    assert log_loss(labels, logits) == pytest.approx(sk_log_loss(labels, probs), rel=1e-9)


def test_log_loss_is_stable_for_extreme_logits():
    assert log_loss(np.array([1, 0]), np.array([1000.0, -1000.0])) == pytest.approx(0.0, abs=1e-12)


def test_gauc_on_a_hand_made_example():
    # user 1: AUC 1.0 over 3 rows; user 2: AUC 1/4 over 4 rows (only 0.8 > 0.2 of 4 pairs);
    # user 3: only clicks -> skipped.
    groups = np.array([1, 1, 1, 2, 2, 2, 2, 3])
    labels = np.array([1, 0, 0, 1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.9, 0.1, 0.2, 0.5])
    assert gauc(labels, scores, groups) == pytest.approx((1.0 * 3 + 0.25 * 4) / 7)
    assert gauc(labels, scores, groups.astype(str)) == pytest.approx((1.0 * 3 + 0.25 * 4) / 7)  # string user ids


def test_gauc_equals_the_impression_weighted_mean_of_each_groups_auc():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 20_000)
    labels = rng.random(20_000) < 0.2
    scores = np.round(rng.normal(size=20_000), 1)  # many ties inside groups
    per_group = [(auc(labels[groups == g], scores[groups == g]), (groups == g).sum()) for g in np.unique(groups)]
    kept = [(value, rows) for value, rows in per_group if not np.isnan(value)]
    assert len(kept) > 250  # most groups have both classes, some do not
    expected = sum(value * rows for value, rows in kept) / sum(rows for _, rows in kept)
    assert gauc(labels, scores, groups) == pytest.approx(expected, abs=1e-12)
    with_nulls = np.where(groups < 30, None, groups.astype(str)).astype(object)  # rows without a user
    known = groups >= 30
    assert gauc(labels, scores, with_nulls) == pytest.approx(gauc(labels[known], scores[known], groups[known]))


def test_ece_on_a_hand_made_example():
    # 10 bins: bin 0 {0.05: no click} -> |0 - 0.05|; bin 1 {0.15: no, 0.12: click} -> |0.5 - 0.135| twice;
    # bin 8 {0.85: click} -> |1 - 0.85|; bin 9 {0.95: click} -> |1 - 0.95|.
    # ECE = (0.05 + 2 * 0.365 + 0.15 + 0.05) / 5 = 0.196
    result = calibration(np.array([0, 0, 1, 1, 1]), np.array([0.05, 0.15, 0.12, 0.85, 0.95]), bins=10)
    assert result["ece"] == pytest.approx(0.196)
    assert [(b["lo"], b["rows"]) for b in result["bins"]] == [(0.0, 1), (0.1, 2), (0.8, 1), (0.9, 1)]
    assert result["bins"][1]["mean_pred"] == pytest.approx(0.135)
    assert result["bins"][1]["observed"] == pytest.approx(0.5)


def test_calibration_bins_cover_every_row(scored):
    labels, logits = scored
    probs = np.concatenate([1 / (1 + np.exp(-logits)), [0.0, 1.0]])  # both ends of [0, 1] included
    result = calibration(np.concatenate([labels, [0, 1]]), probs, bins=7)
    assert sum(b["rows"] for b in result["bins"]) == len(probs)
    assert result["bins"][-1]["hi"] == pytest.approx(1.0)


def test_a_perfectly_calibrated_constant_has_zero_ece():
    assert calibration(np.array([1, 0, 0, 0]), np.full(4, 0.25))["ece"] == pytest.approx(0.0)


def test_agreement_matches_numpy_and_scipy(scored):
    _, teacher = scored
    student = np.round(0.7 * teacher + np.random.default_rng(0).normal(size=len(teacher)), 1)  # rounding makes ties
    result = agreement(student, teacher)
    assert result["pearson"] == pytest.approx(np.corrcoef(student, teacher)[0, 1], rel=1e-9)
    assert result["spearman"] == pytest.approx(spearmanr(student, teacher).statistic, rel=1e-9)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    assert result["mean_abs_prob_diff"] == pytest.approx(np.mean(np.abs(sigmoid(student) - sigmoid(teacher))))


def test_agreement_with_itself_is_perfect_and_constant_scores_are_undefined():
    logits = np.array([0.1, -2.0, 3.0])
    assert agreement(logits, logits) == pytest.approx({"pearson": 1.0, "spearman": 1.0, "mean_abs_prob_diff": 0.0})
    assert np.isnan(agreement(np.zeros(3), logits)["pearson"])


def test_slice_metrics_rows_sum_and_per_slice_auc(scored):
    labels, logits = scored
    device = np.array(["ios", "android", "web", "tv"])[np.arange(len(labels)) % 7 % 4]  # 4 slices of unequal size
    slices = slice_metrics(labels, logits, device)
    assert sum(s["rows"] for s in slices) == len(labels)
    assert [s["rows"] for s in slices] == sorted((s["rows"] for s in slices), reverse=True)
    ios = next(s for s in slices if s["value"] == "ios")
    mask = device == "ios"
    assert ios["auc"] == pytest.approx(roc_auc_score(labels[mask], logits[mask]))
    assert ios["click_rate"] == pytest.approx(labels[mask].mean())
    assert ios["log_loss"] == pytest.approx(log_loss(labels[mask], logits[mask]))
    assert [s["value"] for s in slice_metrics(labels, logits, device, max_slices=2)] == [s["value"] for s in slices[:2]]


def test_slices_with_few_positives_are_flagged_not_scored():
    labels = np.array([1] * 60 + [0] * 140 + [1] * 49 + [0] * 151)  # slice "a": 60 clicks, slice "b": 49
    logits = np.random.default_rng(2).normal(size=400) + labels
    slices = {s["value"]: s for s in slice_metrics(labels, logits, np.repeat(["a", "b"], 200))}
    assert slices["a"]["scored"] and slices["a"]["positives"] == 60
    assert slices["a"]["auc"] == pytest.approx(roc_auc_score(labels[:200], logits[:200]))
    assert slices["b"] == {"value": "b", "rows": 200, "positives": 49, "click_rate": pytest.approx(0.245),
                           "scored": False, "reason": "fewer than 50 positives"}
    assert slice_metrics(labels, logits, np.repeat(["a", "b"], 200), min_positives=49)[1]["scored"]


def test_slice_values_are_plain_python_for_json(scored):
    labels, logits = scored
    slices = slice_metrics(labels, logits, np.arange(len(labels)) % 3, groups=np.arange(len(labels)) % 11)
    assert all(type(s["value"]) is int and "gauc" in s for s in slices)


def test_multiclass_metrics_by_hand():
    # row 0: argmax 0 = label, CE = log(e^2 + e^1 + e^0) - 2; row 1: argmax 0 (first of ties) != 2, CE = log 3.
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    result = multiclass_metrics(np.array([0, 2]), logits)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["top5_accuracy"] == pytest.approx(1.0)  # 3 classes: every label is in the top 5
    assert result["log_loss"] == pytest.approx((np.log(np.exp(2) + np.exp(1) + 1) - 2 + np.log(3)) / 2)


def test_multiclass_top5_and_stability():
    logits = np.tile(np.arange(7.0), (2, 1))  # class 6 ranks first, class 2 fifth, class 0 last
    assert multiclass_metrics(np.array([2, 0]), logits)["top5_accuracy"] == pytest.approx(0.5)
    assert multiclass_metrics(np.array([1]), np.array([[1000.0, 0.0]]))["log_loss"] == pytest.approx(1000.0)


def test_score_model_binary_has_every_part(scored):
    labels, logits = scored
    groups, device = np.arange(len(labels)) % 7, np.arange(len(labels)) % 3
    metrics = score_model(labels, logits, groups, teacher_logits=logits * 2, slice_values=device, bins=5, max_slices=2)
    assert set(metrics) == {"auc", "gauc", "log_loss", "mean_ctr_pred", "calibration", "calibration_quantile",
                            "agreement", "slices"}
    assert metrics["calibration_quantile"]["strategy"] == "quantile"
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, logits))
    assert metrics["calibration"]["ece"] == calibration(labels, 1 / (1 + np.exp(-logits)), 5)["ece"]
    assert metrics["agreement"]["spearman"] == pytest.approx(1.0)
    assert len(metrics["slices"]) == 2
    assert set(score_model(labels, logits)) == {"auc", "log_loss", "mean_ctr_pred", "calibration",
                                                "calibration_quantile"}


def test_score_model_multiclass():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(300, 10)), rng.integers(0, 10, 300)
    metrics = score_model(labels, logits, task="multiclass", teacher_logits=logits, slice_values=labels % 2)
    assert metrics["accuracy"] == multiclass_metrics(labels, logits)["accuracy"]
    assert metrics["agreement"] == {"top1_agreement": 1.0}
    assert sum(s["rows"] for s in metrics["slices"]) == 300 and "accuracy" in metrics["slices"][0]


class DenseLinear(nn.Module):
    """nn.Linear behind the models' dict-of-tensors interface."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(inputs["dense"]).squeeze(-1)  # (B,)


def test_measure_latency_on_a_tiny_model():
    model, threads = DenseLinear(), torch.get_num_threads()
    result = measure_latency(model, {"dense": torch.zeros(1, 4)}, {"dense": torch.zeros(64, 4)}, runs=20, threads=1)
    assert 0 < result["batch1_p50_ms"] <= result["batch1_p99_ms"]
    assert result["batched_rows_per_s"] > 0 and result["batch_size"] == 64 and result["threads"] == 1
    assert torch.get_num_threads() == threads and model.training  # settings restored


def test_summarize_on_hand_numbers():
    models = {"teacher": {"auc": 0.70, "params": {"total": 1000}, "bytes": 4000, "latency": {"batch1_p50_ms": 2.0}},
              "student_distilled": {"auc": 0.69, "params": {"total": 100}, "bytes": 400,
                                    "latency": {"batch1_p50_ms": 0.5}},
              "student_hard": {"auc": 0.66, "params": {"total": 100}}}
    summary = summarize(models)
    assert summary["gap_recovery"] == pytest.approx((0.69 - 0.66) / (0.70 - 0.66))  # 0.75
    assert summary["distilled_minus_hard"] == pytest.approx(0.03)
    assert summary["compression_params"] == pytest.approx(10.0)
    assert summary["compression_bytes"] == pytest.approx(10.0)
    assert summary["latency_speedup"] == pytest.approx(4.0)
    assert summary["gap_recovery_reason"] == "not checked against noise: no bootstrap, eval.bootstrap was 0"
    assert summary["distillation"] == "unknown" and summary["distilled_minus_hard_ci"] is None
    models["teacher"]["auc"] = 0.65
    summary = summarize(models)
    assert summary["gap_recovery"] is None
    assert summary["gap_recovery_reason"] == "n/a: the teacher is not better than the hard-label student (lead -0.0100)"


def test_summarize_reads_the_bootstrap_intervals():
    models = {"teacher": {"auc": 0.7001}, "student_distilled": {"auc": 0.7030}, "student_hard": {"auc": 0.7000}}
    bootstrap = {"differences": {"teacher_minus_hard": [-0.002, 0.0021], "distilled_minus_hard": [0.001, 0.005],
                                 "teacher_minus_distilled": [-0.004, -0.001]}}
    summary = summarize(models, bootstrap)
    assert summary["gap_recovery"] is None  # was (0.7030 - 0.7) / (0.7001 - 0.7) = 3000%
    assert summary["gap_recovery_reason"] == ("n/a: the teacher is not better than the hard-label student "
                                              "(lead +0.0001, 95% CI [-0.0020, +0.0021])")
    assert summary["teacher_minus_distilled"] == pytest.approx(-0.0029)
    assert summary["distillation"] == "helped" and summary["distilled_minus_hard_ci"] == [0.001, 0.005]
    bootstrap["differences"]["teacher_minus_hard"] = [0.00005, 0.0002]
    assert summarize(models, bootstrap)["gap_recovery"] == pytest.approx(30.0)


def test_summarize_finds_models_by_role_and_uses_accuracy_for_multiclass():
    models = {"ensemble": {"role": "teacher", "accuracy": 0.8},
              "teacher_a": {"role": "ensemble_member", "accuracy": 0.9},
              "small": {"role": "distilled", "accuracy": 0.7}, "small_hard": {"role": "hard", "accuracy": 0.6}}
    summary = summarize(models)
    assert summary["metric"] == "accuracy"
    assert summary["gap_recovery"] == pytest.approx(0.5)
    assert summary["compression_params"] is None and summary["latency_speedup"] is None
