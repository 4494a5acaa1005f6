"""Post-hoc calibration: each method on a constructed miscalibrated score with a known answer, equal-mass
reliability bins, the spec rules, and the calibrator folded into the exported model (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from pipeline import calibration, metrics
from pipeline.calibration import Calibrator
from pipeline.serving import read_signature, score_log
from pipeline.errors import SpecError
from pipeline.spec import parse_spec
from pipeline.stages.export import export_checkpoint, parity_rows
from tests.test_export import saved, world  # noqa: F401  (the module's fixture)
from tests.conftest import ROOT


def miscalibrated(rows: int = 200_000, slope: float = 0.5, intercept: float = -1.5, seed: int = 0):
    """Model logits z whose true click probability is sigmoid(slope * z + intercept): over-confident and
    biased, as a distilled student can be. Returns (labels, z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, rows)
    labels = (rng.random(rows) < expit(slope * z + intercept)).astype(np.float64)
    return labels, z


def ece(labels, logits, strategy="quantile") -> float:
    return metrics.calibration(labels, expit(logits), bins=20, strategy=strategy)["ece"]


def test_platt_recovers_the_known_slope_and_intercept():
    labels, z = miscalibrated()
    fitted = calibration.fit("platt", labels, z)
    assert fitted.slope == pytest.approx(0.5, abs=0.02) and fitted.intercept == pytest.approx(-1.5, abs=0.03)
    assert ece(labels, z) > 0.05  # the raw score is far off
    assert ece(labels, fitted.apply(z)) < 0.005  # and the calibrated one is not
    assert metrics.log_loss(labels, fitted.apply(z)) < metrics.log_loss(labels, z) - 0.05


def test_temperature_recovers_the_known_temperature():
    labels, z = miscalibrated(slope=0.4, intercept=0.0, seed=1)  # logit / 2.5
    fitted = calibration.fit("temperature", labels, z)
    assert 1 / fitted.slope == pytest.approx(2.5, rel=0.03) and fitted.intercept == 0.0
    assert ece(labels, fitted.apply(z)) < 0.005 < ece(labels, z)


def test_isotonic_is_monotone_and_calibrates():
    labels, z = miscalibrated(seed=2)
    fitted = calibration.fit("isotonic", labels, z)
    assert np.all(np.diff(fitted.knots_logit) > 0) and np.all(np.diff(fitted.knots_prob) >= 0)
    grid = np.linspace(-12, 12, 1001)
    assert np.all(np.diff(fitted.apply(grid)) >= 0)  # monotone, and finite beyond the end knots
    assert np.all(np.isfinite(fitted.apply(grid)))
    assert ece(labels, fitted.apply(z)) < 0.005 < ece(labels, z)


def test_a_calibrator_round_trips_through_its_dict():
    labels, z = miscalibrated(rows=20_000)
    for method in calibration.METHODS:
        fitted = calibration.fit(method, labels, z, {"split": "validation"})
        again = Calibrator.from_dict(fitted.to_dict())
        np.testing.assert_array_equal(again.apply(z), fitted.apply(z))
        assert again.fitted_on == {"rows": 20_000, "positives": int(labels.sum()), "split": "validation"}


def test_too_few_clicks_to_fit_on_is_refused():
    labels = np.zeros(5000)
    labels[:3] = 1
    with pytest.raises(ValueError, match="3 click.*at least 10"):
        calibration.fit("platt", labels, np.zeros(5000))


def test_equal_mass_bins_hold_equal_rows_and_equal_width_bins_follow_the_value():
    rng = np.random.default_rng(0)
    probs = rng.beta(0.5, 30.0, 1003)  # a 2% click rate: equal widths put nearly every row in the first bin
    labels = (rng.random(1003) < probs).astype(float)
    quantile = metrics.calibration(labels, probs, bins=10, strategy="quantile")
    counts = [b["rows"] for b in quantile["bins"]]
    assert len(counts) == 10 and sum(counts) == 1003 and max(counts) - min(counts) <= 1
    edges = [(b["lo"], b["hi"]) for b in quantile["bins"]]
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(edges, edges[1:]))  # ordered by probability
    uniform = metrics.calibration(labels, probs, bins=10)
    assert uniform["bins"][0]["rows"] > 900
    # ECE by hand over the equal-mass bins
    order = np.argsort(probs, kind="stable")
    by_hand = sum(len(part) / 1003 * abs(labels[part].mean() - probs[part].mean())
                  for part in np.array_split(order, 10))
    assert quantile["ece"] == pytest.approx(by_hand, abs=1e-12)


def test_spec_rules_for_calibration():
    import yaml

    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    raw["eval"] = {"calibration": "platt"}
    raw["data"].pop("validation", None)
    raw["train"].pop("early_stopping", None)
    raw.get("distill", {}).pop("search", None)
    with pytest.raises(SpecError, match="eval.calibration platt is fitted on the validation split"):
        parse_spec(raw)
    raw["data"]["validation"] = {"fraction": 0.1}
    raw["features"] |= {"task": "multiclass", "num_classes": 3}
    with pytest.raises(SpecError, match="applies to task: binary only"):
        parse_spec(raw)
    raw["eval"] = {"calibration": "sigmoid"}
    with pytest.raises(SpecError, match="eval.calibration"):
        parse_spec(raw)


@pytest.mark.parametrize("method", calibration.METHODS)
def test_the_exported_calibrated_model_matches_the_eager_calibrated_one(world, tmp_path, method):  # noqa: F811
    spec, layout, root = world
    rows = parity_rows(spec, layout)
    checkpoint = saved(tmp_path, "mlp", layout)
    raw = export_checkpoint(spec, "raw", "student", checkpoint, rows, str(tmp_path), formats=["onnx"])
    raw_logits = _score(raw["onnx"]["dir"], spec, tmp_path / "raw.parquet")
    fitted = calibration.fit(method, rows.labels, raw_logits)
    results = export_checkpoint(spec, method, "student", checkpoint, rows, str(tmp_path),
                                formats=["onnx", "torchscript"], calibrator=fitted)
    for fmt in ("onnx", "torchscript"):
        assert results[fmt]["parity"]["passed"], results[fmt]["parity"]  # against eager + the same calibrator
    assert read_signature(results["onnx"]["dir"]).calibration == fitted.to_dict()
    served = _score(results["onnx"]["dir"], spec, tmp_path / f"{method}.parquet")
    # and against the calibrator applied outside the graph in float64
    tolerance = 1e-4 if method == "isotonic" else 1e-5
    np.testing.assert_allclose(served, fitted.apply(raw_logits), atol=tolerance, rtol=tolerance)
    assert ece(rows.labels, served, "uniform") <= ece(rows.labels, raw_logits, "uniform") + 1e-9


def _score(model_dir: str, spec, out) -> np.ndarray:
    """The exported model's logits on the evaluation day, through the torch-free scorer."""
    import pyarrow.parquet as pq

    day = spec.data.eval_days.start.isoformat()
    score_log(model_dir, f"{spec.data.path}/date={day}", str(out))
    return pq.read_table(out, columns=["logit"]).column("logit").to_numpy().astype(np.float64)
