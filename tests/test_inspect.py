"""`distill inspect` on the shared real samples and on a Hive-style log, and `distill validate --data`
listing every problem of a window at once (exit 2, file and column named)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.spec.loading import parse_spec

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared real samples are absent ({SHARED})")


def _inspect(capsys, *args) -> tuple[str, dict]:
    assert main(["inspect", *map(str, args)]) == 0
    text = capsys.readouterr().out
    return text, yaml.safe_load(text)  # the whole output is YAML: the summary is comments


def _spec(data: dict, features: dict, tmp_path) -> dict:
    return {"name": "inspected", "data": data, "features": features,
            "teacher": {"model": "deepfm", "embedding_dim": 4, "hash_buckets": 100, "hidden": [8]},
            "student": {"model": "mlp", "embedding_dim": 2, "hash_buckets": 100, "hidden": [4]},
            "output": {"root": str(tmp_path / "runs")}}


def _two_days(path: str) -> dict:
    """One file standing in for two days, so that a spec around a flat, timeless log validates."""
    return {"source": "parquet", "partitions": {"2026-01-01": path, "2026-01-02": path},
            "train_days": {"start": "2026-01-01", "end": "2026-01-01"},
            "eval_days": {"start": "2026-01-02", "end": "2026-01-02"}}


@needs_shared
def test_criteo_raw_hex_ids_and_raw_counts(capsys, tmp_path):
    path = SHARED / "criteo" / "criteo_raw_tiny.parquet"
    text, proposed = _inspect(capsys, path)
    assert "1,999 rows" in text and "no days" in text
    features = proposed["features"]
    assert (features["label"], features["id"], features["group"]) == ("Label", "Id", None)
    assert features["categorical"] == [f"C{i}" for i in range(1, 27)]  # the hex strings
    assert features["dense"] == [f"I{i}" for i in range(1, 14)]        # the raw counts, nulls and all
    assert re.search(r"# I12 +double +77\.7%", text)  # the null rate, measured
    assert features["dense_missing_indicators"] is True and "(I12: 78%)" in text
    # One file, no time: one nominal day, evaluated on a hash fraction of its rows
    data = proposed["data"]
    assert data["partitions"] == {"2026-01-01": str(path)} and data["train_days"] == data["eval_days"]
    assert data["evaluation"] == {"fraction": 0.2, "by": "Id"} and data["validation"] == {"fraction": 0.1, "by": "Id"}
    spec = parse_spec(_spec(data, features, tmp_path))
    assert spec.evaluation_key == spec.validation_key == "Id" and spec.features.dense_missing_indicators


@needs_shared
def test_movielens_time_column_and_a_derived_label(capsys, tmp_path):
    text, proposed = _inspect(capsys, SHARED / "movielens" / "ml_latest_small_ratings.parquet")
    assert "days: 4110 from 1996-03-29 to 2018-09-24" in text
    features, data = proposed["features"], proposed["data"]
    assert (features["label"], features["group"], features["categorical"]) == ("label", "userId", ["userId", "movieId"])
    assert "# left out: rating: predicts label perfectly" in text   # the label was derived from it
    assert data["time_column"] == "timestamp"
    assert data["train_days"]["end"] < data["eval_days"]["start"]
    spec = parse_spec(_spec(data, features, tmp_path))
    assert spec.data.time_column == "timestamp"


@needs_shared
def test_taobao_csv_delimited_history_and_empty_fields(capsys, tmp_path):
    path = SHARED / "taobao_ad" / "taobao_ad_tiny_train.csv"
    text, proposed = _inspect(capsys, path)
    features = proposed["features"]
    assert features["label"] == "clk" and features["group"] == "userid" and features["dense"] == ["price"]
    assert features["sequence"]["delimiter"] == "^" and features["sequence"]["embedding_of"] == "adgroup_id"
    assert "pid" in features["categorical"]                               # "430548_1007": text ids
    assert "new_user_class_level: constant or empty" in text              # every value empty
    assert re.search(r"# pvalue_level +int64 +60\.0%", text)
    data = _two_days(str(path)) | {"source": "csv"}
    parse_spec(_spec(data, features, tmp_path))


def test_hive_log_with_string_ids_nulls_and_yyyymmdd_partitions(capsys, tmp_path):
    root = tmp_path / "events"
    for offset in range(3):
        day = dt.date(2026, 11, 1) + dt.timedelta(days=offset)
        folder = root / f"dt={day:%Y%m%d}"
        folder.mkdir(parents=True)
        rng = np.random.default_rng(offset)
        rows = 400 + offset
        pq.write_table(pa.table({
            "ev_id": [f"{offset}-{i}" for i in range(rows)],
            "user_uuid": [f"u{v}" for v in rng.integers(0, 40, rows)],
            "device": pa.array([None if i % 4 == 0 else "ios" if i % 2 else "android" for i in range(rows)]),
            "sku": [f"SKU{v}" for v in rng.integers(0, 90, rows)],
            "price": rng.random(rows),
            "hist": ["|".join(f"SKU{v}" for v in rng.integers(0, 90, 3)) for _ in range(rows)],
            "is_click": rng.integers(0, 2, rows).astype(bool),
        }), folder / "part-0.parquet")
    text, proposed = _inspect(capsys, root)
    assert "1,203 rows; layout: day partitions" in text and "days: 3 from 2026-11-01 to 2026-11-03" in text
    assert re.search(r"# device +string +25\.1%", text)
    features, data = proposed["features"], proposed["data"]
    assert (features["label"], features["id"], features["group"]) == ("is_click", "ev_id", "user_uuid")
    assert features["sequence"] == {"column": "hist", "length": 3, "delimiter": "|", "embedding_of": "sku"}
    assert data["eval_days"] == {"start": "2026-11-03", "end": "2026-11-03"}
    parse_spec(_spec(data, features, tmp_path))


def test_inspect_of_a_missing_path_is_a_user_error(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------- validate --data


def _day(root: Path, day: str, table: pa.Table) -> None:
    (root / f"date={day}").mkdir(parents=True)
    pq.write_table(table, root / f"date={day}" / "part-0.parquet")


def test_validate_data_lists_every_problem_of_the_window(capsys, tmp_path):
    root = tmp_path / "logs"
    good = {"ev": ["a", "b", "c"], "device": ["ios", "web", None], "hist": ["1 2", "3", "4 5"],
            "clicked": [0, 1, 1]}
    _day(root, "2026-11-01", pa.table(good))
    _day(root, "2026-11-02", pa.table(good | {"device": [1, 2, 3]}))           # int here, text the day before
    _day(root, "2026-11-03", pa.table({k: v for k, v in good.items() if k != "clicked"}))  # no label
    spec = _spec({"source": "parquet", "path": str(root), "train_days": {"start": "2026-11-01", "end": "2026-11-02"},
                  "eval_days": {"start": "2026-11-03", "end": "2026-11-03"}},
                 {"label": "clicked", "id": "ev", "group": None, "categorical": ["device"],
                  "sequence": {"column": "hist", "length": 3, "embedding_of": "device", "delimiter": ","}},
                 tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path), "--data"]) == 2
    err = capsys.readouterr().err
    assert "problems with the click logs" in err, err
    assert "device" in err and "date=2026-11-02" in err      # the type change, with the day that changed
    assert "clicked" in err and "date=2026-11-03" in err     # the missing label, with its file
    assert "delimiter" in err and "hist" in err              # ',' splits none of "1 2", "3", "4 5"
    assert "Traceback" not in err
