"""Post-hoc calibration of a binary model's logit, fitted on the validation split (never the evaluation days).

Distillation moves a student's probabilities (the teacher's soft labels are not click rates), and ad auctions
and ranking blends consume probabilities, so each model may get a calibrator that maps its logit to a
calibrated logit:

- platt: `a * logit + b`, a logistic regression on the logit (scikit-learn);
- temperature: `logit / T`, one parameter, which keeps the model's mean log-odds at 0 where Platt can shift it;
- isotonic: a monotone piecewise-linear map of the logit to a probability (scikit-learn's isotonic
  regression over equal-mass bins of the logit, interpolated between the bins), turned back into a logit.

All three are monotone, so rankings (AUC) are unchanged except where isotonic flattens a stretch into ties.
Platt and temperature are one affine op on the logit; isotonic exports as its knots (pipeline/export.py).
Pure numpy and scikit-learn: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

METHODS = ("platt", "isotonic", "temperature")
PROB_FLOOR = 1e-6  # isotonic can reach 0 or 1 on a stretch with no (or only) clicks; a logit needs (0, 1)
MIN_POSITIVES = 10  # fewer clicks than this on validation leave nothing to fit a click rate on
# Isotonic regression on the raw rows is a step function whose steps are a float's width apart: an input
# difference of 1e-7 (ONNX Runtime against eager) could jump a whole step. Fitted on equal-mass bins and
# interpolated between their centres, the map's slopes stay bounded, the export agrees to the parity
# tolerance, and the graph holds at most this many knots.
ISOTONIC_KNOTS = 100


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration: `apply(logits)` gives calibrated logits. `fitted_on` says on what rows."""

    method: str
    slope: float = 1.0  # platt: a; temperature: 1 / T
    intercept: float = 0.0  # platt: b; temperature: 0
    knots_logit: tuple[float, ...] = ()  # isotonic: the increasing logits of its knots
    knots_prob: tuple[float, ...] = ()  # isotonic: the calibrated probability at each knot
    fitted_on: dict = field(default_factory=dict, compare=False)

    @property
    def affine(self) -> bool:
        """One affine op on the logit (Platt, temperature); isotonic is piecewise linear."""
        return self.method != "isotonic"

    def apply(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        if self.affine:
            return self.slope * logits + self.intercept
        probs = np.interp(logits, self.knots_logit, self.knots_prob)  # clamps beyond the end knots
        return logit(np.clip(probs, PROB_FLOOR, 1 - PROB_FLOOR))

    def to_dict(self) -> dict:
        if self.affine:
            return {"method": self.method, "slope": self.slope, "intercept": self.intercept, "fitted_on": self.fitted_on}
        return {"method": self.method, "knots_logit": list(self.knots_logit), "knots_prob": list(self.knots_prob),
                "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, raw: dict) -> Calibrator:
        return cls(method=raw["method"], slope=raw.get("slope", 1.0), intercept=raw.get("intercept", 0.0),
                   knots_logit=tuple(raw.get("knots_logit", ())), knots_prob=tuple(raw.get("knots_prob", ())),
                   fitted_on=raw.get("fitted_on", {}))

    def describe(self) -> str:
        if self.method == "platt":
            return f"platt: {self.slope:.4f} x logit {self.intercept:+.4f}"
        if self.method == "temperature":
            return f"temperature: logit / {1 / self.slope:.4f}"
        return f"isotonic: {len(self.knots_logit)} knots"


def fit(method: str, labels: np.ndarray, logits: np.ndarray, fitted_on: dict | None = None) -> Calibrator:
    """Fits `method` (one of METHODS) to 0/1 `labels` and the model's `logits` on the validation rows.

    Raises ValueError when the rows hold fewer than MIN_POSITIVES clicks or non-clicks: a calibrator fitted
    on them would be noise."""
    labels, logits = np.asarray(labels, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    positives = int(labels.sum())
    if min(positives, len(labels) - positives) < MIN_POSITIVES:
        raise ValueError(f"the validation split has {positives} click(s) in {len(labels)} rows; calibration needs "
                         f"at least {MIN_POSITIVES} clicks and non-clicks: hold out more rows (data.validation)")
    fitted_on = {"rows": len(labels), "positives": positives, **(fitted_on or {})}
    if method == "platt":
        return _platt(labels, logits, fitted_on)
    if method == "temperature":
        return _temperature(labels, logits, fitted_on)
    if method == "isotonic":
        return _isotonic(labels, logits, fitted_on)
    raise ValueError(f"unknown calibration method {method!r}; choose one of {list(METHODS)}")


def _platt(labels: np.ndarray, logits: np.ndarray, fitted_on: dict) -> Calibrator:
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn takes a second to import

    regression = LogisticRegression(C=np.inf, max_iter=1000).fit(logits.reshape(-1, 1), labels)  # unpenalised
    return Calibrator("platt", slope=float(regression.coef_[0, 0]), intercept=float(regression.intercept_[0]),
                      fitted_on=fitted_on)


def _temperature(labels: np.ndarray, logits: np.ndarray, fitted_on: dict) -> Calibrator:
    def loss(log_t: float) -> float:
        return _log_loss(labels, logits / np.exp(log_t))

    best = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return Calibrator("temperature", slope=float(np.exp(-best.x)), fitted_on=fitted_on)


def _isotonic(labels: np.ndarray, logits: np.ndarray, fitted_on: dict) -> Calibrator:
    """Isotonic regression on ISOTONIC_KNOTS equal-mass bins of the logit (each bin's mean logit and click
    rate, weighted by its rows), interpolated between the bins' mean logits."""
    from sklearn.isotonic import IsotonicRegression

    order = np.argsort(logits, kind="stable")
    bins = [part for part in np.array_split(order, min(ISOTONIC_KNOTS, len(order))) if len(part)]
    centres = np.array([logits[part].mean() for part in bins])
    rates = np.array([labels[part].mean() for part in bins])
    weights = np.array([len(part) for part in bins], dtype=np.float64)
    regression = IsotonicRegression(y_min=0.0, y_max=1.0).fit(centres, rates, sample_weight=weights)
    knots, keep = np.unique(centres, return_index=True)  # equal centres (tied logits) make one knot
    return Calibrator("isotonic", knots_logit=tuple(float(x) for x in knots),
                      knots_prob=tuple(float(y) for y in regression.predict(centres)[keep]), fitted_on=fitted_on)


def _log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy from logits, stable for large |logit|."""
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def calibrated_probs(calibrator: Calibrator | None, logits: np.ndarray) -> np.ndarray:
    """Click probabilities after the calibrator (the model's own without one)."""
    logits = np.asarray(logits, dtype=np.float64)
    return expit(calibrator.apply(logits) if calibrator else logits)
