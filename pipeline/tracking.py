"""MLflow tracking: each run, and each nightly cycle, as an MLflow run; teacher-search trials as child runs.

Where: `tracking.uri` (an MLflow server on a cluster), else a SQLite store beside the runs,
`<output.root>/mlflow.db`, with artifacts under `<output.root>/mlartifacts/`. Credentials for a server come
from MLflow's own environment variables (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), never from the spec.

When: after a run has written metrics.json and its report. The training workers record each model's sampled
steps (loss terms, lr) and per-epoch validation metrics on rank 0, inside the loop, and report them with
each checkpoint (what Ray Train V2 keeps); the driver logs those records here, with their step numbers. So no
worker ever needs to reach the tracking store, which a SQLite file on the driver's disk would not allow.

An unreachable server warns once and the run is logged to the local store instead, or, with
`tracking.required`, the run stops with an error. Pure: no Ray; mlflow is imported only when tracking.
"""

from __future__ import annotations

import json
import logging
import os

from pipeline import storage
from pipeline.errors import UserError

log = logging.getLogger(__name__)
MAX_PARAM = 6000  # MLflow's limit on a parameter value's length
BATCH = 100  # params and metrics per log_batch call (MLflow accepts at most 100 params at a time)
_warned: set[str] = set()


def local_store(root: str) -> tuple[str, str]:
    """(tracking URI, artifact root) of the default store beside the runs under `root`."""
    root = os.path.abspath(root)
    return f"sqlite:///{root}/mlflow.db", os.path.join(root, "mlartifacts")


def _client(spec):
    """(MlflowClient, artifact root or None, the URI in use); None when tracking is off or cannot be used."""
    tracking = spec.tracking
    if not tracking.enabled:
        return None
    if tracking.uri is None and storage.is_remote(spec.output.root):
        _warn_once("remote-root", "tracking: output.root is on object storage, which holds no SQLite store; set "
                   "tracking.uri to an MLflow server to track runs (this run is not tracked)")
        return None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server costs seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    if tracking.uri is None:
        uri, artifacts = local_store(spec.output.root)
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")), exist_ok=True)
        return MlflowClient(tracking_uri=uri), artifacts, uri
    client = MlflowClient(tracking_uri=tracking.uri)
    try:
        client.search_experiments(max_results=1)  # is it there?
        return client, None, tracking.uri
    except Exception as exc:  # mlflow raises several types for a server that is not there
        if tracking.required:
            raise UserError(f"tracking.uri {tracking.uri} cannot be reached ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); start the server, fix the URI, or set tracking.required: false "
                            "to fall back to the local store") from None
        uri, artifacts = local_store(spec.output.root) if not storage.is_remote(spec.output.root) else (None, None)
        _warn_once(tracking.uri, f"tracking: {tracking.uri} cannot be reached ({type(exc).__name__}); logging to "
                   f"the local store {uri} instead" if uri else f"tracking: {tracking.uri} cannot be reached")
        return (MlflowClient(tracking_uri=uri), artifacts, uri) if uri else None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _experiment(client, name: str, artifacts: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = os.path.join(artifacts, name) if artifacts else None
    return client.create_experiment(name, artifact_location=location)


def flatten(section: dict, prefix: str = "") -> dict[str, str]:
    """{"train.lr": "0.01", "teacher.0.model": "dcn_v2", ...}: a nested spec dump as MLflow params (a list of
    sections by index, other lists as JSON, values capped)."""
    flat = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # teachers
            for index, item in enumerate(value):
                flat |= flatten(item, f"{name}.{index}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM]
    return flat


def _safely(log_to):
    """A tracking failure (a locked store, a server gone mid-run) warns and leaves the run's results standing;
    with `tracking.required` it is an error."""
    def wrapped(spec, *args):
        try:
            return log_to(spec, *args)
        except UserError:
            raise
        except Exception as exc:  # mlflow and SQLAlchemy raise many types
            if spec.tracking.required:
                raise UserError(f"tracking failed: {type(exc).__name__}: {str(exc)[:300]}") from None
            _warn_once(f"failed-{type(exc).__name__}", f"tracking failed, the run is not tracked: "
                       f"{type(exc).__name__}: {str(exc)[:300]}")
            return None

    wrapped.__doc__, wrapped.__name__ = log_to.__doc__, log_to.__name__
    return wrapped


@_safely
def log_run(spec, metrics: dict) -> str | None:
    """Logs a finished run (metrics.json's content) as an MLflow run in `tracking.experiment` (default: the
    job's name); returns its run id, or None when not tracked."""
    found = _client(spec)
    if found is None:
        return None
    client, artifacts, uri = found
    experiment = _experiment(client, spec.tracking.experiment or spec.name, artifacts)
    label = metrics.get("label", {})
    tags = {"job": spec.name, "spec_hash": metrics.get("spec_hash", ""), "teacher_sha256": label.get("teacher_sha256")
            or "", "train_days": ",".join(metrics.get("train", {}).get("days", [])),
            "eval_days": ",".join(metrics.get("eval", {}).get("days", [])),
            "recommended": metrics.get("selection", {}).get("recommended") or ""}
    run = client.create_run(experiment, run_name=spec.output.run_name or spec.name, tags=tags)
    run_id = run.info.run_id
    _log_params(client, run_id, flatten(spec.model_dump(mode="json")))
    _log_metrics(client, run_id, training_metrics(metrics.get("training", {})) + evaluation_metrics(metrics))
    _log_artifacts(client, run_id, spec.run_dir, metrics)
    for role, search in (metrics.get("search") or {}).items():
        _log_trials(client, experiment, run_id, role, search)
    client.set_terminated(run_id)
    print(f"tracking: MLflow run {run_id} in experiment {spec.tracking.experiment or spec.name!r} at {uri}",
          flush=True)
    return run_id


@_safely
def log_cycle(spec, record: dict, run_dir: str) -> str | None:
    """Logs a nightly cycle's record as a run of the model's experiment (`tracking.experiment`, default: the
    registry model name): the challenger's and champion's metrics and ECE, the decision, the version."""
    found = _client(spec)
    if found is None:
        return None
    client, artifacts, _ = found
    experiment = _experiment(client, spec.tracking.experiment or spec.registry_model_name, artifacts)
    tags = {"decision": record["decision"], "version": record["version"], "teacher_sha256": record["teacher_sha256"],
            "champion_after": record.get("champion_after") or "", "eval_day": record["date"],
            "registry_version": record["version"], "student": record.get("student", "")}
    run = client.create_run(experiment, run_name=record["date"], tags=tags)
    _log_params(client, run.info.run_id, flatten(spec.model_dump(mode="json")))
    values = [(f"{role}.{key}", value, 0) for role in ("challenger", "champion")
              for key, value in _scores(record.get(role) or {}).items()]
    values += [(key, record[key], 0) for key in ("challenger_ece", "champion_ece", "relabelled_rows", "reused_rows")
               if isinstance(record.get(key), (int, float))]
    _log_metrics(client, run.info.run_id, values)
    path = storage.join(run_dir, "cycle.json")
    storage.atomic_write_json(path, record)
    if not storage.is_remote(path):
        client.log_artifact(run.info.run_id, path)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def training_metrics(training: dict) -> list[tuple[str, float, int]]:
    """(name, value, step) of every model's sampled steps (`<role>.step.<loss term>`, lr) and epochs
    (`<role>.epoch.<loss, val_auc, val_log_loss, ...>`)."""
    values = []
    for role, record in training.items():
        for step in record.get("steps") or []:
            values += [(f"{role}.step.{k}", v, step["step"]) for k, v in step.items() if k != "step" and _finite(v)]
        for epoch in record.get("history") or []:
            values += [(f"{role}.epoch.{k}", v, epoch["epoch"]) for k, v in epoch.items()
                       if k != "epoch" and _finite(v)]
    return values


def evaluation_metrics(metrics: dict) -> list[tuple[str, float, int]]:
    """(name, value, 0) of each model's evaluation: `eval.<model>.auc`, log_loss, ece, calibrated ..."""
    return [(f"eval.{name}.{key}", value, 0) for name, model in metrics.get("models", {}).items()
            for key, value in _scores(model).items()]


def _scores(model: dict) -> dict[str, float]:
    scores = {k: model.get(k) for k in ("auc", "gauc", "log_loss", "accuracy", "top5_accuracy", "mean_ctr_pred")}
    scores["ece"] = (model.get("calibration") or {}).get("ece")
    scores["ece_quantile"] = (model.get("calibration_quantile") or {}).get("ece")
    calibrated = model.get("calibrated") or {}
    scores["calibrated_ece"] = (calibrated.get("calibration") or {}).get("ece")
    scores["calibrated_log_loss"] = calibrated.get("log_loss")
    scores["params"] = (model.get("params") or {}).get("total")
    scores["bytes"] = model.get("bytes")
    scores["batch1_p50_ms"] = (model.get("latency") or {}).get("batch1_p50_ms")
    return {k: v for k, v in scores.items() if _finite(v)}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[start:start + BATCH])


def _log_metrics(client, run_id: str, values: list[tuple[str, float, int]]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(name, float(value), now, int(step)) for name, value, step in values]
    for start in range(0, len(items), BATCH * 10):  # up to 1000 metrics a call
        client.log_batch(run_id, metrics=items[start:start + BATCH * 10])


def _log_artifacts(client, run_id: str, run_dir: str, metrics: dict) -> None:
    """The report (md, html, plots), metrics.json and the exported student (model, signature, card)."""
    if storage.is_remote(run_dir):
        return  # the artifacts stay in the run directory on object storage, which the tags point at
    for name in ("report.md", "report.html", "metrics.json"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            client.log_artifact(run_id, path)
    if os.path.isdir(os.path.join(run_dir, "plots")):
        client.log_artifacts(run_id, os.path.join(run_dir, "plots"), artifact_path="plots")
    recommended = (metrics.get("export") or {}).get("recommended")
    exported = os.path.join(run_dir, "export", recommended) if recommended else None
    if exported and os.path.isdir(exported):
        client.log_artifacts(run_id, exported, artifact_path=f"export/{recommended}")


def _log_trials(client, experiment: str, parent: str, role: str, search: dict) -> None:
    """Each teacher-search trial as a child run: its settings, its metric per epoch, its outcome."""
    metric = search.get("metric", "auc")
    for trial in search.get("trials", []):
        outcome = ("best" if trial["trial"] == search.get("best") else "finished" if trial["finished"]
                   else "stopped early" if trial.get("stopped_early") else "failed")
        child = client.create_run(experiment, run_name=f"{role} trial {trial['trial']}",
                                  tags={"mlflow.parentRunId": parent, "outcome": outcome, "teacher": role})
        _log_params(client, child.info.run_id, flatten(trial["config"]))
        values = [(f"val_{k}", v, i + 1) for i, epoch in enumerate(trial.get("epochs") or [])
                  for k, v in epoch.items() if _finite(v)]
        if _finite(trial.get("score")):
            values.append((metric, trial["score"], 0))
        _log_metrics(client, child.info.run_id, values)
        client.set_terminated(child.info.run_id, status="FINISHED" if trial["finished"] else "KILLED")
