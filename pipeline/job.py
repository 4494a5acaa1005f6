"""One distillation run, stage by stage: data -> teacher -> soft labels -> students -> evaluation.

Each stage reads the previous stage's outputs and skips itself when its own outputs are already
there and were made from the same inputs, so rerunning a finished or crashed job redoes only what
is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import evaluate, report, shards, storage
from pipeline.data import clicklogs
from pipeline.errors import UserError
from pipeline.label import bad_rows_located, map_with_teachers, run_label_stage
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)
STUDENTS = ("student_distilled", "student_hard")


def run_job(spec: JobSpec) -> dict:
    """Runs the whole job described by `spec`; returns the metrics also written to `<run>/metrics.json`."""
    started = time.perf_counter()
    storage.configure(**spec.storage.model_dump())  # first: every stage may read or write s3:// paths
    storage.check_writable(spec.run_dir)  # a read-only or full output fails now, not after training
    with _stage(1, "click logs"):
        ensure_click_logs(spec)
        check_inputs(spec)
    with ray_session(spec):
        with _stage(2, "teacher" if len(spec.teacher) == 1 else f"teacher ensemble of {len(spec.teacher)}"):
            teachers = ensure_teachers(spec)
        with _stage(3, "label: teacher actor pool -> soft-label shards"):
            shard_dir = storage.join(spec.run_dir, "shards")
            manifest = run_label_stage(spec, teachers, shard_dir)
        with _stage(4, "students: distilled (KD loss) and hard-label baseline"):
            students = {role: train_student(spec, manifest, role) for role in STUDENTS}
        with _stage(5, "evaluate on held-out days"):
            metrics = evaluate_run(spec, teachers, students, manifest)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    storage.atomic_write_json(storage.join(spec.run_dir, "metrics.json"), metrics)
    report.write_report(spec.run_dir, metrics)
    return metrics


@contextlib.contextmanager
def ray_session(spec: JobSpec):
    """Joins `ray.address` or starts a local Ray (dashboard on loopback); shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Workers are other processes: hand them the S3 endpoint, region and profile (never credentials: those
    # come from the environment they inherit locally, or the cluster's IAM role).
    runtime_env = {"env_vars": storage.worker_env()} if storage.worker_env() else None
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")  # a spec's address, or the job server's
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        store = spec.ray.object_store_memory_mb
        start_local_ray(num_cpus=spec.ray.num_cpus, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                        runtime_env=runtime_env, object_store_memory=store * 2**20 if store else None)
    limit_data_memory(spec)
    try:
        yield
    finally:
        ray.shutdown()


def start_local_ray(attempts: int = 3, **options) -> None:
    """`ray.init` for a new local Ray, tried again when its node times out starting (a busy machine)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**options)
            return
        except Exception as exc:  # Ray raises a bare Exception for a node start-up timeout
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            log.warning("local Ray did not start in time (attempt %d of %d); trying again", attempt, attempts)
            ray.shutdown()
            time.sleep(5 * attempt)


def limit_data_memory(spec: JobSpec) -> None:
    """Caps the object store Ray Data fills with in-flight blocks: its streaming executor then applies
    back-pressure (reads wait for the teacher and the writer), so memory stays flat as the log grows.
    Blocks shrink with the cap, or a few default-sized blocks would overflow it and spill to disk."""
    if spec.ray.data_memory_limit_mb:
        from ray.data import DataContext

        context = DataContext.get_current()
        limit = spec.ray.data_memory_limit_mb * 2**20
        options = context.execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=limit)
        context.target_max_block_size = max(2**20, limit // 8)


@contextlib.contextmanager
def _stage(number: int, title: str):
    print(f"\n{'=' * 72}\n[stage {number}/5] {title}\n{'=' * 72}", flush=True)
    started = time.perf_counter()
    yield
    print(f"[stage {number}/5] done in {time.perf_counter() - started:.1f}s", flush=True)


def ensure_click_logs(spec: JobSpec) -> None:
    """For `data.source: synthetic`, generates the spec's days when they are not on disk yet."""
    if spec.data.source != "synthetic":
        return
    present = clicklogs.available_days(spec.data.path) if storage.exists(spec.data.path) else {}
    missing = [d for d in spec.data.all_days() if d not in present]
    if missing:
        generate(spec, missing)  # only what is missing: existing partitions keep their fingerprints


def check_inputs(spec: JobSpec) -> None:
    """Fails before Ray starts when a selected day, a needed column or a file is missing, unreadable or of
    the wrong type (footers only: no data is read here)."""
    from pipeline.data import validate

    needed = [spec.features.label, spec.features.group, *spec.features.input_columns()]
    for days, extra in ((spec.data.train_days.days(), [spec.features.id]), (spec.data.eval_days.days(), [])):
        paths = clicklogs.partition_paths(spec.data.location, days)
        validate.check_partitions(paths, spec.features, [c for c in needed + extra if c])


def generate(spec: JobSpec, days: list | None = None) -> list[str]:
    """Writes the synthetic click log for `days` (default: every train and eval day of the spec)."""
    from pipeline.data.synthetic import generate_click_logs

    if storage.is_remote(spec.data.path):
        raise UserError(f"the synthetic generator writes local paths only, not {spec.data.path!r}; generate to a "
                        "local data.path, upload it (e.g. `aws s3 cp --recursive`), then use data.source: parquet")
    synthetic = spec.data.synthetic
    paths = []
    for day in days or spec.data.all_days():  # a date's data does not depend on the other days
        paths += generate_click_logs(
            spec.data.path, start_date=day, days=1, rows_per_day=synthetic.rows_per_day, users=synthetic.users,
            items=synthetic.items, categories=synthetic.categories, seq_len=synthetic.seq_len,
            seed=synthetic.seed, drift=synthetic.drift,
        )
    print(f"generated {len(paths)} days x {synthetic.rows_per_day:,} rows under {spec.data.path}", flush=True)
    return paths


def ensure_teachers(spec: JobSpec) -> dict[str, str]:
    """{teacher name: checkpoint} for every teacher of the spec (one, or an ensemble)."""
    return {t.name: ensure_teacher(spec, t) for t in spec.teacher}


def ensure_teacher(spec: JobSpec, teacher=None) -> str:
    """A teacher checkpoint: the spec's, or one trained here on hard labels (same loop as students)."""
    teacher = teacher or spec.teacher[0]
    if teacher.checkpoint:
        if not storage.exists(teacher.checkpoint):
            raise UserError(f"teacher.checkpoint {teacher.checkpoint!r} does not exist; fix the path or "
                            "remove the field to train a teacher")
        return teacher.checkpoint
    config = model_config(teacher, spec)
    columns = [spec.features.label] + spec.features.input_columns()
    inputs = {d.isoformat(): clicklogs.count_rows([p])
              for d, p in clicklogs.partition_paths(spec.data.location, spec.data.train_days.days()).items()}
    depends_on = {"model": config, "train": spec.train.model_dump(), "inputs": inputs,
                  "epochs": teacher.epochs, "lr": teacher.lr}
    role = "teacher" if len(spec.teacher) == 1 else f"teacher_{teacher.name}"
    days = spec.data.train_days.days()
    with bad_rows_located(spec, days, columns):  # bad rows are dropped here, and quarantined by the label stage
        return _train_once(
            spec, role, config, depends_on, rows=sum(inputs.values()),
            dataset=lambda: clicklogs.read_click_logs(spec.data.location, days, columns, **_row_checks(spec)),
            distill=None, epochs=teacher.epochs or spec.train.epochs, lr=teacher.lr or spec.train.lr,
        )


def _row_checks(spec: JobSpec) -> dict:
    from pipeline.data.validate import RowRules

    return {"rules": RowRules.from_spec(spec), "fail": spec.data.on_bad_rows == "fail"}


def train_student(spec: JobSpec, manifest: dict, role: str, init_model: str | None = None) -> str:
    """Trains a student on the soft-label shards: with the distillation losses, or on hard labels only;
    from `init_model`'s weights when given (warm start)."""
    from pipeline.train import read_shards, soft_label_targets, target_columns

    config = model_config(spec.student, spec)
    distill = spec.distill.model_dump() if role == "student_distilled" else None
    targets = soft_label_targets(spec, manifest.get("hidden_dim"))
    depends_on = {"model": config, "train": spec.train.model_dump(), "distill": distill,
                  "teacher": manifest["teacher"]["checkpoint_sha256"], "inputs": manifest["inputs"],
                  "init_model": init_model}
    files, filesystem = storage.arrow_paths([s["path"] for s in manifest["shards"]])
    wanted = [spec.features.label, spec.features.group, *spec.features.input_columns()]
    wanted += target_columns(targets) if distill else []
    columns = [c for c in dict.fromkeys(wanted) if c and c in manifest["columns"]]
    return _train_once(
        spec, role, config, depends_on, rows=manifest["total_rows"],
        dataset=lambda: read_shards(files, filesystem, columns),
        distill=distill, epochs=spec.train.epochs, lr=spec.train.lr, init_model=init_model, targets=targets,
    )


def _train_once(spec: JobSpec, role: str, model_config: dict, depends_on: dict, *, rows: int, dataset, distill,
                epochs: int, lr: float, init_model: str | None = None, targets: dict | None = None) -> str:
    """Trains unless `models/<role>.pt` exists for the same inputs; a crashed run resumes by name."""
    from pipeline.train import train_model

    fingerprint = hashlib.sha256(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model_path = storage.join(spec.run_dir, "models", f"{role}.pt")
    record_path = storage.join(spec.run_dir, "models", f"{role}.json")
    if storage.exists(model_path) and storage.exists(record_path):
        record = storage.read_json(record_path)
        if record["fingerprint"] == fingerprint:
            print(f"{role}: reusing {model_path} (same spec and inputs)", flush=True)
            return model_path
    result = train_model(role=f"{role}-{fingerprint}", spec=spec, model_config=model_config, dataset=dataset(),
                         rows=rows, distill=distill, epochs=epochs, lr=lr, model_path=model_path,
                         init_model=init_model, targets=targets)
    for epoch in result.history:
        print(f"{role}: epoch {epoch['epoch']} loss {epoch['loss']:.4f} ({epoch['rows_per_s']:,.0f} rows/s)")
    if result.restarts:
        print(f"{role}: resumed from a checkpoint {result.restarts} time(s)", flush=True)
    storage.atomic_write_json(record_path, {"fingerprint": fingerprint, "history": result.history,
                                            "steps": result.steps, "restarts": result.restarts})
    return model_path


def model_config(section, spec: JobSpec) -> dict:
    """The plain-dict model description `build_model` takes, from a teacher or student section."""
    keys = ("model", "factory", "factory_args", "embedding_dim", "hash_buckets", "hidden", "cross_layers",
            "sequence_pooling", "attention_heads", "transformer_layers", "dropout")
    return {k: getattr(section, k) for k in keys} | {"out_dim": spec.features.num_classes or 1}


def evaluate_models(spec: JobSpec, checkpoints: dict[str, str], combine: dict | None = None,
                    roles: dict[str, str] | None = None) -> dict:
    """Scores every model on the eval days in one actor-pool pass; returns {"eval": ..., "models": ...}.

    Args:
        combine: {"column": name, "weights": {member: weight}} adds an ensemble scored by the
            weighted mean of its members' logits.
        roles: {model name: "teacher" | "distilled" | "hard" | "ensemble_member"}; agreement with the
            teacher is reported for every model that is not a teacher.
    """
    roles = roles or {}
    columns = _eval_columns(spec)
    days = spec.data.eval_days.days()
    dataset = clicklogs.read_click_logs(spec.data.location, days, columns, **_row_checks(spec))
    keep = [c for c in (spec.features.label, spec.features.group, spec.eval.slice_by, "true_ctr") if c in columns]
    keep = list(dict.fromkeys(keep))
    predictor = {"checkpoints": dict(checkpoints), "keep_columns": keep, "combine": combine}
    scored = map_with_teachers(dataset, spec, predictor)
    with bad_rows_located(spec, days, columns):
        table = pa.concat_tables(list(scored.iter_batches(batch_format="pyarrow", batch_size=None)))

    labels = table.column(spec.features.label).to_numpy()
    groups = table.column(spec.features.group).to_numpy() if spec.features.group else None
    slices = table.column(spec.eval.slice_by).to_numpy() if spec.eval.slice_by else None
    logits = {name: _logits(table.column(name)) for name in [*checkpoints, *([combine["column"]] if combine else [])]}
    teacher = logits.get("teacher")
    sample = _latency_sample(spec)
    models = {}
    for name, path in checkpoints.items():
        role = roles.get(name, "student")
        models[name] = _score(spec, labels, logits[name], groups, slices,
                              None if role in ("teacher", "ensemble_member") else teacher)
        models[name] |= {"role": role, **_describe_model(spec, path, sample)}
    if combine:
        members = [models[m] for m in combine["weights"]]
        models[combine["column"]] = _score(spec, labels, logits[combine["column"]], groups, slices, None) | {
            "role": "teacher", "family": "ensemble", "checkpoint": None,
            "params": {k: sum(m["params"][k] for m in members) for k in ("total", "embedding", "dense")},
            "bytes": sum(m["bytes"] for m in members),
            "latency": _ensemble_latency([m["latency"] for m in members]),
        }
    binary = spec.features.task == "binary"
    ceiling = evaluate.auc(labels, table.column("true_ctr").to_numpy()) if binary and "true_ctr" in keep else None
    return {"eval": {"days": [d.isoformat() for d in spec.data.eval_days.days()], "rows": table.num_rows,
                     "click_rate": float(np.mean(labels)) if spec.features.task == "binary" else None,
                     "ceiling_auc": ceiling, "slice_by": spec.eval.slice_by},
            "models": models, "summary": evaluate.summarize(models)}


def _logits(column: pa.ChunkedArray) -> np.ndarray:
    """A logit column: (N,) floats, or (N, C) from a fixed-size-list column (multiclass)."""
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        return pc.list_flatten(column).to_numpy().reshape(-1, width)
    return column.to_numpy()


def _score(spec: JobSpec, labels, logits, groups, slices, teacher_logits) -> dict:
    return evaluate.score_model(labels, logits, groups, teacher_logits=teacher_logits, slice_values=slices,
                                bins=spec.eval.calibration_bins, max_slices=spec.eval.max_slices,
                                task=spec.features.task)


def _latency_sample(spec: JobSpec):
    """Up to `eval.batch_size` (at most 4096) rows of the first eval day, for latency and throughput."""
    paths = list(clicklogs.partition_paths(spec.data.location, spec.data.eval_days.days()[:1]).values())
    return clicklogs.partition_dataset(paths).head(min(spec.eval.batch_size, 4096),
                                                   columns=spec.features.input_columns())


def _describe_model(spec: JobSpec, path: str, sample: pa.Table) -> dict:
    """Family, parameter counts, serialized bytes and CPU latency of one saved model."""
    from pipeline.features import table_to_inputs
    from pipeline.models import count_parameters, load_model
    from pipeline.models.registry import model_bytes

    model, config, layout = load_model(path)
    batch = table_to_inputs(sample, layout)
    one_row = {k: v[:1] for k, v in batch.items()}
    return {"family": config["model"], "params": count_parameters(model), "bytes": len(model_bytes(model)),
            "latency": evaluate.measure_latency(model, one_row, batch, runs=spec.eval.latency_runs),
            "checkpoint": path}


def _ensemble_latency(members: list[dict]) -> dict:
    """An ensemble runs every member: latencies add up, throughput combines harmonically."""
    return {"batch1_p50_ms": sum(m["batch1_p50_ms"] for m in members),
            "batch1_p99_ms": sum(m["batch1_p99_ms"] for m in members),
            "batched_rows_per_s": 1 / sum(1 / m["batched_rows_per_s"] for m in members),
            "batch_size": members[0]["batch_size"], "threads": members[0]["threads"]}


def evaluate_run(spec: JobSpec, teachers: dict[str, str], students: dict[str, str], manifest: dict) -> dict:
    """The run's metrics: every model on the eval days, plus what was trained and labelled."""
    if len(teachers) == 1:
        checkpoints, combine = {"teacher": next(iter(teachers.values()))}, None
    else:
        checkpoints = {f"teacher_{name}": path for name, path in teachers.items()}
        weights = {m["name"]: m["weight"] for m in manifest["teacher"]["members"]}
        combine = {"column": "teacher", "weights": {f"teacher_{n}": weights[n] for n in teachers}}
    return {
        "job": spec.name,
        "spec_hash": spec.fingerprint(),
        "task": spec.features.task,
        "train": {"days": [d.isoformat() for d in spec.data.train_days.days()]},
        "label": {"total_rows": manifest["total_rows"], "shards": len(manifest["shards"]),
                  "input_rows": manifest["input_rows"], "quarantined_rows": manifest.get("quarantined_rows", 0),
                  "status": "reused" if manifest.get("reused") else "labelled",
                  "relabelled_days": manifest.get("relabelled", []),
                  "teacher_sha256": manifest["teacher"]["checkpoint_sha256"],
                  "teachers": [{k: m[k] for k in ("name", "model", "checkpoint_sha256", "weight")}
                               for m in manifest["teacher"]["members"]]},
        **evaluate_models(spec, checkpoints | students, combine, roles=_roles(checkpoints, students)),
        "training": _training_records(spec),
    }


def _roles(teachers: dict[str, str], students: dict[str, str]) -> dict[str, str]:
    roles = {name: "teacher" if name == "teacher" else "ensemble_member" for name in teachers}
    return roles | {name: "distilled" if name == "student_distilled" else "hard" for name in students}


def _training_records(spec: JobSpec) -> dict:
    """Per-role training history, sampled steps and restarts, from `models/<role>.json`."""
    records = {}
    for path in storage.list_files(storage.join(spec.run_dir, "models"), suffix=".json"):
        role = path.rsplit("/", 1)[-1].removesuffix(".json")
        record = storage.read_json(path)
        records[role] = {k: record.get(k) for k in ("history", "steps", "restarts")}
    return records


def _eval_columns(spec: JobSpec) -> list[str]:
    """Label, group, inputs, and `true_ctr` when the log has it (ceiling only, never a feature)."""
    paths = list(clicklogs.partition_paths(spec.data.location, spec.data.eval_days.days()).values())
    present = clicklogs.partition_dataset(paths).schema.names
    wanted = [spec.features.label, spec.features.group, *spec.features.input_columns()]
    if "true_ctr" in present:
        wanted.append("true_ctr")
    return list(dict.fromkeys(c for c in wanted if c))
