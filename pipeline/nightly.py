"""One nightly re-distillation cycle for day D, and the scheduler loop that fires cycles on the cron.

A cycle: label only the window's partitions without valid shards, train a challenger student on the
window (warm-started from the champion), evaluate challenger and champion on day D (held out), export the
challenger (ONNX and the spec's formats, parity-checked on day D, with its MODEL_CARD.md), publish it to the
registry and promote it only when it passes the gate, and write a cycle record. An export that fails parity
publishes nothing. A finished cycle is never redone: rerunning a date returns its record.

With `eval.calibration`, the challenger's calibrator is fitted on the cycle's validation split and folded into
its export; the champion is scored with the calibrator it serves. The record holds both ECEs on day D, so that
calibration drift shows; `schedule.gate.max_ece` refuses a challenger above it, and a kept champion above it
is recalibrated on the validation split (a new version, promoted when better calibrated on D).
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from pipeline import registry, runtime, storage, tracking
from pipeline.calibration import Calibrator
from pipeline.errors import ParityError, UserError
from pipeline.history_page import write_history_page
from pipeline.locks import RunLock
from pipeline.model_card import render_card
from pipeline.models import ModelConfig, load_model
from pipeline.schedule import CycleLock, data_date, due_dates, fire_times
from pipeline.spec import JobSpec
from pipeline.serving import read_signature
from pipeline.stages.click_logs import ensure_click_logs
from pipeline.stages.export import export_checkpoint, parity_rows, registry_files, serving_speed
from pipeline.stages.label import label_days
from pipeline.stages.profile import data_aware_spec
from pipeline.stages.scoring import evaluate_models, fit_calibrators
from pipeline.stages.students import train_challenger
from pipeline.stages.teacher import ensure_teacher

log = logging.getLogger(__name__)
CYCLE_FILE = "cycle.json"  # in a registry version: the record of the night that published it, as decided


def cycle_path(spec: JobSpec, day: dt.date) -> str:
    return storage.join(spec.nightly_dir, "cycles", f"{day.isoformat()}.json")


def finished_days(spec: JobSpec) -> list[dt.date]:
    names = storage.list_dir(storage.join(spec.nightly_dir, "cycles"))
    return sorted(dt.date.fromisoformat(n.removesuffix(".json")) for n in names if n.endswith(".json"))


def cycle_spec(spec: JobSpec, day: dt.date) -> JobSpec:
    """The spec of the cycle for `day`: train on the window before it, evaluate on it."""
    schedule = _schedule(spec)
    window = {"start": day - dt.timedelta(days=schedule.window_days), "end": day - dt.timedelta(days=1)}
    data = spec.data.model_copy(update={
        "train_days": spec.data.train_days.model_validate(window),
        "eval_days": spec.data.eval_days.model_validate({"start": day, "end": day}),
    })
    output = spec.output.model_copy(update={"root": storage.join(spec.nightly_dir, "runs"),
                                            "run_name": day.isoformat()})
    return spec.model_copy(update={"data": data, "output": output})


def run_cycle(spec: JobSpec, day: dt.date) -> dict:
    """Runs (or returns the record of) the cycle that evaluates on `day`."""
    record_path = cycle_path(spec, day)
    if storage.exists(record_path):
        print(f"nightly {day}: already done, nothing to do ({record_path})", flush=True)
        return storage.read_json(record_path) | {"rerun": True}
    started = time.perf_counter()
    cycle = cycle_spec(spec, day)
    runtime.configure_storage(**spec.storage.model_dump())
    storage.check_writable(spec.nightly_dir)  # fail before any work, not after training
    storage.check_writable(spec.schedule.registry, "schedule.registry")
    with RunLock(spec.nightly_dir) as lock:  # one cycle at a time per nightly directory, whoever starts it
        if lock.took_over:  # the dead holder may have died writing to the registry too
            storage.remove_temporary_files(storage.join(spec.schedule.registry, spec.registry_model_name))
        ensure_click_logs(cycle)
        with runtime.ray_session(cycle):
            cycle = data_aware_spec(cycle)  # hash_buckets: auto sized from this window's click logs
            record = _cycle(spec, cycle, day)
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        _apply_retention(spec, day)
        storage.atomic_write_json(record_path, record)  # last: a crashed cycle has no record and reruns
    tracking.log_cycle(spec, record, cycle.run_dir)
    page = write_history_page(spec)
    print(f"nightly {day}: {record['decision']} ({record['reason']}); history: {page}", flush=True)
    return record


def _cycle(spec: JobSpec, cycle: JobSpec, day: dt.date) -> dict:
    schedule = _schedule(spec)
    teacher = _teacher(spec, cycle)
    labelled = label_days(cycle, teacher, storage.join(spec.nightly_dir, "shards"), cycle.data.fit_days())
    model, root = spec.registry_model_name, schedule.registry
    teacher_sha = labelled.shard_set.teacher.checkpoint_sha256
    version = f"{day.isoformat()}-{teacher_sha[:8]}"
    if registry.is_complete(root, model, version) and \
            storage.exists(storage.join(registry.version_dir(root, model, version), CYCLE_FILE)):
        # A run of this night that was killed after publishing: finish what it decided. Training another
        # challenger would ship the first one's files (versions are immutable) under the second one's scores.
        log.warning("nightly %s: version %s was published by a run that did not finish; finishing that run",
                    day, version)
        return _finish_published(cycle, version)
    champion = registry.current(root, model)
    champion_path = storage.join(registry.version_dir(root, model, champion), "model.pt") if champion else None
    warm = champion_path if schedule.warm_start and _same_architecture(champion_path, cycle) else None
    # the better of the distilled and the hard-label student on validation (the distilled one without a split)
    kind, challenger = train_challenger(cycle, labelled.shard_set, init_model=warm)
    checkpoints = {"challenger": challenger, **({"champion": champion_path} if champion_path else {})}
    calibrators = _calibrators(cycle, challenger, registry.version_dir(root, model, champion) if champion else None)
    metrics = evaluate_models(cycle, checkpoints, calibrators=calibrators)
    decision, reason = gate(metrics, schedule.gate.metric, schedule.gate.max_regression, schedule.gate.max_ece)
    lineage = {"teacher": labelled.shard_set.teacher.to_dict(), "eval_day": day.isoformat(),
               "train_days": [d.isoformat() for d in cycle.data.train_days.days()],
               "shards": labelled.shard_set.inputs, "warm_start_from": champion if warm else None,
               "student": kind}
    rows = {day: m.total_rows for m in labelled.shard_set.days for day in m.inputs}  # soft-label rows per day
    record = {"date": day.isoformat(), "relabelled": labelled.relabelled, "reused": labelled.reused,
              "relabelled_rows": sum(rows.get(d, 0) for d in labelled.relabelled),
              "reused_rows": sum(rows.get(d, 0) for d in labelled.reused),
              "teacher_sha256": teacher_sha, "version": version, "champion_before": champion,
              "challenger": metrics["models"]["challenger"], "champion": metrics["models"].get("champion"),
              "student": kind, "challenger_ece": served_ece(metrics["models"]["challenger"]),
              "champion_ece": served_ece(metrics["models"]["champion"]) if champion else None,
              "decision": decision, "reason": reason}
    try:
        files, parity = _export_challenger(cycle, challenger, metrics["models"]["challenger"], lineage,
                                           f"{model} {version}", calibrators.get("challenger"))
    except ParityError as exc:  # nothing is published from an export that does not compute what was evaluated
        return record | {"champion_after": champion, "decision": "rejected", "export": {"error": str(exc)},
                         "reason": f"export parity failed, nothing published: {exc}"}
    # The version carries the night's record as decided: a rerun after a kill finishes it from there.
    registry.publish(root, model, version, {"model.pt": storage.read_bytes(challenger),
                                            "spec.json": _spec_bytes(cycle), **files},
                     {"metrics": metrics["models"]["challenger"], "lineage": lineage, "parity": parity,
                      CYCLE_FILE.removesuffix(".json"): record})
    return _after_publish(cycle, record, lineage, parity)


def _after_publish(cycle: JobSpec, record: dict, lineage: dict, parity: dict) -> dict:
    """What follows the publication of the night's version: its promotion, or the kept champion's recalibration."""
    schedule = _schedule(cycle)
    root, model, champion = schedule.registry, cycle.registry_model_name, record["champion_before"]
    if record["decision"] != "rejected":
        registry.promote(root, model, record["version"], record["reason"])
    elif champion and needs_recalibration(record["champion_ece"], schedule.gate.max_ece, cycle.eval.calibration):
        champion_path = storage.join(registry.version_dir(root, model, champion), "model.pt")
        return record | _recalibrate(cycle, champion, champion_path, record["champion"], record["version"],
                                     lineage, record["reason"], parity)
    return record | {"champion_after": registry.current(root, model), "export": parity}


def _finish_published(cycle: JobSpec, version: str) -> dict:
    """The steps after publishing, for a version a killed run published, from the record it published."""
    directory = registry.version_dir(_schedule(cycle).registry, cycle.registry_model_name, version)
    record, lineage, parity = (storage.read_json(storage.join(directory, name))
                               for name in (CYCLE_FILE, "lineage.json", registry.PARITY))
    return _after_publish(cycle, record, lineage, parity) | {"finished_after_a_kill": True}


def _calibrators(cycle: JobSpec, challenger: str, champion_dir: str | None) -> dict[str, Calibrator]:
    """The challenger's calibrator fitted on the cycle's validation split (`eval.calibration`), and the one the
    champion serves (inside its ONNX export), if any: the champion is scored as it serves."""
    fitted = fit_calibrators(cycle, {"challenger": challenger})
    served = served_calibrator(champion_dir) if champion_dir else None
    return fitted | ({"champion": served} if served else {})


def served_calibrator(version_dir: str) -> Calibrator | None:
    """The calibrator inside a registry version's ONNX export (its signature), if it has one."""
    onnx = storage.join(version_dir, "onnx")
    if not storage.exists(storage.join(onnx, "signature.json")):
        return None
    calibration = read_signature(onnx).calibration
    return Calibrator.from_dict(calibration) if calibration else None


def served_ece(scored: dict) -> float | None:
    """A model's ECE on the day as it serves: after its calibrator when it has one (binary only)."""
    chosen = scored.get("calibrated") or scored
    return chosen.get("calibration", {}).get("ece")


def needs_recalibration(champion_ece: float | None, max_ece: float | None, method: str) -> bool:
    """A kept champion whose calibration drifted above `schedule.gate.max_ece` is recalibrated (with a method)."""
    return method != "none" and max_ece is not None and champion_ece is not None and champion_ece > max_ece


def _recalibrate(cycle: JobSpec, champion: str, champion_path: str, before: dict, version: str, lineage: dict,
                 refused: str, challenger_parity: dict) -> dict:
    """The champion kept, with a calibrator fitted on this cycle's validation split: published as
    `<version>-recalibrated` and promoted when it is better calibrated on the day than what the champion serves
    (`before`: its scores on the day) and no worse in log-loss; the ranking is the champion's own. Returns the
    record's decision fields."""
    root, model = _schedule(cycle).registry, cycle.registry_model_name
    calibrator = fit_calibrators(cycle, {"recalibrated": champion_path})["recalibrated"]
    after = evaluate_models(cycle, {"recalibrated": champion_path},
                            calibrators={"recalibrated": calibrator})["models"]["recalibrated"]
    ece_before, ece_after = served_ece(before), served_ece(after)
    loss_before = (before.get("calibrated") or before)["log_loss"]
    summary = {"fitted_on": calibrator.fitted_on, "calibrator": calibrator.to_dict(), "ece_before": ece_before,
               "ece_after": ece_after, "log_loss_before": loss_before, "log_loss_after": after["calibrated"]["log_loss"]}
    better = ece_after < ece_before and summary["log_loss_after"] <= loss_before
    words = (f"champion {champion} ECE {ece_before:.4f} on the day is above schedule.gate.max_ece "
             f"{_schedule(cycle).gate.max_ece}; recalibrated on validation: ECE {ece_after:.4f}, log-loss "
             f"{loss_before:.4f} -> {summary['log_loss_after']:.4f}")
    out = {"export": challenger_parity, "recalibration": summary, "decision": "rejected"}
    if not better:
        return out | {"champion_after": champion, "reason": f"{refused}; {words}: not better, champion kept as is"}
    recalibrated = f"{version}-recalibrated"
    files, parity = _export_challenger(cycle, champion_path, after, lineage | {"recalibrated_from": champion},
                                       f"{model} {recalibrated}", calibrator, name="recalibrated")
    registry.publish(root, model, recalibrated, {"model.pt": storage.read_bytes(champion_path),
                                                 "spec.json": _spec_bytes(cycle), **files},
                     {"metrics": after, "lineage": lineage | {"recalibrated_from": champion}, "parity": parity})
    registry.promote(root, model, recalibrated, f"recalibrated: {words}")
    return out | {"decision": "recalibrated", "recalibrated_version": recalibrated, "recalibration_export": parity,
                  "champion_after": registry.current(root, model), "reason": f"{refused}; {words}: promoted"}


def _export_challenger(cycle: JobSpec, challenger: str, metrics: dict, lineage: dict, title: str,
                       calibrator: Calibrator | None = None, name: str = "challenger") -> tuple[dict[str, bytes], dict]:
    """The challenger's exports (always ONNX, plus the spec's formats, its calibrator in the graph),
    parity-checked on the evaluation day, as registry files with their parity record and MODEL_CARD.md.
    Raises ParityError."""
    formats = list(dict.fromkeys(["onnx", *cycle.export.formats]))
    cycle = cycle.model_copy(update={"export": cycle.export.model_copy(update={"formats": formats})})
    _, _, layout = load_model(challenger)
    rows = parity_rows(cycle, layout)
    exports = export_checkpoint(cycle, name, "student", challenger, rows, cycle.run_dir, calibrator=calibrator)
    speed = serving_speed(cycle, {name: challenger}, {name: exports}, rows)
    card = render_card(title=title, metrics=metrics, eval_days=[lineage["eval_day"]], exports=exports,
                       serving=speed.get("models", {}).get(name, {}),
                       signature=read_signature(exports["onnx"]["dir"]), lineage=lineage)
    files, parity = registry_files(exports)
    return files | {registry.CARD: card.encode()}, parity


def _teacher(spec: JobSpec, cycle: JobSpec) -> str:
    """The spec's teacher, or one trained on the first cycle's window and kept for every later night."""
    if spec.teacher[0].checkpoint:
        return ensure_teacher(spec)
    kept = storage.join(spec.nightly_dir, "teacher.pt")
    if not storage.exists(kept):
        storage.atomic_write_bytes(kept, storage.read_bytes(ensure_teacher(cycle)))
    return kept


def _same_architecture(model_path: str | None, spec: JobSpec) -> bool:
    """Warm start only from a champion whose architecture the spec's student still has."""
    if model_path is None:
        return False
    same = load_model(model_path)[1] == ModelConfig.from_section(spec.student, spec.features.out_dim)
    if not same:
        log.warning("nightly: the champion's architecture differs from student in the spec: training from scratch")
    return same


def gate(metrics: dict, metric: str, max_regression: float, max_ece: float | None = None) -> tuple[str, str]:
    """Promote when the challenger is no worse than the champion by more than `max_regression` and, with
    `max_ece`, its ECE on the day (as it serves: calibrated when it has a calibrator) is at most `max_ece`."""
    scored = metrics["models"]["challenger"]
    challenger = scored[metric]
    ece = served_ece(scored)
    if max_ece is not None and ece is not None and ece > max_ece:
        return "rejected", f"challenger ECE {ece:.4f} is above schedule.gate.max_ece {max_ece}"
    if "champion" not in metrics["models"]:
        return "promoted", f"first version ({metric} {challenger:.4f}); no champion to compare with"
    champion = metrics["models"]["champion"][metric]
    lower_is_better = metric == "log_loss"
    regression = (challenger - champion) if lower_is_better else (champion - challenger)
    verdict = "promoted" if regression <= max_regression else "rejected"
    return verdict, (f"challenger {metric} {challenger:.4f} vs champion {champion:.4f}: regression "
                     f"{regression:+.4f}, allowed {max_regression:.4f}")


def _apply_retention(spec: JobSpec, day: dt.date) -> None:
    """Drops registry versions beyond `keep_versions` (never CURRENT) and shard days older than `keep_shard_days`."""
    schedule = _schedule(spec)
    model, root = spec.registry_model_name, schedule.registry
    keep = set(registry.list_versions(root, model)[-schedule.keep_versions:]) | {registry.current(root, model)}
    for version in registry.list_versions(root, model):
        if version not in keep:
            storage.remove_tree(registry.version_dir(root, model, version))
    oldest = day - dt.timedelta(days=schedule.keep_shard_days)
    shard_root = storage.join(spec.nightly_dir, "shards")
    for name in storage.list_dir(shard_root):
        if name.startswith("date=") and dt.date.fromisoformat(name[5:]) < oldest:
            storage.remove_tree(storage.join(shard_root, name))


def _spec_bytes(spec: JobSpec) -> bytes:
    return spec.model_dump_json(indent=2).encode()


def _schedule(spec: JobSpec):
    if spec.schedule is None:
        raise UserError(f"the spec {spec.name!r} has no schedule section; add one (see jobs/nightly.yaml)")
    return spec.schedule


def run_scheduler(spec: JobSpec, run_one, *, clock=None, sleep=time.sleep, once: bool = False) -> list[dt.date]:
    """Fires cycles on the spec's cron until stopped: catches up missed days in order (at most
    `max_catch_up`), never runs two cycles at once (an expiring lock), and logs each decision.

    Args:
        run_one: runs the cycle for a date (locally, or by submitting it to a cluster).
        clock, sleep: injectable for tests (a fake clock instead of waiting).
        once: check once and return instead of looping.

    Returns:
        The dates run (when `once`).
    """
    schedule = _schedule(spec)
    clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
    lock = CycleLock(storage.join(spec.nightly_dir, "LOCK"), dt.timedelta(minutes=schedule.lock_ttl_minutes), clock)
    ran = []
    while True:
        done = finished_days(spec)
        due, skipped = due_dates(schedule.cron, schedule.timezone, done[-1] if done else None, clock(),
                                 schedule.max_catch_up)
        if skipped:
            log.warning("schedule: skipping %d missed day(s) %s..%s (max_catch_up %d)",
                        len(skipped), skipped[0], skipped[-1], schedule.max_catch_up)
        for day in due:
            with lock:
                log.info("schedule: running the cycle for %s", day)
                run_one(day)
                ran.append(day)
        if once:
            return ran
        now = clock()
        next_fire = fire_times(schedule.cron, schedule.timezone, now, now + dt.timedelta(days=366))[0]
        log.info("schedule: next cycle at %s", next_fire.isoformat())
        sleep(max(1.0, (next_fire - clock()).total_seconds()))


def plan(spec: JobSpec, start: dt.date, end: dt.date) -> list[tuple[dt.datetime, dt.date]]:
    """What a scheduler running from `start` to `end` would fire: (fire time, date evaluated)."""
    schedule = _schedule(spec)
    tz = dt.timezone.utc
    begin = dt.datetime.combine(start, dt.time(), tzinfo=tz) - dt.timedelta(seconds=1)
    finish = dt.datetime.combine(end, dt.time(23, 59, 59), tzinfo=tz)
    return [(fire, data_date(fire)) for fire in fire_times(schedule.cron, schedule.timezone, begin, finish)]
