"""teacher.search: one test per spec rule, the space as Tune's, the trials table (fast), and on real Ray a
3-trial search where ASHA stops the bad trials after their grace epoch and the best trial is the teacher."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.spec import apply_override, parse_spec
from pipeline.spec.search import TeacherSearchSpec
from pipeline.stages.search import search_records, trial_sections, trials_table, tune_space


@pytest.fixture
def raw(tiny_spec_dict) -> dict:
    raw = copy.deepcopy(tiny_spec_dict)
    raw["data"]["validation"] = {"fraction": 0.2}
    return raw


@pytest.mark.parametrize("search, message", [
    ({"space": {"learning_rate": {"choice": [0.1]}}}, r"teacher.search.space: unknown space key 'learning_rate'"),
    ({"space": {"lr": {"choice": []}}}, r"teacher.search.space.lr: the choice list is empty"),
    ({"space": {"lr": {"loguniform": [1e-2, 1e-4]}}}, r"teacher.search.space.lr: loguniform \[lo, hi\] needs lo < hi"),
    ({"space": {"dropout": {"uniform": [0.2, 0.2]}}}, r"teacher.search.space.dropout: uniform \[lo, hi\] needs lo < hi"),
    ({"space": {"cross_layers": {"randint": [3, 1]}}}, r"teacher.search.space.cross_layers: randint"),
    ({"space": {"lr": {"loguniform": [0, 1e-2]}}}, r"teacher.search.space.lr: loguniform needs lo > 0"),
    ({"space": {"lr": {"normal": [0, 1]}}}, r"teacher.search.space.lr: unknown kind 'normal'"),
    ({"space": {"lr": {"choice": [1], "uniform": [0, 1]}}}, r"teacher.search.space.lr: give exactly one of"),
    ({"space": {"dropout": {"randint": [0, 1]}}}, r"teacher.search.space: dropout takes choice or uniform"),
    ({"space": {"embedding_dim": {"choice": [8, 0]}}}, r"teacher.search.space: embedding_dim 0 is not valid"),
    ({"space": {"model": {"choice": ["mlp"]}}}, r"teacher.search.space: model 'mlp' is not valid"),
    ({"space": {"dropout": {"uniform": [0.0, 1.5]}}}, r"teacher.search.space: dropout 1.5 is not valid"),
    ({"space": {}}, r"teacher.search.space: the space is empty"),
    ({"trials": 0}, r"teacher.search.trials"),
    ({"reuse": "best.json", "trials": 4}, r"teacher.search: search.reuse .* \['trials'\] would not be read"),
])
def test_a_search_spec_is_refused_naming_the_field(raw, search, message):
    raw["teacher"]["search"] = search
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


@pytest.mark.parametrize("override, message", [
    ("data.validation=null", "teacher.search ranks trials on the validation split.*add data.validation"),
    ("teacher.checkpoint=teacher.pt", "teacher.search trains the teacher, teacher.checkpoint gives one"),
    ("teacher.search.grace_epochs=3", "grace_epochs 3 is more than the teacher's 2 epoch"),
    ("teacher.search.metric=accuracy", "metric 'accuracy' does not exist for task 'binary'"),
])
def test_search_rules_across_sections_stop_the_teacher_stage_before_any_training(raw, override, message):
    """A TeacherSpec cannot see data.validation or the epochs: the stage refuses, before Ray starts."""
    from pipeline.stages.teacher import ensure_teacher

    raw["teacher"]["search"] = {"trials": 2}
    apply_override(raw, override)
    with pytest.raises(SpecError, match=message):
        ensure_teacher(parse_spec(raw))


def test_the_default_space_is_valid_and_maps_onto_tune():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = tune_space(TeacherSearchSpec().space)
    assert isinstance(space["model"], Categorical) and space["model"].categories == ["dcn_v2", "deepfm"]
    assert isinstance(space["lr"], Float) and (space["lr"].lower, space["lr"].upper) == (3e-4, 1e-2)
    assert isinstance(space["cross_layers"], Integer) and space["cross_layers"].upper == 5  # [1, 4], both ends
    assert space["hidden"].categories == ["[128, 64]", "[256, 128]", "[512, 256]"]  # lists travel as JSON


def test_a_trial_gets_the_spec_with_its_settings_in_place(raw):
    raw["teacher"]["search"] = {}
    spec = parse_spec(raw)
    teacher, train = trial_sections(spec, spec.teacher[0], {"model": "deepfm", "hidden": [16, 8], "lr": 0.02,
                                                            "weight_decay": 1e-5})
    assert (teacher.model, teacher.hidden, teacher.search) == ("deepfm", [16, 8], None)
    assert (train.lr, train.weight_decay, train.epochs) == (0.02, 1e-5, 2)  # tiny.yaml: teacher epochs 2
    assert teacher.embedding_dim == spec.teacher[0].embedding_dim  # what is not searched is the spec's


def test_the_trials_table_shows_settings_epochs_and_outcome():
    trials = {"metric": "val_auc", "max_epochs": 3, "best": "a_00000", "trials": [
        {"trial": "a_00000", "config": {"lr": 0.003, "hidden": [64, 32]}, "epochs": [{"epoch": 3, "val_auc": 0.7}],
         "finished": True, "stopped_early": False, "score": 0.71234, "error": None},
        {"trial": "a_00001", "config": {"lr": 1e-6, "hidden": [16]}, "epochs": [{"epoch": 1, "val_auc": 0.52}],
         "finished": False, "stopped_early": True, "score": None, "error": None},
        {"trial": "a_00002", "config": {"lr": 0.1, "hidden": [16]}, "epochs": [],
         "finished": False, "stopped_early": False, "score": None, "error": "ValueError: a | b"}]}
    lines = trials_table(trials).splitlines()
    assert lines[0] == "| trial | lr | hidden | epochs | val_auc | outcome |"
    assert lines[2] == "| a_00000 | 0.003 | 64 x 32 | 1 of 3 | 0.7123 | **best** |"
    assert lines[3] == "| a_00001 | 1e-06 | 16 | 1 of 3 | 0.52 | stopped early |"
    assert lines[4] == "| a_00002 | 0.1 | 16 | 0 of 3 |  | failed: ValueError: a \\| b |"


def _decisions(scheduler, runs: dict[str, list[float]]) -> dict[str, list[str]]:
    """The scheduler's answer to each epoch's validation AUC of each trial, the trials' epochs interleaved."""
    from types import SimpleNamespace

    scheduler.set_search_properties("val_auc", "max")
    trials = {name: SimpleNamespace(trial_id=name) for name in runs}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    answers = {name: [] for name in runs}
    for epoch in range(len(next(iter(runs.values())))):
        for name, aucs in runs.items():
            if "STOP" not in answers[name]:
                answers[name].append(scheduler.on_trial_result(None, trials[name], {"epoch": epoch + 1,
                                                                                    "val_auc": aucs[epoch]}))
    return answers


@pytest.mark.parametrize("epochs, grace", [(4, 1), (2, 2), (3, 1)])
def test_a_trial_is_never_stopped_at_its_last_epoch(epochs, grace):
    """ASHA decides at grace * 4^k epochs: a decision at the last epoch would throw away a trained model and
    call the trial stopped early (it did with 4 epochs and grace 1, or grace = epochs). A trial better at the
    first rung and worse at the end trains to its end; one worse at the first rung (before the end) stops."""
    from pipeline.stages.search import _scheduler

    late_loser = [0.71] + [0.72] * (epochs - 2) + [0.75]
    winner = [0.70] + [0.72] * (epochs - 2) + [0.80]
    answers = _decisions(_scheduler(epochs, grace), {"winner": winner, "late_loser": late_loser})
    assert answers["late_loser"] == ["CONTINUE"] * epochs and answers["winner"] == ["CONTINUE"] * epochs
    if grace < epochs:  # ASHA still stops a trial behind at its grace epoch
        early_loser = [0.60] + [0.61] * (epochs - 1)
        answers = _decisions(_scheduler(epochs, grace), {"winner": winner, "early_loser": early_loser})
        assert answers["early_loser"] == ["STOP"] and answers["winner"] == ["CONTINUE"] * epochs


@pytest.mark.ray
def test_asha_stops_the_bad_trials_and_the_best_trial_is_the_teacher(ray_cluster, tiny_spec_dict, click_logs,
                                                                     capsys):
    """The teacher as written (lr 0.01) is the first trial; the two others draw lr from [1e-7, 1e-6] and
    barely move from their random start, so after the grace epoch ASHA stops them. The run's teacher is the
    first trial's model, unretrained; a rerun reuses the finished search, and a later job trains once with
    its best settings."""
    from pipeline.models import load_model
    from pipeline.stages.teacher import ensure_teacher

    tiny_spec_dict["data"].update(path=click_logs(days=3, rows=2000), validation={"days": 1},
                                  train_days={"start": "2026-11-01", "end": "2026-11-02"},
                                  eval_days={"start": "2026-11-03", "end": "2026-11-03"})
    tiny_spec_dict["teacher"].update(embedding_dim=8, hash_buckets=2000, hidden=[32], epochs=3, lr=0.01,
                                     search={"trials": 3, "grace_epochs": 1,
                                             "space": {"lr": {"loguniform": [1e-7, 1e-6]}}})
    tiny_spec_dict["train"].update(num_workers=1, cpus_per_worker=1, batch_size=64, zero_stage=0)
    spec = parse_spec(tiny_spec_dict)

    path = ensure_teacher(spec)

    search = Path(spec.run_dir, "search")
    trials = json.loads((search / "trials.json").read_text())
    first, *others = trials["trials"]
    assert trials["best"] == first["trial"] and first["config"] == {"lr": 0.01}
    assert first["finished"] and [e["epoch"] for e in first["epochs"]] == [1, 2, 3]
    assert all(o["stopped_early"] and len(o["epochs"]) < 3 and 1e-7 <= o["config"]["lr"] <= 1e-6 for o in others)
    assert all(o["epochs"][0]["val_auc"] < first["epochs"][0]["val_auc"] for o in others)
    best = json.loads((search / "best.json").read_text())
    assert best["settings"] == {"lr": 0.01} and best["score"] == first["score"]
    assert path == f"{spec.run_dir}/models/teacher.pt"
    assert Path(path).read_bytes() == Path(first["model"]).read_bytes()  # the trial's model, not retrained
    load_model(path)
    assert "**best**" in capsys.readouterr().out
    assert search_records(spec) == {"teacher": trials}  # what metrics.json and the report carry

    started = time.perf_counter()
    assert ensure_teacher(spec) == path
    assert "reusing the search" in capsys.readouterr().out and time.perf_counter() - started < 5

    tiny_spec_dict["teacher"]["search"] = {"reuse": str(search / "best.json")}  # a later job: no search
    tiny_spec_dict["output"]["run_name"] = "reused"
    reused = parse_spec(tiny_spec_dict)
    ensure_teacher(reused)
    record = json.loads(Path(reused.run_dir, "models", "teacher.json").read_text())
    assert len(record["history"]) == 3 and not Path(reused.run_dir, "search").exists()
    assert record["steps"][0]["lr"] == pytest.approx(0.01)  # the best trial's lr (a constant schedule)
    assert load_model(f"{reused.run_dir}/models/teacher.pt")[1] == load_model(path)[1]
