"""Evaluation scoring: every model of a run scored on the evaluation rows (the eval days' rows, or with
`data.evaluation` a hash fraction of them) in one actor-pool pass.

Input: the spec, the checkpoints, and what the label stage did; output: the run's metrics (what
`metrics.json` holds). The metrics themselves are pure functions in `pipeline/metrics.py`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import calibration, metrics
from pipeline.calibration import Calibrator
from pipeline.data import clicklogs
from pipeline.errors import UserError
from pipeline.features import table_to_inputs
from pipeline.models import count_parameters, load_model, model_bytes
from pipeline.spec import JobSpec
from pipeline.stages.click_logs import bad_rows_located, read_evaluation, read_validation, sample_rows, schema_names
from pipeline.stages.label import Ensemble, Labelled, map_with_teachers
from pipeline.stages.search import search_records
from pipeline.stages.students import DISTILLED, HARD, Students
from pipeline.stages.training import training_records
from pipeline.verdict import comparison_pairs, paired_bootstrap

TEACHER_ROLES = ("teacher", "ensemble_member")  # models that are not compared with the teacher


def teacher_models(spec: JobSpec, teachers: dict[str, str]) -> tuple[dict[str, str], Ensemble | None]:
    """The teacher as scored models: {"teacher": path}, or each member plus their weighted "teacher" mean."""
    if len(teachers) == 1:
        return {"teacher": next(iter(teachers.values()))}, None
    weights = {t.name: (t.weight if spec.distill.ensemble == "weighted" else 1.0) for t in spec.teacher}
    return ({f"teacher_{name}": path for name, path in teachers.items()},
            Ensemble("teacher", {f"teacher_{n}": weights[n] for n in teachers}))


def validation_scores(spec: JobSpec, checkpoints: dict[str, str], combine: Ensemble | None = None) -> dict:
    """{model: {metric: value, "rows": n}} on the validation split, with `spec.selection_metric` and log-loss."""
    table = _scored_table(spec, checkpoints, combine, on_validation=True)
    labels = table.column(spec.features.label).to_numpy()
    scores = {}
    for name in [*checkpoints, *([combine.column] if combine else [])]:
        logits = _logits(table.column(name))
        if spec.features.task == "multiclass":
            scores[name] = metrics.multiclass_metrics(labels, logits)
        else:
            scores[name] = {"auc": metrics.auc(labels, logits), "log_loss": metrics.log_loss(labels, logits)}
        scores[name] |= {"rows": table.num_rows, "positives": int(labels.sum()) if spec.features.task == "binary"
                         else None}
    return scores


def fit_calibrators(spec: JobSpec, checkpoints: dict[str, str], combine: Ensemble | None = None) -> dict[str, Calibrator]:
    """{model: its `eval.calibration` calibrator}, each fitted on the validation split (never on the
    evaluation days); {} with eval.calibration none."""
    if spec.eval.calibration == "none":
        return {}
    table = _scored_table(spec, checkpoints, combine, on_validation=True)
    labels = table.column(spec.features.label).to_numpy()
    fitted_on = {"split": "validation", "days": [d.isoformat() for d in spec.data.validation_days()]}
    return {name: _fit(spec, name, labels, _logits(table.column(name)), fitted_on)
            for name in [*checkpoints, *([combine.column] if combine else [])]}


def _fit(spec: JobSpec, name: str, labels: np.ndarray, logits: np.ndarray, fitted_on: dict) -> Calibrator:
    try:
        return calibration.fit(spec.eval.calibration, labels, logits, fitted_on)
    except ValueError as exc:
        raise UserError(f"eval.calibration: cannot calibrate {name}: {exc}") from exc


def evaluate_run(spec: JobSpec, teachers: dict[str, str], students: Students, labelled: Labelled,
                 gate: dict | None = None) -> dict:
    """The run's metrics: every model on the eval days, what was trained and labelled, and (with a
    validation split) the teacher gate, the distillation candidates and the student the run recommends.
    With `eval.calibration`, each model's calibrator is fitted on validation and scored on the eval days."""
    checkpoints, combine = teacher_models(spec, teachers)
    roles = {name: "teacher" if name == "teacher" else "ensemble_member" for name in checkpoints}
    roles |= {name: "distilled" if name == DISTILLED else "hard" for name in students.paths}
    calibrators = fit_calibrators(spec, checkpoints | students.paths, combine)
    return {
        "job": spec.name,
        "spec_hash": spec.fingerprint(),
        "task": spec.features.task,
        "train": {"days": [d.isoformat() for d in spec.data.train_days.days()]},
        "label": _label_summary(labelled),
        **evaluate_models(spec, checkpoints | students.paths, combine, roles=roles, calibrators=calibrators),
        "training": (training := training_records(spec.run_dir)),
        "selection": selection(spec, training, gate, students),
        "search": search_records(spec),  # every trial of each teacher search (empty without one)
    }


def selection(spec: JobSpec, training: dict[str, dict], gate: dict | None, students: Students) -> dict:
    """Which student the run recommends, chosen on validation (never on the evaluation days): each student's
    kept epoch was already scored on the validation split by its training workers."""
    if spec.data.validation is None:
        return {"on": None, "recommended": DISTILLED, "gate": None, "candidates": [],
                "reason": "no validation split (data.validation): the distilled student, unchosen"}
    metric = spec.selection_metric
    kept = {DISTILLED: students.chosen, HARD: HARD}
    scores = {role: kept_scores(training[record], metric) for role, record in kept.items()}
    candidates = [{"role": role, **settings, **kept_scores(training[role], metric), "chosen": role == students.chosen}
                  for role, settings in students.candidates.items()]
    return {"on": "validation", "gate": gate, "scores": scores, "candidates": candidates} | recommend(scores, metric)


def kept_scores(record: dict, metric: str) -> dict:
    """A model's validation scores at its kept epoch, as its training workers computed them (from its record)."""
    epoch = record["history"][record["best_epoch"] - 1]
    return {metric: epoch[f"val_{metric}"], "log_loss": epoch["val_log_loss"], "rows": epoch["val_rows"],
            "positives": epoch.get("val_positives"), "epoch": record["best_epoch"]}


def recommend(scores: dict[str, dict], metric: str) -> dict:
    """The better of the distilled and the hard-label student on `metric` (higher is better; lower for
    log_loss); a tie goes to the hard-label student, the simpler model to ship."""
    sign = -1.0 if metric == "log_loss" else 1.0
    distilled, hard = scores[DISTILLED][metric], scores[HARD][metric]
    helped = sign * distilled > sign * hard
    verdict = "distillation helped" if helped else "distillation did not help"
    return {"recommended": DISTILLED if helped else HARD, "distillation_helped": helped,
            "reason": f"{verdict} on validation: {metric} {distilled:.4f} distilled vs {hard:.4f} hard-label"}


def _label_summary(labelled: Labelled) -> dict:
    shard_set = labelled.shard_set
    return {"total_rows": shard_set.total_rows, "shards": len(shard_set.shards), "input_rows": shard_set.input_rows,
            "quarantined_rows": shard_set.quarantined_rows,
            "status": "labelled" if labelled.relabelled else "reused", "relabelled_days": labelled.relabelled,
            "teacher_sha256": shard_set.teacher.checkpoint_sha256,
            "teachers": [{"name": m.name, "model": m.model, "checkpoint_sha256": m.checkpoint_sha256,
                          "weight": m.weight} for m in shard_set.teacher.members]}


def evaluate_models(spec: JobSpec, checkpoints: dict[str, str], combine: Ensemble | None = None,
                    roles: dict[str, str] | None = None, calibrators: dict[str, Calibrator] | None = None) -> dict:
    """Scores every model on the evaluation rows in one actor-pool pass; returns {"eval": ..., "models": ...,
    "summary"}.

    "eval" holds the paired-bootstrap intervals (`eval.bootstrap` resamples; None when 0) that the summary's
    verdicts rest on: gap recovery only when the teacher's lead is above its noise.

    Args:
        combine: adds an ensemble scored by the weighted mean of its members' logits.
        roles: {model name: "teacher" | "distilled" | "hard" | "ensemble_member"}; agreement with the
            teacher is reported for every model that is not a teacher.
        calibrators: {model name: Calibrator}; each such model gets a "calibrated" entry: its calibrator and
            the AUC, log-loss and ECE of its calibrated logits.
    """
    roles, calibrators = roles or {}, calibrators or {}
    table = _scored_table(spec, checkpoints, combine)
    labels = table.column(spec.features.label).to_numpy()
    columns = [*checkpoints, *([combine.column] if combine else [])]
    logits = {name: _logits(table.column(name)) for name in columns}
    context = _ScoringContext(spec, labels, table)
    sample = _latency_sample(spec)
    models = {}
    for name, path in checkpoints.items():
        role = roles.get(name, "student")
        teacher = None if role in TEACHER_ROLES else logits.get("teacher")
        models[name] = context.score(logits[name], teacher) | {"role": role, **_describe_model(spec, path, sample)}
    if combine:
        members = [models[m] for m in combine.weights]
        models[combine.column] = context.score(logits[combine.column], None) | _ensemble_description(members)
    for name, calibrator in calibrators.items():
        models[name]["calibrated"] = context.calibrated(calibrator, logits[name])
    evaluation = _eval_summary(spec, labels, table) | {"bootstrap": context.bootstrap(logits, models)}
    return {"eval": evaluation, "models": models, "summary": metrics.summarize(models, evaluation["bootstrap"])}


def _scored_table(spec: JobSpec, checkpoints: dict[str, str], combine: Ensemble | None,
                  on_validation: bool = False) -> pa.Table:
    """The evaluation rows, or the validation rows, with their label, group, slice column and true CTR, and
    one logit column per model."""
    columns = _eval_columns(spec)
    keep = [c for c in (spec.features.label, spec.features.group, spec.eval.slice_by, "true_ctr") if c in columns]
    predictor = {"checkpoints": dict(checkpoints), "keep_columns": list(dict.fromkeys(keep)), "combine": combine}
    if on_validation:
        days, rows = spec.data.validation_days(), read_validation(spec, columns)
    else:
        days, rows = spec.data.eval_days.days(), read_evaluation(spec, columns)
    scored = map_with_teachers(rows, spec, predictor)
    with bad_rows_located(spec, days, columns):
        return pa.concat_tables(list(scored.iter_batches(batch_format="pyarrow", batch_size=None)))


class _ScoringContext:
    """What every model of a run is scored against: labels, groups, slices and the spec's metric settings."""

    def __init__(self, spec: JobSpec, labels: np.ndarray, table: pa.Table):
        self.spec, self.labels = spec, labels
        self.groups = table.column(spec.features.group).to_numpy() if spec.features.group else None
        self.slices = table.column(spec.eval.slice_by).to_numpy() if spec.eval.slice_by else None

    def score(self, logits: np.ndarray, teacher_logits: np.ndarray | None) -> dict:
        return metrics.score_model(self.labels, logits, self.groups, teacher_logits=teacher_logits,
                                   slice_values=self.slices, bins=self.spec.eval.calibration_bins,
                                   max_slices=self.spec.eval.max_slices, task=self.spec.features.task,
                                   min_slice_positives=self.spec.eval.min_slice_positives)

    def calibrated(self, calibrator: Calibrator, logits: np.ndarray) -> dict:
        """The calibrator and how its calibrated logits score (AUC moves only where isotonic makes ties)."""
        calibrated = calibrator.apply(logits)
        return ({"method": calibrator.method, "calibrator": calibrator.to_dict(), "auc": metrics.auc(self.labels, calibrated)}
                | metrics.calibration_scores(self.labels, calibrated, self.spec.eval.calibration_bins))

    def bootstrap(self, logits: dict[str, np.ndarray], models: dict[str, dict]) -> dict | None:
        """Paired-bootstrap intervals of each model and of the teacher / distilled / hard differences."""
        pairs = comparison_pairs(metrics.model_names(models))
        return paired_bootstrap(self.labels, logits, self.spec.eval.bootstrap, self.spec.features.task, pairs)


def _eval_summary(spec: JobSpec, labels: np.ndarray, table: pa.Table) -> dict:
    binary = spec.features.task == "binary"
    has_ceiling = binary and "true_ctr" in table.column_names  # synthetic logs only
    ceiling = metrics.auc(labels, table.column("true_ctr").to_numpy()) if has_ceiling else None
    return {"days": [d.isoformat() for d in spec.data.eval_days.days()], "held_out": _held_out(spec),
            "rows": table.num_rows,
            "positives": int(np.sum(labels)) if binary else None,
            "click_rate": float(np.mean(labels)) if binary else None, "ceiling_auc": ceiling,
            "slice_by": spec.eval.slice_by, "min_slice_positives": spec.eval.min_slice_positives}


def _held_out(spec: JobSpec) -> dict:
    """How the evaluation rows were held out of training: whole days, or a hash fraction of the eval days' rows
    (`data.evaluation`), never trained on on any day."""
    if spec.data.evaluation is None:
        return {"by": "days"}
    return {"by": "rows", "fraction": spec.data.evaluation.fraction, "key": spec.evaluation_key}


def _logits(column: pa.ChunkedArray) -> np.ndarray:
    """A logit column: (N,) floats, or (N, C) from a fixed-size-list column (multiclass)."""
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        return pc.list_flatten(column).to_numpy().reshape(-1, width)
    return column.to_numpy()


def _latency_sample(spec: JobSpec) -> pa.Table:
    """Up to `eval.batch_size` (at most 4096) rows of the first eval day, for latency and throughput: every
    model's inputs (a teacher's teacher-only columns too; each model takes its own layout's)."""
    return sample_rows(spec, spec.data.eval_days.days()[:1], spec.log_features.input_columns(),
                       min(spec.eval.batch_size, 4096))


def _describe_model(spec: JobSpec, path: str, sample: pa.Table) -> dict:
    """Family, parameter counts, serialized bytes and CPU latency of one saved model."""
    model, config, layout = load_model(path)
    batch = table_to_inputs(sample, layout)
    one_row = {k: v[:1] for k, v in batch.items()}
    return {"family": config.model, "params": count_parameters(model), "bytes": len(model_bytes(model)),
            "latency": metrics.measure_latency(model, one_row, batch, runs=spec.eval.latency_runs),
            "checkpoint": path}


def _ensemble_description(members: list[dict]) -> dict:
    """An ensemble runs every member: sizes and latencies add up, throughput combines harmonically."""
    latency = [m["latency"] for m in members]
    return {"role": "teacher", "family": "ensemble", "checkpoint": None,
            "params": {k: sum(m["params"][k] for m in members) for k in ("total", "embedding", "dense")},
            "bytes": sum(m["bytes"] for m in members),
            "latency": {"batch1_p50_ms": sum(m["batch1_p50_ms"] for m in latency),
                        "batch1_p99_ms": sum(m["batch1_p99_ms"] for m in latency),
                        "batched_rows_per_s": 1 / sum(1 / m["batched_rows_per_s"] for m in latency),
                        "batch_size": latency[0]["batch_size"], "threads": latency[0]["threads"]}}


def _eval_columns(spec: JobSpec) -> list[str]:
    """Label, group, every model's inputs (teacher-only columns too), and `true_ctr` when the log has it
    (ceiling only, never a feature)."""
    present = schema_names(spec, spec.data.eval_days.days())
    wanted = [spec.features.label, spec.features.group, *spec.log_features.input_columns()]
    if "true_ctr" in present:
        wanted.append("true_ctr")
    return list(dict.fromkeys(c for c in wanted if c))
