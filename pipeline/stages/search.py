"""Teacher search: trials of the teacher on Ray Tune, ranked on the validation split, never the eval days.

Each trial is a Tune trainable that trains through `train_model`, like every other model, on the click
logs' fit rows; a Ray Train callback hands each epoch's validation metrics to Tune, and an ASHA scheduler
stops the weak trials after `grace_epochs`. The best trial's model becomes `models/<role>.pt` (no retrain).
Under `<run_dir>/search/` (`search/<name>/` for an ensemble's teacher): `tune/` (Ray Tune's experiment),
`train/` (each trial's Ray Train run), `trials/<trial id>.pt|.json` (trials that finished), `trials.json`
(every trial) and `best.json`, written last: the settings a later job reuses through
`teacher.search: {reuse: <run_dir>/search/best.json}`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass

from pipeline import storage
from pipeline.report import trials_table
from pipeline.errors import SpecError, UserError
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.spec import JobSpec, TeacherSpec, TrainSpec
from pipeline.spec.search import LIST_FIELDS, TRAIN_FIELDS, SpaceEntry, search_problem
from pipeline.stages.click_logs import bad_rows_located, read_validation, read_window, split_side
from pipeline.stages.training import (click_log_model, fit_inputs, split_fingerprint, teacher_role,
                                      train_on_click_logs)
from pipeline.train import TrainingRun, TrainRequest, train_model

__all__ = ["search_teacher", "search_records", "trials_table"]

# A trial only drives its Ray Train run (the workers hold the CPUs), so it reserves no CPU: a CPU for each
# driver would starve Ray Data's readers on a small machine. Tune needs some resource: a MiB of memory.
_TRIAL_DRIVER = {"memory": 2**20}


@dataclass(frozen=True)
class SearchPlan:
    """What every trial needs besides its settings (handed to the trials by `tune.with_parameters`)."""

    spec: JobSpec
    teacher: TeacherSpec
    role: str  # models/<role>.pt receives the best trial's model
    fingerprint: str  # of the search's inputs: a rerun with the same ones reuses the finished search
    rows: int  # fit rows, for the lr schedule's length
    directory: str  # <run_dir>/search


def search_teacher(spec: JobSpec, teacher: TeacherSpec) -> str:
    """The run's teacher chosen by `teacher.search` (or trained with a finished search's settings)."""
    if problem := search_problem(spec):
        raise SpecError(problem)
    role = teacher_role(spec, teacher)
    if teacher.search.reuse:
        return _train_reused(spec, teacher, role)
    plan = _plan(spec, teacher, role)
    model_path = storage.join(spec.run_dir, "models", f"{role}.pt")
    best_path = storage.join(plan.directory, "best.json")
    if storage.exists(best_path) and storage.read_json(best_path)["fingerprint"] == plan.fingerprint:
        print(f"{role}: reusing the search under {plan.directory} (same spec and inputs)", flush=True)
        return model_path
    trials = collect_trials(_run_tuner(plan), plan)
    storage.atomic_write_json(storage.join(plan.directory, "trials.json"), trials)
    best = next(t for t in trials["trials"] if t["trial"] == trials["best"])
    _publish(plan, best, model_path)
    print(trials_table(trials), flush=True)
    storage.atomic_write_json(best_path, {"fingerprint": plan.fingerprint, "trial": best["trial"],
                                          "metric": trials["metric"], "score": best["score"],
                                          "settings": best["config"], "model": best["model"]})
    return model_path


def _plan(spec: JobSpec, teacher: TeacherSpec, role: str) -> SearchPlan:
    inputs = fit_inputs(spec)
    depends_on = {"teacher": teacher.model_dump(mode="json"), "train": spec.train.model_dump(mode="json"),
                  "features": spec.features.model_dump(mode="json"), "inputs": inputs, **split_fingerprint(spec)}
    fingerprint = hashlib.sha256(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]
    directory = storage.join(spec.run_dir, "search", *([] if role == "teacher" else [teacher.name]))
    return SearchPlan(spec=spec, teacher=teacher, role=role, fingerprint=fingerprint, directory=directory,
                      rows=round(sum(inputs.values()) * (1 - spec.data.held_out_fraction)))


def trial_sections(spec: JobSpec, teacher: TeacherSpec, settings: dict) -> tuple[TeacherSpec, TrainSpec]:
    """The teacher and train sections of one trial: the spec's, with the searched `settings` in place."""
    model_settings = {k: v for k, v in settings.items() if k not in TRAIN_FIELDS}
    searched = TeacherSpec.model_validate(teacher.model_dump() | model_settings | {"search": None})
    train = spec.train.model_copy(update={"epochs": searched.epochs or spec.train.epochs,
                                          "lr": searched.lr or spec.train.lr,
                                          **{k: settings[k] for k in TRAIN_FIELDS if k in settings}})
    return searched, train


def _as_written(spec: JobSpec, teacher: TeacherSpec) -> dict:
    """The searched fields' values in the spec: the first trial, so the search can only improve on it."""
    written = {"lr": teacher.lr or spec.train.lr, **{k: getattr(spec.train, k) for k in TRAIN_FIELDS}}
    return _encoded({k: written[k] if k in written else getattr(teacher, k) for k in teacher.search.space})


def tune_space(space: dict[str, SpaceEntry]) -> dict:
    """The spec's space as Ray Tune's search space (`tune.choice`, `tune.uniform`, ...)."""
    from ray import tune

    def domain(key: str, entry: SpaceEntry):
        if entry.kind == "choice":
            return tune.choice([_encoded({key: v})[key] for v in entry.values])
        if entry.kind == "randint":
            return tune.randint(entry.values[0], entry.values[1] + 1)  # Tune leaves the upper end out
        return getattr(tune, entry.kind)(*entry.values)

    return {key: domain(key, entry) for key, entry in space.items()}


def _encoded(settings: dict) -> dict:
    """List values (layer widths) as JSON text: Tune's preset points cannot hold lists."""
    return {k: json.dumps(list(v)) if k in LIST_FIELDS else v for k, v in settings.items()}


def _decoded(config: dict) -> dict:
    return {k: json.loads(v) if k in LIST_FIELDS else v for k, v in config.items()}


def _run_tuner(plan: SearchPlan):
    """Runs the trials; Tune's ResultGrid."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    search, spec = plan.teacher.search, plan.spec
    # Trials read the spec's relative paths from the job's working directory, like every other stage.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    (storage_path,), storage_filesystem = storage.arrow_paths([plan.directory])
    epochs = plan.teacher.epochs or spec.train.epochs
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable(), plan=plan), _TRIAL_DRIVER),
        param_space=tune_space(search.space),
        tune_config=tune.TuneConfig(
            metric=search.validation_metric(spec.features.task), mode=search.mode, num_samples=search.trials,
            time_budget_s=search.time_budget_s,
            # The limit goes to the generator: Tune ignores TuneConfig.max_concurrent_trials beside one.
            search_alg=BasicVariantGenerator(points_to_evaluate=[_as_written(spec, plan.teacher)],
                                             max_concurrent=_concurrency(spec.train, search.max_concurrent_trials),
                                             random_state=spec.train.seed),
            scheduler=_scheduler(epochs, search.grace_epochs)),
        # Ray Train keeps each trial's checkpoints; Tune saves none (a class trainable would at its end).
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=storage_filesystem,
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False), verbose=1),
    )
    return tuner.fit()


def _scheduler(epochs: int, grace_epochs: int):
    """ASHA on the validation metric, deciding only before a trial's last epoch; FIFO when no epoch is left
    to decide on (grace_epochs = epochs).

    ASHA decides at rungs grace * 4^k up to its max_t, and with max_t = epochs a rung can fall on the last
    epoch: a trial that trained every epoch was stopped there, before it saved its model, and was reported as
    stopped early. With max_t = epochs - 1 the last rung is at most one epoch short of the end, and a trial
    past every rung runs to its end (stop_last_trials=False), where it ends by itself after saving its model.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if grace_epochs >= epochs:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=epochs - 1, grace_period=grace_epochs, stop_last_trials=False)


def _concurrency(train: TrainSpec, wanted: int) -> int:
    """`wanted`, or fewer: the trials whose workers the cluster's CPUs hold, one core left for Ray Data."""
    import ray

    per_trial = train.num_workers * train.cpus_per_worker
    fits = max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // per_trial))
    if fits < wanted:
        print(f"teacher.search: {fits} trial(s) at once, not {wanted}: the cluster's CPUs hold no more", flush=True)
    return min(wanted, fits)


def _trainable():
    """The Tune trainable of a trial: a class, because its `cleanup` runs before Tune drops a stopped trial.

    A trial ASHA stops ends its own Ray Train run there (the controller's abort removes the workers'
    placement group). A function trainable with `ray.tune.integration.ray_train.TuneReportCallback` would
    leave that to Ray Train's detached cleaner, which cannot find the cluster on a machine running several
    local Rays: the group's CPUs stay reserved and the next trial waits for ever.
    """
    import ray
    from ray import tune
    from ray.util.queue import Empty, Queue

    class TeacherTrial(tune.Trainable):
        def setup(self, config: dict, plan: SearchPlan):
            self.reports, self.last, self.controller = Queue(actor_options={"num_cpus": 0}), {}, None
            self.finished = concurrent.futures.Future()
            threading.Thread(target=_train_trial, args=(plan, _decoded(config), self.trial_id, self.reports,
                                                        self.finished), name="trial", daemon=True).start()

        def step(self) -> dict:  # one epoch's metrics, as the Ray Train workers reported them
            while not (self.finished.done() and self.reports.empty()):
                with contextlib.suppress(Empty):
                    self.last, self.controller = self.reports.get(timeout=1)
                    return self.last
            self.finished.result()  # a failed run fails the trial
            return self.last | {"done": True}  # once the model is exported

        def cleanup(self):
            if self.controller is not None and not self.finished.done():
                with contextlib.suppress(Exception):  # the controller exits as it aborts
                    ray.get(self.controller.abort.remote(), timeout=60)

    return TeacherTrial


def _train_trial(plan: SearchPlan, settings: dict, trial: str, reports, finished) -> None:
    """Trains one trial's teacher through `train_model`, like every model; sets `finished` when done."""
    try:
        spec = plan.spec
        teacher, train = trial_sections(spec, plan.teacher, settings)
        features = spec.teacher_features(teacher)  # with its teacher-only columns, if any
        columns = [spec.features.label, *features.input_columns()]
        days = spec.data.fit_days()
        run = TrainingRun(role=f"{plan.role}-{plan.fingerprint}-{trial}", train=train, rows=plan.rows,
                          model=ModelConfig.from_section(teacher, spec.features.out_dim),
                          layout=FeatureLayout.from_spec(features), task=spec.features.task,
                          label=spec.features.label, group=spec.features.group)
        with bad_rows_located(spec, days, columns):
            result = train_model(TrainRequest(
                run=run, dataset=split_side(read_window(spec, days, columns + spec.split_keys), spec, "train"),
                model_path=storage.join(plan.directory, "trials", f"{trial}.pt"), run_dir=plan.directory,
                validation=read_validation(spec, columns), callbacks=(_epoch_reports(reports),)))
        storage.atomic_write_json(storage.join(plan.directory, "trials", f"{trial}.json"),
                                  {k: getattr(result, k) for k in ("model_path", "history", "steps", "restarts",
                                                                   "best_epoch")})
        finished.set_result(None)
    except BaseException as error:  # raised again by the trial's next step
        finished.set_exception(error)


def _epoch_reports(reports):
    """A Ray Train callback (it runs in the run's controller) that hands every epoch's metrics and the
    controller's handle to the trial, the `<role>/` prefix taken off the metric names: the role is the run
    name, which differs per trial, and ASHA compares one name across trials."""
    import ray
    from ray.train import UserCallback

    class EpochReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            plain = {name.rsplit("/", 1)[-1]: value for name, value in metrics[0].items()}  # rank 0's
            reports.put((plain, ray.get_runtime_context().current_actor))

    return EpochReports()


def collect_trials(results, plan: SearchPlan) -> dict:
    """Every trial (settings, per-epoch validation metric, stopped early or not) and the best finished one.

    Raises:
        UserError: no trial finished (all failed, or the time budget ran out first).
    """
    search, spec = plan.teacher.search, plan.spec
    metric = search.validation_metric(spec.features.task)
    trials = sorted((_trial_entry(result, plan, metric) for result in results), key=lambda t: t["trial"])
    finished = [t for t in trials if t["score"] is not None]
    if not finished:
        errors = sorted({t["error"] for t in trials if t["error"]})
        raise UserError(f"teacher.search: no trial finished ({len(trials)} tried): "
                        + ("; ".join(errors) if errors else "raise teacher.search.time_budget_s"))
    sign = -1.0 if search.mode == "min" else 1.0
    best = max(finished, key=lambda t: sign * t["score"])
    return {"fingerprint": plan.fingerprint, "metric": metric, "mode": search.mode,
            "max_epochs": plan.teacher.epochs or spec.train.epochs, "best": best["trial"], "trials": trials}


def _trial_entry(result, plan: SearchPlan, metric: str) -> dict:
    """One trial of Tune's ResultGrid; a trial that finished left its record (history, kept epoch, model)."""
    trial = result.metrics["trial_id"]
    path = storage.join(plan.directory, "trials", f"{trial}.json")
    record = storage.read_json(path) if storage.exists(path) else None
    frame = result.metrics_dataframe  # what Tune received: every epoch reported before a stop
    history = record["history"] if record else ([] if frame is None else frame.to_dict("records"))
    epochs = [{"epoch": int(h["epoch"]), **{k: h[k] for k in (metric, "val_log_loss") if k in h}}
              for h in history if "epoch" in h]
    error = str(result.error).strip().splitlines()[-1] if result.error else None
    return {"trial": trial, "config": _decoded(result.config), "epochs": epochs, "finished": record is not None,
            "stopped_early": record is None and error is None,  # by ASHA, or the time budget
            "best_epoch": record["best_epoch"] if record else None,
            "score": epochs[record["best_epoch"] - 1][metric] if record else None,
            "model": record["model_path"] if record else None, "error": error}


def _publish(plan: SearchPlan, best: dict, model_path: str) -> None:
    """The best trial's model as the run's teacher, beside the training record the report reads."""
    record = storage.read_json(storage.join(plan.directory, "trials", f"{best['trial']}.json"))
    storage.atomic_write_bytes(model_path, storage.read_bytes(best["model"]))
    storage.atomic_write_json(model_path.removesuffix(".pt") + ".json",
                              {"fingerprint": plan.fingerprint, "search_trial": best["trial"],
                               **{k: record[k] for k in ("history", "steps", "restarts", "best_epoch")}})


def _train_reused(spec: JobSpec, teacher: TeacherSpec, role: str) -> str:
    """The teacher trained once, as any teacher, with the settings of a finished search's best.json."""
    path = teacher.search.reuse
    if not storage.exists(path):
        raise UserError(f"teacher.search.reuse {path!r} does not exist; give the best.json of a finished "
                        "search (<run_dir>/search/best.json)")
    settings = storage.read_json(path)["settings"]
    searched, train = trial_sections(spec, teacher, settings)
    planned = click_log_model(spec, role, ModelConfig.from_section(searched, spec.features.out_dim), train,
                              extra={"epochs": searched.epochs, "lr": searched.lr, "settings": settings},
                              features=spec.teacher_features(searched))
    return train_on_click_logs(spec, [planned])[role]


def search_records(spec: JobSpec) -> dict[str, dict]:
    """{teacher role: its `trials.json`} of every teacher the run searched (what metrics.json and the report show)."""
    found = {}
    for teacher in spec.teacher:
        single = len(spec.teacher) == 1
        path = storage.join(spec.run_dir, "search", *([] if single else [teacher.name]), "trials.json")
        if teacher.search and not teacher.search.reuse and storage.exists(path):
            found[teacher_role(spec, teacher)] = storage.read_json(path)
    return found
