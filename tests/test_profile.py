"""The click-log profile (distinct ids, null rates, reuse) and `hash_buckets: auto` / the per-field form."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import SpecError
from pipeline.features import FeatureLayout, table_to_inputs
from pipeline.models import ModelConfig, build_model, count_parameters, load_model, save_model
from pipeline.spec import parse_spec
from pipeline.stages import profile
from pipeline.stages.profile import ClickLogProfile, ColumnProfile, auto_buckets, resolve_hash_buckets

CATEGORICAL = ["user_id", "item_id", "category_id", "hour", "device", "position"]
DAYS = [dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)]


def _day(rng: np.random.Generator, rows: int) -> pa.Table:
    """A click-log day with known sizes: 3,000 users (5% null), 300 items, a 600-item history."""
    users = rng.integers(1, 3001, rows)
    prices = rng.random(rows).astype(np.float32)
    return pa.table({
        "clicked": pa.array(rng.integers(0, 2, rows)),
        "user_id": pa.array(users, mask=rng.random(rows) < 0.05),
        "item_id": pa.array(rng.integers(1, 301, rows)),
        "category_id": pa.array(rng.integers(1, 11, rows)),
        "hour": pa.array(rng.integers(0, 24, rows)),
        "device": pa.array(rng.integers(1, 4, rows)),
        "position": pa.array(rng.integers(1, 11, rows)),
        "price": pa.array(prices, mask=rng.random(rows) < 0.1),
        "user_activity": pa.array(prices * 2),
        "item_popularity": pa.array(prices * 3),
        "hist_item_ids": pa.array(rng.integers(0, 601, (rows, 5)).tolist(), pa.list_(pa.int64())),
    })


@pytest.fixture
def clicks(tmp_path) -> tuple[str, list[pa.Table]]:
    rng = np.random.default_rng(0)
    tables = []
    for day in DAYS:
        part = tmp_path / "clicks" / f"date={day.isoformat()}"
        part.mkdir(parents=True)
        tables.append(_day(rng, 6000))
        pq.write_table(tables[-1], part / "part-00000.parquet")
    return str(tmp_path / "clicks"), tables[:2]  # the training window: the first two days


def _spec(raw: dict, root: str | None = None, teacher=None, student=None):
    raw["data"] |= {"source": "parquet", **({"path": root} if root else {})}
    raw["data"].pop("synthetic", None)
    if teacher is not None:
        raw["teacher"]["hash_buckets"] = teacher
    if student is not None:
        raw["student"]["hash_buckets"] = student
    return parse_spec(raw)


def _profile(distinct: dict[str, int]) -> ClickLogProfile:
    columns = {name: ColumnProfile("categorical", 0, 0.0, n) for name, n in distinct.items()}
    return ClickLogProfile(rows=1, days=[], columns=columns, tables=dict(distinct), inputs={}, seconds=0.0)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_auto_follows_cardinality(kind):
    sizes = [auto_buckets(n, kind) for n in (5_000, 50_000, 500_000)]
    assert sizes == sorted(set(sizes))  # 10x the ids, more rows every time
    assert all(s & (s - 1) == 0 for s in sizes)  # powers of two
    assert auto_buckets(0, kind) == 16 and auto_buckets(10**9, kind) == 2**20  # floor and cap


def test_the_teacher_gets_more_rows_than_the_student_and_a_small_field_is_spared():
    assert auto_buckets(20_000, "teacher") == 65_536 and auto_buckets(20_000, "student") == 16_384
    assert auto_buckets(24, "teacher") == auto_buckets(24, "student") == 2048  # hour: 64 rows an id


def test_resolve_sizes_auto_and_the_per_field_form_from_the_profile(tiny_spec_dict):
    spec = _spec(tiny_spec_dict, teacher="auto", student={"user_id": 50_000, "item_id": "auto", "default": 64})
    distinct = dict.fromkeys(CATEGORICAL, 10) | {"user_id": 40_000, "item_id": 4_000}
    resolved = resolve_hash_buckets(spec, _profile(distinct))
    teacher = resolved.teacher[0].hash_buckets
    assert teacher["user_id"] > teacher["item_id"] > teacher["hour"]  # 10x the ids, more rows
    assert resolved.student.hash_buckets == dict.fromkeys(CATEGORICAL, 64) | {"user_id": 50_000, "item_id": 4096}
    config = ModelConfig.from_section(resolved.teacher[0])
    assert config.hash_buckets == teacher and ModelConfig.from_dict(config.to_dict()) == config


def test_fields_the_per_field_form_leaves_out_take_the_default_size(tiny_spec_dict):
    spec = _spec(tiny_spec_dict, student={"user_id": 500})
    assert resolve_hash_buckets(spec, None).student.hash_buckets == dict.fromkeys(CATEGORICAL, 10_000) | {
        "user_id": 500}
    assert not profile.needs_profile(spec)


def test_a_plain_number_is_unchanged(tiny_spec_dict):
    spec = _spec(tiny_spec_dict)
    before = {"teacher": ModelConfig.from_section(spec.teacher[0]).to_dict(),
              "student": ModelConfig.from_section(spec.student).to_dict()}
    resolved = resolve_hash_buckets(spec, None)
    assert resolved.fingerprint() == spec.fingerprint() and not profile.needs_profile(spec)
    assert ModelConfig.from_section(resolved.student).to_dict() == before["student"]
    assert before["student"] == {  # what checkpoints and fingerprints of existing specs hold, key for key
        "model": "mlp", "factory": None, "factory_args": {}, "embedding_dim": 4, "hash_buckets": 1000,
        "hidden": [16], "cross_layers": 0, "sequence_pooling": "mean", "attention_heads": 2,
        "transformer_layers": 1, "dropout": 0.0, "out_dim": 1}


@pytest.mark.parametrize("value,message", [
    (8, r"teacher.hash_buckets: 8 is below 16"),
    ({"user_id": 8}, r"teacher.hash_buckets: field 'user_id': 8 is below 16"),
    ({"item_id": "lots"}, r"teacher.hash_buckets: field 'item_id': 'lots' is neither a whole number nor 'auto'"),
    ({"item_id": 2.5}, r"field 'item_id': 2.5 is neither"),
    ("big", r"teacher.hash_buckets: 'big' is neither"),
    (True, r"True is neither"),
])
def test_bad_bucket_counts_are_spec_errors_naming_the_field(tiny_spec_dict, value, message):
    with pytest.raises(SpecError, match=message):
        _spec(tiny_spec_dict, teacher=value)


def test_an_unknown_field_in_the_per_field_form_is_named(tiny_spec_dict):
    spec = _spec(tiny_spec_dict, student={"usr_id": 500, "default": "auto"})
    with pytest.raises(SpecError, match=r"student.hash_buckets names 'usr_id'.*not a categorical feature"):
        resolve_hash_buckets(spec, _profile(dict.fromkeys(CATEGORICAL, 10)))


def test_an_unresolved_auto_never_reaches_a_model(tiny_spec_dict):
    with pytest.raises(ValueError, match="resolve_hash_buckets"):
        ModelConfig.from_section(_spec(tiny_spec_dict, teacher="auto").teacher[0])


@pytest.mark.parametrize("family", ["dcn_v2", "deepfm", "fm", "bst"])
def test_per_field_tables_build_save_and_load(tmp_path, family):
    layout = FeatureLayout(categorical=("user_id", "item_id"), dense=("price",), sequence="hist",
                           sequence_length=3, sequence_field=1)
    table = pa.table({"user_id": pa.array([1, 2, 10**12]), "item_id": pa.array([3, 4, 5]),
                      "price": pa.array([1.0, 2.0, 3.0], pa.float32()), "hist": pa.array([[3, 4, 0]] * 3)})
    config = ModelConfig(model=family, embedding_dim=4, hash_buckets={"user_id": 128, "item_id": 32},
                         hidden=(8,), cross_layers=1)
    model = build_model(config, layout).eval()
    assert model.encoder.embedding.num_embeddings == 160
    path = str(tmp_path / "model.pt")
    save_model(path, model, config, layout)
    loaded, loaded_config, _ = load_model(path)
    inputs = table_to_inputs(table, layout)
    assert loaded_config == config and torch.equal(model(inputs), loaded(inputs))


def test_equal_per_field_sizes_hash_like_one_number():
    layout = FeatureLayout(categorical=("user_id", "item_id"), dense=())
    inputs = table_to_inputs(pa.table({"user_id": pa.array([1, 7, 10**15]), "item_id": pa.array([2, 3, 4])}), layout)
    torch.manual_seed(0)
    one = build_model(ModelConfig(model="fm", embedding_dim=4, hash_buckets=64), layout)
    per_field = build_model(ModelConfig(model="fm", embedding_dim=4, hash_buckets={"user_id": 64, "item_id": 64}),
                            layout)
    per_field.load_state_dict(one.state_dict())  # same shapes: one table of 2 x 64 rows
    assert count_parameters(one) == count_parameters(per_field) and torch.equal(one(inputs), per_field(inputs))


@pytest.mark.ray
def test_profile_counts_distinct_ids_and_nulls_then_is_reused(ray_cluster, tiny_spec_dict, clicks, monkeypatch):
    root, window = clicks
    spec = _spec(tiny_spec_dict, root, teacher="auto", student={"user_id": 20_000, "default": "auto"})
    measured = profile.profile_click_logs(spec)
    logs = pa.concat_tables(window)
    assert measured.rows == logs.num_rows == 12_000
    for name in CATEGORICAL:
        truth = len(logs[name].drop_null().unique())
        assert abs(measured.columns[name].distinct - truth) <= 0.03 * truth, name
    for name in [*CATEGORICAL, "price", "user_activity"]:
        assert measured.columns[name].null_rate == logs[name].null_count / logs.num_rows  # exact
    assert measured.columns["user_id"].null_rate > 0.04 and measured.columns["price"].kind == "dense"
    history = {i for row in logs["hist_item_ids"].to_pylist() for i in row if i} | set(logs["item_id"].to_pylist())
    assert abs(measured.tables["item_id"] - len(history)) <= 0.03 * len(history)  # the sequence shares the table

    resolved = profile.data_aware_spec(spec)
    recorded = json.loads((Path(spec.run_dir) / "profile.json").read_text())
    assert recorded["hash_buckets"]["teacher"] == resolved.teacher[0].hash_buckets
    assert recorded["hash_buckets"]["student"]["user_id"] == 20_000
    assert resolved.teacher[0].hash_buckets["user_id"] > resolved.teacher[0].hash_buckets["category_id"]

    monkeypatch.setattr(profile, "_measure", lambda *a: pytest.fail("the same partitions were measured again"))
    assert profile.profile_click_logs(spec).columns == measured.columns
    pq.write_table(window[0].slice(0, 100), Path(root) / "date=2026-11-01" / "part-00001.parquet")
    monkeypatch.undo()
    assert profile.profile_click_logs(spec).rows == 12_100  # a changed partition is measured again


@pytest.mark.ray
def test_the_profile_leaves_out_rows_held_out_for_evaluation(ray_cluster, tiny_spec_dict, clicks):
    """With `data.evaluation` by rows, nothing of the evaluation rows sizes a table: the profile counts only the
    other rows, split on the key's normalised values as every read splits them."""
    from pipeline.data.normalise import Normaliser, normalise
    from pipeline.data.split import evaluation_mask

    root, window = clicks
    tiny_spec_dict["data"]["evaluation"] = {"fraction": 0.3, "by": "user_id"}
    spec = _spec(tiny_spec_dict, root, teacher="auto", student="auto")
    measured = profile.profile_click_logs(spec)
    logs = pa.concat_tables(window)
    keys = normalise(logs.select(["user_id"]), Normaliser.from_spec(spec)).column("user_id")
    kept = logs.filter(pa.array(~evaluation_mask(keys, 0.3)))
    assert 0.6 * logs.num_rows < measured.rows == kept.num_rows < 0.8 * logs.num_rows
    users = len(kept["user_id"].drop_null().unique())
    assert users < 0.8 * len(logs["user_id"].drop_null().unique())  # the held-out users are not counted
    assert abs(measured.columns["user_id"].distinct - users) <= 0.03 * users
    assert measured.columns["price"].null_rate == kept["price"].null_count / kept.num_rows
