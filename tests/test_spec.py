"""Job spec validation: one test per rule, every shipped spec loads, overrides, CLI exit codes."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import SpecError
from pipeline.spec import load_spec, parse_spec
from tests.conftest import JOBS


@pytest.fixture
def raw(tiny_spec_dict) -> dict:
    return copy.deepcopy(tiny_spec_dict)


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.name
    assert path.read_text().startswith("# Run: distill "), "each spec starts with the command that runs it"


def test_valid_spec_round_trips_defaults(raw):
    spec = parse_spec(raw)
    assert spec.train.num_workers == 2 and spec.train.zero_stage == 2
    assert spec.label.logit_dtype == "float32"  # a default filled in
    assert spec.run_dir.endswith("/runs/tiny")


def _error(raw: dict, match: str) -> str:
    with pytest.raises(SpecError, match=match) as info:
        parse_spec(raw)
    return str(info.value)


def test_unknown_key_suggests_the_closest_field(raw):
    raw["train"]["epocs"] = 3
    message = _error(raw, r"train\.epocs: unknown key")
    assert "did you mean 'epochs'" in message and "allowed keys: num_workers" in message


def test_unknown_section_is_refused(raw):
    raw["trian"] = {}
    assert "did you mean 'train'" in _error(raw, "trian: unknown key")


def test_wrong_type(raw):
    raw["train"]["epochs"] = "three"
    _error(raw, r"train\.epochs: .*valid integer.*\(got 'three'\)")


@pytest.mark.parametrize("value", [0, -1.0])
def test_temperature_must_be_positive(raw, value):
    raw["distill"]["temperature"] = value
    _error(raw, r"distill\.temperature: .*greater than 0")


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_alpha_must_be_within_zero_and_one(raw, value):
    raw["distill"]["alpha"] = value
    _error(raw, r"distill\.alpha")


def test_workers_at_least_one(raw):
    raw["train"]["num_workers"] = 0
    _error(raw, r"train\.num_workers: .*greater than or equal to 1")


def test_zero_stage_in_range(raw):
    raw["train"]["zero_stage"] = 4
    _error(raw, r"train\.zero_stage")


def test_actor_pool_bounds(raw):
    raw["label"]["actors"] = [3, 1]
    _error(raw, r"label\.actors: expected \[min, max\]")


def test_unknown_model_lists_the_families(raw):
    raw["student"]["model"] = "xgboost"
    _error(raw, r"student\.model: unknown student model 'xgboost'; choose one of \['mlp', 'fm'")


def test_unknown_teacher_model_lists_the_families(raw):
    raw["teacher"] = {"model": "gbdt"}
    _error(raw, r"teacher\.model: unknown teacher model 'gbdt'; choose one of \['dcn_v2'")


def test_plugin_module_that_cannot_be_imported(raw):
    raw["student"] = {"model": "custom", "factory": "no_such_module:build"}
    _error(raw, r"student: factory 'no_such_module:build': cannot import module 'no_such_module' .*"
                r"install the package or put it on PYTHONPATH")


def test_plugin_module_without_the_function(raw):
    raw["student"] = {"model": "custom", "factory": "pipeline.spec:no_such_function"}
    _error(raw, r"student: factory 'pipeline\.spec:no_such_function': module 'pipeline\.spec' has no function")


def test_malformed_plugin_path(raw):
    raw["student"] = {"model": "custom", "factory": "not a path"}
    _error(raw, r"student\.factory: 'not a path' is not 'package\.module:function'; write an importable module")


def test_missing_indicators_need_a_built_in_family(raw):
    raw["features"]["dense_missing_indicators"] = True
    assert parse_spec(copy.deepcopy(raw)).features.dense_missing_indicators
    raw["student"] = {"model": "custom", "factory": "pipeline.models.plugin:build_custom"}
    _error(raw, r"features\.dense_missing_indicators .*custom model would get NaN")


def test_custom_model_needs_a_factory(raw):
    raw["student"] = {"model": "custom"}
    _error(raw, r"student: model: custom needs factory: 'package\.module:function'")


def test_factory_without_model_custom(raw):
    raw["student"]["factory"] = "pipeline.spec:parse_spec"
    _error(raw, r"student: factory is only read with model: custom \(model is 'mlp'\); remove it or set model: custom")


def test_bad_cron(raw):
    raw["schedule"] = {"registry": "registry", "cron": "every night"}
    _error(raw, r"schedule\.cron: 'every night' is not a cron expression; expected 5 fields, e\.g\. '30 2 \* \* \*'")


def test_bad_time_zone(raw):
    raw["schedule"] = {"registry": "registry", "timezone": "Mars/Olympus"}
    _error(raw, r"schedule\.timezone: unknown time zone 'Mars/Olympus'; use an IANA name such as 'UTC'")


def test_hint_loss_needs_stored_hidden_vectors(raw):
    raw["distill"]["hint_weight"] = 0.5
    _error(raw, r"distill\.hint_weight > 0 needs the teacher's hidden vectors: set label\.store_hidden: true")


def test_top_k_needs_a_multiclass_task(raw):
    raw["label"]["top_k"] = 2
    _error(raw, r"label\.top_k applies to task: multiclass only; remove it or set features\.task")


def test_slice_by_must_be_a_categorical_feature(raw):
    raw["eval"] = {"slice_by": "price"}
    _error(raw, r"eval\.slice_by 'price' is not a categorical feature; use one of \['user_id'")


def test_empty_teacher_list(raw):
    raw["teacher"] = []
    _error(raw, r"teacher: the teacher list is empty; give one teacher or several")


def test_duplicate_teacher_names_in_an_ensemble(raw):
    raw["teacher"] = [{"name": "big"}, {"name": "big", "model": "deepfm"}]
    _error(raw, r"teacher names \['big', 'big'\] repeat; give each teacher of an ensemble its own name")


@pytest.mark.parametrize("section", ["data", "features"])
def test_missing_required_section(raw, section):
    del raw[section]
    _error(raw, rf"  - {section}: required field is missing; add it to the spec")


def test_eval_days_must_not_overlap_train_days(raw):
    raw["data"]["eval_days"] = {"start": "2026-11-02", "end": "2026-11-03"}
    message = _error(raw, r"data: .*eval_days overlap train_days \(e\.g\. 2026-11-02\)")
    assert "data.evaluation" in message  # the way to evaluate inside the training days


def _evaluated_in_training_days(raw: dict, **evaluation) -> dict:
    raw["data"] |= {"eval_days": raw["data"]["train_days"], "evaluation": {"fraction": 0.2} | evaluation}
    return raw


def test_evaluation_rows_let_eval_days_overlap_train_days(raw):
    spec = parse_spec(_evaluated_in_training_days(raw))
    assert spec.data.eval_days == spec.data.train_days and spec.evaluation_key == "event_id"


@pytest.mark.parametrize("fraction", [0, 1, 1.5])
def test_evaluation_fraction_must_be_within_zero_and_one(raw, fraction):
    _error(_evaluated_in_training_days(raw, fraction=fraction), r"data\.evaluation\.fraction: Input should be")


def test_evaluation_needs_a_key_to_hash(raw):
    raw["features"] |= {"id": None, "group": None}
    _error(_evaluated_in_training_days(raw), r"data\.evaluation hashes a row key: set data\.evaluation\.by")


def test_evaluation_leaves_rows_to_train_on(raw):
    raw["data"]["validation"] = {"fraction": 0.5}
    _error(_evaluated_in_training_days(raw, fraction=0.5), r"data\.validation\.fraction 0\.5 \+ data\.evaluation"
           r"\.fraction 0\.5 hold out most rows: about 25% would be left")


@pytest.mark.parametrize(("by", "role"), [("clicked", "is the label"), ("hist_item_ids", "is the behaviour sequence")])
def test_evaluation_hashes_a_row_or_user_column(raw, by, role):
    _error(_evaluated_in_training_days(raw, by=by), rf"data\.evaluation\.by '{by}' {role}")


def test_nightly_cycles_refuse_evaluation_rows(raw):
    raw["schedule"] = {"registry": "r", "cron": "30 2 * * *"}
    _error(_evaluated_in_training_days(raw), "data.evaluation holds out rows of the eval days, but a nightly "
           r"cycle \(schedule\) evaluates on the new day")


def test_day_range_must_be_ordered(raw):
    raw["data"]["train_days"] = {"start": "2026-11-02", "end": "2026-11-01"}
    _error(raw, r"data\.train_days: end 2026-11-01 is before start 2026-11-02; swap them")


def test_day_range_needs_both_ends(raw):
    raw["data"]["train_days"] = {"start": "2026-11-01"}
    _error(raw, r"data\.train_days\.end: required field is missing; add it to the spec")


def test_gpu_actors_need_gpu_training(raw):
    raw["train"]["use_gpu"] = False
    raw["label"]["gpus_per_actor"] = 1
    _error(raw, r"label\.gpus_per_actor > 0 but train\.use_gpu is false; set train\.use_gpu: true .* "
                r"or label\.gpus_per_actor: 0")


def test_fp16_needs_gpu(raw):
    raw["train"]["precision"] = "fp16"
    _error(raw, r"fp16 needs train\.use_gpu")


def test_sequence_must_share_a_categorical_table(raw):
    raw["features"]["sequence"]["embedding_of"] = "brand_id"
    _error(raw, r"sequence\.embedding_of 'brand_id' is not a categorical column")


def test_a_column_has_one_role(raw):
    raw["features"]["dense"].append("user_id")
    _error(raw, r"columns listed twice: \['user_id'\]")


def test_storage_section_takes_endpoint_region_and_profile(raw):
    raw["storage"] = {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "profile": "minio"}
    assert parse_spec(raw).storage.endpoint_url == "http://127.0.0.1:9000"
    assert parse_spec({k: v for k, v in raw.items() if k != "storage"}).storage.endpoint_url is None


def test_credentials_in_the_spec_are_refused_without_echoing_them(raw):
    raw["storage"] = {"endpoint_url": "http://127.0.0.1:9000", "secret_key": "s3cr3t-value", "access_key": "AKIA1"}
    message = _error(raw, r"storage: \['access_key', 'secret_key'\] look like credentials.*AWS_ACCESS_KEY_ID")
    assert "s3cr3t-value" not in message and "AKIA1" not in message


def test_non_mapping_document(tmp_path):
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        parse_spec(["a", "list"])
    path = tmp_path / "list.yaml"
    path.write_text("- name: tiny\n- data: {}\n")
    with pytest.raises(SpecError, match=r"list\.yaml: the spec must be a YAML mapping of sections, got list"):
        load_spec(path)


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: [1\n")
    with pytest.raises(SpecError, match=r"YAML syntax error at line 3, column 1"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_set_nested_fields_with_yaml_values(tmp_path, raw):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path, ["train.epochs=1", "label.batch_size=4096", "label.actors=[1, 2]"])
    assert (spec.train.epochs, spec.label.batch_size, spec.label.actors) == (1, 4096, (1, 2))


def test_override_to_unknown_field_is_refused(tmp_path, raw):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"train\.epohcs: unknown key; did you mean 'epochs'"):
        load_spec(path, ["train.epohcs=1"])


def test_malformed_override(tmp_path, raw):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        load_spec(path, ["train.epochs"])


def test_fingerprint_depends_only_on_the_chosen_sections(raw):
    base = parse_spec(raw)
    raw["train"]["epochs"] = 9
    changed = parse_spec(raw)
    assert base.fingerprint("features", "label") == changed.fingerprint("features", "label")
    assert base.fingerprint() != changed.fingerprint()


def test_cli_validate_exit_codes(tmp_path, raw, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(good)]) == 0
    raw["distill"]["alpha"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "distill.alpha" in err and "Traceback" not in err


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("train.epochs", "three", "train.epochs"),
    ("student.factory", "not a path", "is not 'package.module:function'"),
    ("schedule", {"registry": "r", "cron": "61 * * * *"}, "schedule.cron"),
    ("eval", {"slice_by": "price"}, "eval.slice_by 'price'"),
    ("teacher", [], "the teacher list is empty"),
    ("data.evaluation", {"fraction": 1}, "data.evaluation.fraction"),
])
def test_cli_validate_exits_2_naming_the_problem(tmp_path, raw, capsys, field, value, shown):
    section, _, key = field.partition(".")
    if key:
        raw[section] = {**raw.get(section, {}), key: value} | ({"model": "custom"} if key == "factory" else {})
    else:
        raw[section] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: invalid job spec") and shown in err and "Traceback" not in err


def test_cli_validate_exits_2_on_yaml_errors_and_non_mappings(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: tiny\ndata: {path: [x\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("- tiny\n")
    assert main(["validate", str(broken)]) == 2 and main(["validate", str(listed)]) == 2
    err = capsys.readouterr().err
    assert "YAML syntax error at line 3, column 1" in err and "got list" in err and "Traceback" not in err


def test_onnxruntime_labelling_refuses_what_it_cannot_do(raw):
    raw["label"]["runtime"] = "onnxruntime"
    assert parse_spec(raw).label.runtime == "onnxruntime"
    _error(copy.deepcopy(raw) | {"label": raw["label"] | {"gpus_per_actor": 1}}, r"runs the teacher on CPU in fp32")
    _error(copy.deepcopy(raw) | {"label": raw["label"] | {"store_hidden": True}}, r"exports the teacher's logits only")
    _error(copy.deepcopy(raw) | {"label": raw["label"] | {"runtime": "tensorrt"}}, r"label\.runtime")


def test_export_section_names_its_choices(raw):
    raw["export"] = {"formats": ["onnx", "tflite"]}
    assert "onnx" in _error(raw, r"export\.formats") and "torchscript" in _error(raw, r"export\.formats")
    raw["export"] = {"serving_batches": [1, 0]}
    _error(raw, r"export\.serving_batches.*at least 1")
    raw["export"] = {"quantize": ["int4"]}
    _error(raw, r"export\.quantize")
    raw["export"] = {"formats": []}
    assert parse_spec(raw).export.formats == []
