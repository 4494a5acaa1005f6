"""Several models in one training call (one read of the data, one fixed cost): the same weights as
separate calls, each model with its own epochs, early stopping and kept epoch."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.models import load_model
from pipeline.spec import parse_spec
from pipeline.stages.students import hard_baseline
from pipeline.stages.teacher import _teacher_model
from pipeline.stages.training import train_on_click_logs
from pipeline.train.driver import check_shared


def _spec(raw: dict, path: str, run_name: str):
    raw = copy.deepcopy(raw)
    raw["data"].update(path=path, validation={"fraction": 0.2},  # one day, one file: rows in a fixed order
                       train_days={"start": "2026-11-01", "end": "2026-11-01"},
                       eval_days={"start": "2026-11-02", "end": "2026-11-02"})
    raw["teacher"].update(dropout=0.3, epochs=3, lr=0.01)  # dropout draws random numbers every step
    raw["student"].update(dropout=0.2)
    raw["train"].update(num_workers=1, cpus_per_worker=1, batch_size=64, zero_stage=0, epochs=2)
    raw["output"]["run_name"] = run_name
    return parse_spec(raw)


@pytest.mark.ray
def test_one_pass_trains_the_same_weights_as_separate_calls(ray_cluster, tiny_spec_dict, click_logs):
    """The teacher (3 epochs) and the hard-label student (2 epochs) trained together equal each trained
    alone with the same seed: same initial weights, same batches, same dropout draws."""
    path = click_logs(days=2, rows=600)
    together = _spec(tiny_spec_dict, path, "together")
    alone = _spec(tiny_spec_dict, path, "alone")

    pair = train_on_click_logs(together, [_teacher_model(together, together.teacher[0]), hard_baseline(together)])
    teacher_alone = train_on_click_logs(alone, [_teacher_model(alone, alone.teacher[0])])["teacher"]
    student_alone = train_on_click_logs(alone, [hard_baseline(alone)])["student_hard"]

    for role, single in (("teacher", teacher_alone), ("student_hard", student_alone)):
        joint, separate = load_model(pair[role])[0].state_dict(), load_model(single)[0].state_dict()
        assert joint.keys() == separate.keys()
        for name in joint:
            torch.testing.assert_close(joint[name], separate[name], rtol=0, atol=1e-6, msg=f"{role} {name}")
    records = {role: json.loads(Path(together.run_dir, "models", f"{role}.json").read_text())
               for role in pair}
    assert [len(records[r]["history"]) for r in ("teacher", "student_hard")] == [3, 2]  # each its own epochs
    assert all(entry["val_rows"] > 0 for r in records.values() for entry in r["history"])
    assert records["teacher"]["history"][0]["rows"] == records["student_hard"]["history"][0]["rows"]
    train_dirs = [p.name for p in Path(together.run_dir, "train").iterdir()]
    assert len(train_dirs) == 1 and train_dirs[0].startswith("teacher+student_hard-")  # one call


def test_models_that_read_batches_differently_cannot_share_a_pass(tiny_spec_dict, click_logs):
    spec = _spec(tiny_spec_dict, click_logs(days=1, rows=50), "shared")
    teacher, student = _teacher_model(spec, spec.teacher[0]).run, hard_baseline(spec).run
    check_shared([teacher, student])  # epochs and lr may differ
    other = dataclasses.replace(student, train=student.train.model_copy(update={"batch_size": 7}))
    with pytest.raises(ValueError, match="batch_size"):
        check_shared([teacher, other])
