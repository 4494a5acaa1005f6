"""Bad click logs: one test per kind of data error, each message naming the file, the column and a fix;
and the row rules (`split_bad_rows`, `locate_bad_rows`) checked against an independent oracle.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import runtime, storage
from pipeline.data import clicklogs, validate
from pipeline.data.validate import RowRules
from pipeline.errors import DataError
from pipeline.spec import parse_spec
from tests.conftest import FAKE_AWS

DAY = "date=2026-11-01"
BAD_ROWS_FIX = "set data.on_bad_rows: quarantine"


@pytest.fixture(scope="module")
def good_table(tmp_path_factory) -> pa.Table:
    """200 realistic rows from the synthetic generator; tests break one column of a copy."""
    from pipeline.data.synthetic import generate_click_logs

    root = tmp_path_factory.mktemp("good")
    generate_click_logs(str(root), start_date=dt.date(2026, 11, 1), days=1, rows_per_day=200, users=200,
                        items=500, categories=10, seq_len=5, seed=0)
    return pq.read_table(next((root / DAY).glob("*.parquet")))


@pytest.fixture
def spec(tiny_spec_dict):
    return parse_spec(tiny_spec_dict)


@pytest.fixture
def write_day(tmp_path):
    """Builder: write_day(table, day=DAY, **write_options) -> (partition dir, file) under tmp_path/clicks."""

    def write(table: pa.Table, day: str = DAY, name: str = "part-0.parquet", **options) -> tuple[str, str]:
        partition = tmp_path / "clicks" / day
        partition.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, partition / name, **options)
        return str(partition), str(partition / name)

    return write


def _with(table: pa.Table, name: str, values) -> pa.Table:
    """`table` with column `name` replaced by `values` (a list or an Arrow array)."""
    column = values if isinstance(values, pa.Array) else pa.array(values, table.schema.field(name).type)
    return table.set_column(table.schema.get_field_index(name), name, column)


def _set_row(table: pa.Table, name: str, row: int, value) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    return _with(table, name, values)


def _file_error(paths: list[str], spec) -> str:
    with pytest.raises(DataError) as info:
        validate.check_partitions(paths, spec.features)
    return str(info.value)


def _row_error(file: str, spec) -> str:
    with pytest.raises(DataError) as info:
        validate.check_rows([file], RowRules.from_spec(spec))
    message = str(info.value)
    assert file in message and "row group 0" in message and BAD_ROWS_FIX in message
    return message


# ---------------------------------------------------------------------------- file-level errors


def test_missing_partition_path(tmp_path, spec):
    missing = str(tmp_path / "nowhere" / DAY)
    message = _file_error([missing], spec)
    assert f"partition {missing!r} does not exist" in message and "check data.path" in message


def test_empty_directory(tmp_path, spec):
    (tmp_path / "clicks" / DAY).mkdir(parents=True)
    (tmp_path / "clicks" / DAY / "_SUCCESS").write_text("")  # not data
    message = _file_error([str(tmp_path / "clicks" / DAY)], spec)
    assert f"{DAY}' holds no .parquet files; remove it or rewrite it" in message


def test_partition_with_no_rows(good_table, write_day, spec):
    partition, _ = write_day(good_table.slice(0, 0))
    message = _file_error([partition], spec)
    assert f"partition {partition!r} has no rows" in message and "data.train_days" in message


def test_missing_label_column(good_table, write_day, spec):
    _, file = write_day(good_table.drop_columns(["clicked"]))
    message = _file_error([str(Path(file).parent)], spec)
    assert f"click logs at {file!r} lack column(s) ['clicked']" in message and "Fix the features section" in message


def test_missing_feature_column(good_table, write_day, spec):
    _, file = write_day(good_table.drop_columns(["price"]))
    message = _file_error([str(Path(file).parent)], spec)
    assert f"{file!r} lack column(s) ['price']" in message


@pytest.mark.parametrize(("column", "values", "expected"), [
    ("user_id", lambda c: pc.cast(c, pa.float64()), "expected integer or text ids (text ids are hashed"),
    ("price", lambda c: pc.cast(c, pa.string()), "expected a number (int or float); parse or cast it"),
    ("clicked", lambda c: pc.cast(c, pa.string()), "write the label as a number, or set features.label_threshold"),
    ("hist_item_ids", lambda c: pa.array(range(len(c))), "for ids joined in one text column (1^2^3) set "
                                                          "features.sequence.delimiter"),
])
def test_wrong_dtype_strings_where_numbers_are_expected(good_table, write_day, spec, column, values, expected):
    _, file = write_day(_with(good_table, column, values(good_table.column(column).combine_chunks())))
    message = _file_error([str(Path(file).parent)], spec)
    assert f"column {column!r} of {file!r} has type" in message and expected in message


def test_truncated_parquet_file(good_table, write_day, spec):
    partition, file = write_day(good_table)
    data = Path(file).read_bytes()
    Path(file).write_bytes(data[: len(data) // 2])  # a copy cut short: no footer
    message = _file_error([partition], spec)
    assert f"{file} is not a readable Parquet file, truncated or corrupt" in message
    assert "rewrite it, or remove it from its partition" in message
    with pytest.raises(DataError, match="truncated or corrupt"):  # row counts read the same footers
        clicklogs.count_rows([partition])


def test_schemas_differ_between_partitions(good_table, write_day, spec):
    first, file_a = write_day(good_table)
    narrower = _with(good_table, "user_id", pc.cast(good_table.column("user_id").combine_chunks(), pa.int32()))
    second, file_b = write_day(narrower, day="date=2026-11-02")
    message = _file_error([first, second], spec)
    assert f"column 'user_id' is int32 in {file_b!r} but int64 in {file_a!r}" in message
    assert "must share one schema: rewrite the odd file(s)" in message


def test_good_partitions_pass_and_give_row_counts(good_table, write_day, spec):
    partition, file = write_day(good_table)
    assert validate.check_partitions({dt.date(2026, 11, 1): partition}, spec.features) == {partition: 200}
    validate.check_rows([file], RowRules.from_spec(spec))  # no bad row: no error


# ---------------------------------------------------------------------------- row-level errors


def test_label_outside_zero_one(good_table, write_day, spec):
    _, file = write_day(_set_row(good_table, "clicked", 7, 3))
    message = _row_error(file, spec)
    assert "row 7 of the group, column 'clicked': clicked: 3 not in {0,1}" in message


def test_null_label(good_table, write_day, spec):
    _, file = write_day(_set_row(good_table, "clicked", 11, None))
    assert "row 11 of the group, column 'clicked': clicked: null" in _row_error(file, spec)


def test_nan_and_null_dense_values_are_missing_values_not_bad_rows(good_table, spec):
    table = _set_row(_set_row(good_table, "price", 3, float("nan")), "price", 4, None)
    assert validate.bad_row_reasons(table, RowRules.from_spec(spec)).null_count == table.num_rows


def test_inf_in_dense_feature(good_table, write_day, spec):
    _, file = write_day(_set_row(good_table, "user_activity", 5, float("-inf")))
    assert "column 'user_activity': user_activity: -inf" in _row_error(file, spec)


def test_negative_id(good_table, write_day, spec):
    _, file = write_day(_set_row(good_table, "user_id", 0, -5))
    assert "row 0 of the group, column 'user_id': user_id: -5 < 0" in _row_error(file, spec)


def test_absurd_id_above_max_id(good_table, write_day, spec):
    _, file = write_day(_set_row(good_table, "item_id", 9, 9_000_000_000_000_000_000))
    message = _row_error(file, spec)
    assert f"column 'item_id': item_id: 9000000000000000000 > data.max_id ({2**53})" in message


def test_negative_id_in_sequence(good_table, write_day, spec):
    histories = good_table.column("hist_item_ids").to_pylist()
    histories[4] = [3, 0, -2, 0, 0]  # 0 is padding, -2 is not
    _, file = write_day(_with(good_table, "hist_item_ids", histories))
    assert "row 4 of the group, column 'hist_item_ids': hist_item_ids: -2 < 0" in _row_error(file, spec)


def test_multiclass_label_range():
    rules = RowRules(label="y", num_classes=4, ids=(), dense=(), sequence=None, max_id=100)
    reasons = validate.bad_row_reasons(pa.table({"y": [0, 3, 4, -1]}), rules).to_pylist()
    wanted = "not in 0..3 (features.num_classes)"
    assert reasons == [None, None, f"y: 4 {wanted}", f"y: -1 {wanted}"]


def test_locate_finds_the_row_group_of_the_first_bad_row(good_table, write_day, spec):
    bad = _set_row(_set_row(good_table, "price", 130, float("inf")), "price", 170, float("nan"))
    _, file = write_day(bad, row_group_size=50)  # row groups 0..3; rows 130 and 170 are in group 2 and 3
    location = validate.locate_bad_rows(file, RowRules.from_spec(spec))
    assert location == {"file": file, "row_group": 2, "row_in_group": 30, "column": "price",
                        "reason": "price: inf", "bad_rows_in_group": 1}


def test_quarantine_file_is_named_by_its_content(good_table, tmp_path, spec):
    bad = _set_row(good_table.slice(0, 5), "user_id", 2, -1)
    _, rows = validate.split_bad_rows(bad, RowRules.from_spec(spec))
    first = validate.write_quarantine(rows, str(tmp_path / "quarantine"))
    assert validate.write_quarantine(rows, str(tmp_path / "quarantine")) == first  # a retry rewrites it
    assert pq.read_table(first).column("reason").to_pylist() == ["user_id: -1 < 0"]
    assert validate.write_quarantine(rows.slice(0, 0), str(tmp_path / "quarantine")) is None


# ---------------------------------------------------------------------------- split_bad_rows invariants

RULES = RowRules(label="y", num_classes=2, ids=("id", "u"), dense=("p",), sequence="s", max_id=100, row_id="id")
SCHEMA = pa.schema({"idx": pa.int64(), "y": pa.int64(), "id": pa.int64(), "u": pa.int64(), "p": pa.float64(),
                    "s": pa.list_(pa.int64())})
_ids = st.one_of(st.none(), st.integers(-3, 120))
_rows = st.fixed_dictionaries({
    "y": st.one_of(st.none(), st.integers(-1, 2)), "id": _ids, "u": _ids,
    "p": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    "s": st.one_of(st.none(), st.lists(_ids, max_size=4)),
})


def _oracle(row: dict) -> str | None:
    """The first rule a row breaks, one row at a time in plain Python: independent of the pyarrow code."""
    if row["y"] is None:
        return "y: null"
    if row["y"] not in (0, 1):
        return f"y: {row['y']} not in {{0,1}}"
    if row["id"] is None:  # the row id: a missing one is bad; a missing categorical id is a value
        return "id: null"
    for name in ("id", "u"):
        if (reason := _id_reason(name, row[name])) is not None:
            return reason
    p = row["p"]
    if p is not None and math.isinf(p):  # null and NaN are missing values, filled later
        return f"p: {p}"
    return next((r for r in (_id_reason("s", v) for v in row["s"] or []) if r is not None), None)


def _id_reason(name: str, value) -> str | None:
    if value is None:
        return None
    if value < 0:
        return f"{name}: {value} < 0"
    return f"{name}: {value} > data.max_id (100)" if value > 100 else None


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(_rows, max_size=25), cut=st.integers(0, 25))
def test_split_bad_rows_keeps_every_row_in_order_with_the_right_reason(rows, cut):
    rows = [{"idx": i, **row} for i, row in enumerate(rows)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = pa.concat_tables([table.slice(0, cut), table.slice(cut)])  # several chunks, as Ray batches have
    good, bad = validate.split_bad_rows(table, RULES)
    assert good.num_rows + bad.num_rows == len(rows)
    assert good.schema == SCHEMA and bad.column_names == [*SCHEMA.names, "reason"]
    expected = [_oracle(row) for row in rows]
    assert good.column("idx").to_pylist() == [r["idx"] for r, e in zip(rows, expected) if e is None]
    assert bad.column("idx").to_pylist() == [r["idx"] for r, e in zip(rows, expected) if e is not None]
    assert bad.column("reason").to_pylist() == [e for e in expected if e is not None]
    assert _nan_safe(good.to_pylist()) == _nan_safe([r for r, e in zip(rows, expected) if e is None])


def _nan_safe(rows: list[dict]) -> list[dict]:
    """NaN != NaN: a good row may now hold a NaN dense value (a missing one), so compare it as text."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]


# ---------------------------------------------------------------------------- S3 (moto's server on loopback)


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the moto endpoint; the settings and fake credentials are undone after the test."""
    import boto3

    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)
    for name in (*storage.SETTINGS_ENV.values(), "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    runtime.configure_storage(endpoint_url=moto_endpoint, region="us-east-1")
    name = f"distill-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def test_s3_bucket_that_does_not_exist(bucket, spec):
    partition = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/clicks/{DAY}"
    message = _file_error([partition], spec)
    assert f"S3 bucket '{partition.split('/')[2]}'" in message and "does not exist" in message
    assert partition in message and "create the bucket" in message


def test_s3_key_that_does_not_exist(bucket, spec):
    partition = f"s3://{bucket}/clicks/{DAY}"
    message = _file_error([partition], spec)
    assert f"partition {partition!r} does not exist; check data.path" in message
    with pytest.raises(DataError, match=rf"s3://{bucket}/clicks/gone\.parquet does not exist; check the path"):
        validate.locate_bad_rows(f"s3://{bucket}/clicks/gone.parquet", RowRules.from_spec(spec))


def test_s3_corrupt_file_and_bad_row_are_named_by_uri(bucket, good_table, spec):
    file = f"s3://{bucket}/clicks/{DAY}/part-0.parquet"
    storage.atomic_write_bytes(file, b"PAR1 not really parquet")
    assert f"{file} is not a readable Parquet file" in _file_error([f"s3://{bucket}/clicks/{DAY}"], spec)
    sink = pa.BufferOutputStream()
    pq.write_table(_set_row(good_table, "clicked", 2, 7), sink)
    storage.atomic_write_bytes(file, sink.getvalue().to_pybytes())
    assert validate.check_partitions([f"s3://{bucket}/clicks/{DAY}"], spec.features) == {
        f"s3://{bucket}/clicks/{DAY}": 200}
    assert "clicked: 7 not in {0,1}" in _row_error(file, spec)
