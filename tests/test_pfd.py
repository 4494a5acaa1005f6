"""Privileged-feature distillation: teacher-only columns in the spec, the synthetic privileged signal, the
data check, and one PFD job end to end on real Ray (an ensemble mixing a privileged and a plain teacher)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.data.synthetic import PRIVILEGED_COLUMN, generate_click_logs
from pipeline.errors import DataError, SpecError
from pipeline.features import FeatureLayout
from pipeline.job import _checkpoints, run_job
from pipeline.models import ModelConfig, build_model, load_model, save_model
from pipeline.spec import parse_spec
from pipeline.stages.click_logs import check_inputs, ensure_click_logs
from pipeline.stages.label import TeacherPredictor, label_columns

HINT = {"dense": [PRIVILEGED_COLUMN]}


def _privileged(raw: dict, teacher: dict | None = None) -> dict:
    raw["data"]["synthetic"]["privileged"] = True
    raw["teacher"]["extra_features"] = teacher or HINT
    return raw


def _error(raw: dict, match: str) -> str:
    with pytest.raises(SpecError, match=match) as info:
        parse_spec(raw)
    return str(info.value)


def test_the_teacher_reads_its_extra_columns_and_the_student_does_not(tiny_spec_dict):
    spec = parse_spec(_privileged(tiny_spec_dict, {"dense": [PRIVILEGED_COLUMN], "categorical": ["slot_id"]}))
    teacher = FeatureLayout.from_spec(spec.teacher_features(spec.teacher[0]))
    student = FeatureLayout.from_spec(spec.features)
    assert teacher.dense == (*student.dense, PRIVILEGED_COLUMN)  # appended: the student's fields keep their places
    assert teacher.categorical == (*student.categorical, "slot_id") and teacher.sequence == student.sequence
    assert spec.teacher_only_columns == ["slot_id", PRIVILEGED_COLUMN]  # categorical, dense, sequence
    assert PRIVILEGED_COLUMN not in label_columns(spec) and "slot_id" not in label_columns(spec)


def test_a_student_feature_listed_as_teacher_only_is_a_spec_error_naming_both_fields(tiny_spec_dict):
    message = _error(_privileged(tiny_spec_dict, {"dense": ["price"]}), r"teacher\.extra_features\.dense: 'price'")
    assert "student feature (features.dense)" in message and "remove it from one" in message


def test_teacher_only_rules_name_the_teacher_of_an_ensemble(tiny_spec_dict):
    plain = dict(tiny_spec_dict["teacher"], name="plain")
    tiny_spec_dict["teacher"] = [plain, dict(plain, name="pfd", extra_features={"categorical": ["item_id"]})]
    _error(tiny_spec_dict, r"teacher\[1\]\.extra_features\.categorical: 'item_id' is a student feature "
                           r"\(features\.categorical\)")


@pytest.mark.parametrize("extra, match", [
    ({"dense": ["clicked"]}, r"teacher\.extra_features\.dense: 'clicked' is the label"),
    ({"dense": ["hint", "hint"]}, r"teacher\.extra_features\.dense: 'hint' is listed twice"),
    ({"dense": ["hint"], "categorical": ["hint"]}, r"'hint' is also listed in teacher\.extra_features\.categorical"),
    ({"sequence": {"column": "clicks_2", "embedding_of": "item_id"}},
     r"teacher\.extra_features\.sequence: features\.sequence is set"),
    ({"desne": ["hint"]}, r"teacher\.extra_features\.desne: unknown key; did you mean 'dense'"),
])
def test_teacher_only_rules(tiny_spec_dict, extra, match):
    _error(_privileged(tiny_spec_dict, extra), match)


def test_a_teacher_only_sequence_shares_a_table_of_the_teacher(tiny_spec_dict):
    sequence = tiny_spec_dict["features"].pop("sequence")
    spec = parse_spec(_privileged(tiny_spec_dict, {"sequence": sequence}))
    assert spec.features.sequence is None and spec.teacher_features(spec.teacher[0]).sequence.column == "hist_item_ids"
    _error(_privileged(tiny_spec_dict, {"sequence": sequence | {"embedding_of": "shop_id"}}),
           r"teacher\.extra_features\.sequence\.embedding_of 'shop_id' is not a categorical column of this teacher")


def test_the_privileged_column_is_a_noisy_view_of_the_affinity_and_changes_nothing_else(tmp_path):
    args = dict(start_date=dt.date(2026, 11, 1), days=1, rows_per_day=3000, users=300, items=1000, categories=10,
                seq_len=5, seed=2)
    (plain_day,), (day,) = (generate_click_logs(str(tmp_path / name), privileged=name == "pfd", **args)
                            for name in ("plain", "pfd"))
    plain, table = pq.read_table(f"{plain_day}/part-00000.parquet"), pq.read_table(f"{day}/part-00000.parquet")
    assert PRIVILEGED_COLUMN not in plain.column_names and table.drop_columns([PRIVILEGED_COLUMN]).equals(plain)
    assert table.schema.field(PRIVILEGED_COLUMN).type == pa.float32()
    # it drives clicks through the hidden logit: correlated with the true CTR's logit, and not a copy of it
    ctr = table.column("true_ctr").to_numpy().astype(np.float64)
    corr = np.corrcoef(table.column(PRIVILEGED_COLUMN).to_numpy(), np.log(ctr / (1 - ctr)))[0, 1]
    assert 0.3 < corr < 0.9, corr


def test_the_privileged_flag_changes_what_is_generated_for_cached_days(tiny_spec_dict):
    tiny_spec_dict["data"]["synthetic"]["rows_per_day"] = 200
    ensure_click_logs(parse_spec(tiny_spec_dict))
    first = f"{tiny_spec_dict['data']['path']}/date=2026-11-01/part-00000.parquet"
    assert PRIVILEGED_COLUMN not in pq.read_schema(first).names
    ensure_click_logs(parse_spec(_privileged(tiny_spec_dict)))  # same days on disk, the other setting
    assert PRIVILEGED_COLUMN in pq.read_schema(first).names


def test_a_teacher_only_column_the_log_lacks_names_the_column_and_the_teacher(tiny_spec_dict, click_logs):
    tiny_spec_dict["data"].update(source="parquet", path=click_logs(days=3, rows=200))  # written without it
    tiny_spec_dict["teacher"]["extra_features"] = HINT
    with pytest.raises(DataError, match=rf"teacher 'teacher' reads the teacher-only column '{PRIVILEGED_COLUMN}' "
                                        r"\(extra_features\), which '.*date=2026-11-01/part-00000.parquet' \(and 1 "
                                        r"more file\(s\)\) lacks"):
        check_inputs(parse_spec(tiny_spec_dict))


def test_the_predictor_gives_each_model_its_own_inputs_and_keeps_only_the_student_columns(tiny_spec_dict, tmp_path):
    spec = parse_spec(_privileged(tiny_spec_dict))
    (day,) = generate_click_logs(spec.data.path, start_date=dt.date(2026, 11, 1), days=1, rows_per_day=300,
                                 users=300, items=1000, categories=10, seq_len=5, privileged=True)
    config = ModelConfig(model="dcn_v2", embedding_dim=4, hash_buckets=64, hidden=(8,), cross_layers=1)
    paths = {}
    for column, features in (("teacher_logit", spec.teacher_features(spec.teacher[0])), ("student", spec.features)):
        layout = FeatureLayout.from_spec(features)
        paths[column] = str(tmp_path / f"{column}.pt")
        save_model(paths[column], build_model(config, layout), config, layout)
    batch = pq.read_table(f"{day}/part-00000.parquet")
    out = TeacherPredictor(paths, keep_columns=label_columns(spec))(batch)
    assert out.column_names == [*label_columns(spec), "teacher_logit", "student"]


def test_a_privileged_teacher_is_left_out_of_the_serving_table(tiny_spec_dict, capsys):
    metrics = {"models": {"teacher": {"checkpoint": "t.pt"}, "student_hard": {"checkpoint": "h.pt"}}}
    assert set(_checkpoints(parse_spec(tiny_spec_dict), metrics)) == {"teacher", "student_hard"}
    assert set(_checkpoints(parse_spec(_privileged(tiny_spec_dict)), metrics)) == {"student_hard"}
    assert f"teacher-only columns ['{PRIVILEGED_COLUMN}']" in capsys.readouterr().out


@pytest.mark.e2e
def test_a_pfd_ensemble_job_end_to_end(ray_cluster, tiny_spec_dict):
    """One small run: a privileged and a plain teacher (an ensemble may mix them), the gate on validation."""
    raw = _privileged(tiny_spec_dict)
    plain = {k: v for k, v in raw["teacher"].items() if k != "extra_features"}
    raw["teacher"] = [dict(plain, name="plain"), dict(plain, name="pfd", extra_features=HINT)]
    raw["data"]["validation"] = {"fraction": 0.1}
    raw["distill"]["on_weak_teacher"] = "warn"  # a tiny log: the run is checked, not the teacher's lead
    raw["train"].update(num_workers=1, cpus_per_worker=1, zero_stage=0)
    spec = parse_spec(raw)
    metrics = run_job(spec)

    # the teachers' own inputs: the privileged one trained in a pass of its own, on its extra column
    layouts = {name: load_model(storage.join(spec.run_dir, "models", f"{name}.pt"))[2]
               for name in ("teacher_pfd", "teacher_plain", "student_hard", "student_distilled")}
    assert PRIVILEGED_COLUMN in layouts["teacher_pfd"].dense
    assert all(PRIVILEGED_COLUMN not in layout.dense for name, layout in layouts.items() if name != "teacher_pfd")
    assert storage.exists(storage.join(spec.run_dir, "models", "teacher_pfd.json"))

    # the shards carry the student's columns and the teachers' outputs, never the teacher-only column
    files = [f for d in spec.data.train_days.days() for f in storage.list_files(
        storage.join(spec.run_dir, "shards", f"date={d.isoformat()}", "data"))]
    schema = pads.dataset(files, format="parquet").schema
    assert schema.names == [*label_columns(spec), "teacher_logit__plain", "teacher_logit__pfd", "teacher_logit"]
    assert pads.dataset(files, format="parquet").count_rows() == 2 * spec.data.synthetic.rows_per_day

    # scored on the eval days with its extra column; the hint is worth AUC even on a tiny log
    models = metrics["models"]
    assert models["teacher_pfd"]["auc"] > models["teacher_plain"]["auc"], models
    assert metrics["selection"]["gate"]["rows"] > 0 and models["student_distilled"]["auc"] > 0.55

    # the privileged teacher still exports: its signature lists the extra input
    from pipeline.serving import read_signature
    from pipeline.stages.export import export_finished_run

    exported = export_finished_run(spec.run_dir, model="teacher_pfd", fmt="onnx")
    assert exported["onnx"]["parity"]["passed"]
    assert PRIVILEGED_COLUMN in read_signature(exported["onnx"]["dir"]).feature_layout.dense


def test_a_teacher_only_history_labels_with_the_history_and_the_student_serves_without_it(tiny_spec_dict, tmp_path):
    """jobs/demo_pfd.yaml's shape: only the teacher reads the click history. The teacher's logits change with the
    history, the shards do not carry it, and the student's export neither asks for it nor needs it to score."""
    from pipeline.export import eager_logits, export_model, write_export
    from pipeline.features import table_to_arrays
    from pipeline.serving import column_kinds, read_signature, score_log

    tiny_spec_dict["teacher"]["extra_features"] = {"sequence": tiny_spec_dict["features"].pop("sequence")}
    spec = parse_spec(tiny_spec_dict)
    (day,) = generate_click_logs(spec.data.path, start_date=dt.date(2026, 11, 1), days=1, rows_per_day=300,
                                 users=300, items=1000, categories=10, seq_len=5)
    log = pq.read_table(f"{day}/part-00000.parquet")
    layouts = {"teacher": FeatureLayout.from_spec(spec.teacher_features(spec.teacher[0])),
               "student": FeatureLayout.from_spec(spec.features)}
    assert layouts["teacher"].sequence == "hist_item_ids" and layouts["student"].sequence is None
    configs = {"teacher": ModelConfig.from_section(spec.teacher[0]), "student": ModelConfig.from_section(spec.student)}
    models = {role: build_model(configs[role], layouts[role]) for role in layouts}
    teacher_path = str(tmp_path / "teacher.pt")
    save_model(teacher_path, models["teacher"], configs["teacher"], layouts["teacher"])

    labelled = TeacherPredictor({"teacher_logit": teacher_path}, keep_columns=label_columns(spec))(log)
    assert "hist_item_ids" not in labelled.column_names and labelled.num_rows == log.num_rows
    with_history = table_to_arrays(log, layouts["teacher"])
    without = with_history | {"sequence": np.zeros_like(with_history["sequence"])}
    np.testing.assert_allclose(labelled["teacher_logit"].to_numpy(), eager_logits(models["teacher"], with_history),
                               atol=1e-5)
    assert not np.allclose(eager_logits(models["teacher"], without), eager_logits(models["teacher"], with_history))

    student = models["student"]
    exported = export_model(student, configs["student"], layouts["student"], "onnx",
                            raw_columns=column_kinds(log.schema, layouts["student"]), dense_fill=0.0,
                            sequence_delimiter=None, about={"role": "student_distilled"})
    model_dir = str(tmp_path / "student")
    write_export(exported, model_dir)
    assert [i["name"] for i in read_signature(model_dir).inputs] == ["categorical", "dense"]
    pq.write_table(log.drop_columns(["hist_item_ids"]), tmp_path / "served.parquet")  # serving has no history
    assert score_log(model_dir, str(tmp_path / "served.parquet"), str(tmp_path / "scored.parquet"))["rows"] == 300
    scored = pq.read_table(tmp_path / "scored.parquet")["logit"].to_numpy()
    np.testing.assert_allclose(scored, eager_logits(student, table_to_arrays(log, layouts["student"])), atol=1e-5)
