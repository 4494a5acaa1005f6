"""Real click logs as they are: partition keys, time columns, CSV, string ids, nulls as values, label forms."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.data import clicklogs, formats, validate
from pipeline.data.ids import MISSING_ID, as_int_ids, hash_string_ids
from pipeline.data.normalise import Normaliser, normalise, sequence_ids
from pipeline.data.sources import CsvOptions, LogSource, TimeColumn
from pipeline.errors import DataError

DAYS = [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared real samples are absent ({SHARED})")


def _table(rows: int, day: int = 0, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + day)
    return pa.table({
        "ev_id": [f"ev-{day}-{i}" for i in range(rows)],
        "device": pa.array(rng.choice(["ios", "android", None], rows).tolist()),
        "sku": [f"SKU{v:05d}" for v in rng.integers(0, 50, rows)],
        "price": pa.array([None if i % 7 == 0 else float(v) for i, v in enumerate(rng.random(rows))]),
        "clicked": rng.integers(0, 2, rows),
    })


# ---------------------------------------------------------------------------- the id hash, pinned


def test_string_id_hash_is_pinned_for_serving_systems():
    """The documented function: pandas' SipHash (key 0123456789123456) of the UTF-8 bytes, >> 1."""
    assert hash_string_ids(pa.array(["68fd1e64", "", "a", None])).to_pylist() == [
        4360171819779719520, 880122920902532387, 6975175471489867752, None]
    same = [pa.array([b"68fd1e64"]), pa.array(["68fd1e64"], pa.large_string()),
            pa.array(["68fd1e64"]).dictionary_encode(), pa.chunked_array([["x"], ["68fd1e64"]])]
    assert [as_int_ids(v).to_pylist()[-1] for v in same] == [4360171819779719520] * 4
    # The shortcuts give the same ids: a row id hashed without looking for repeats, a sequence's empty items
    values = pa.array(["68fd1e64", "", "a", None, "a"])
    assert hash_string_ids(values, distinct=True).to_pylist() == hash_string_ids(values).to_pylist()
    assert hash_string_ids(values, empty_is_null=True).to_pylist() == [
        4360171819779719520, None, 6975175471489867752, None, 6975175471489867752]


def test_text_ids_read_as_parquet_dictionaries_hash_alike_and_once_per_row_group(tmp_path, monkeypatch):
    """Parquet text ids come as dictionaries (`formats.dictionary_paths`): the same ids as plain text, a
    sequence's items too, and each row group's dictionary is hashed once, not once per batch."""
    import pyarrow.dataset as pads

    from pipeline.data import formats, ids
    from pipeline.data.normalise import normalise

    rng = np.random.default_rng(1)
    table = pa.table({"ev_id": [f"e{i}" for i in range(6000)],
                      "sku": [None if i % 13 == 0 else f"sku-{rng.integers(40)}" for i in range(6000)],
                      "hist": [[f"sku-{x}" if x % 5 else "" for x in rng.integers(0, 40, 3)] for _ in range(6000)],
                      "clicked": rng.integers(0, 2, 6000)})
    pq.write_table(table, tmp_path / "day.parquet", row_group_size=3000)
    plan = _plan(ids=("ev_id", "sku"), dense=(), sequence="hist", sequence_of="sku", row_id="ev_id")
    paths = formats.dictionary_paths(str(tmp_path / "day.parquet"), list(plan.text_id_columns()))
    assert paths == ["sku", "hist.list.element"]  # not the row id: all different
    read = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=paths))
    batches = list(pads.dataset(str(tmp_path / "day.parquet"), format=read).to_batches(batch_size=500))
    assert pa.types.is_dictionary(batches[0].schema.field("sku").type)
    expected, hashed, real_hash = normalise(table, plan), [], ids._hash  # the ids of plain text

    def counted(values, empty_is_null):
        hashed.append(len(values))
        return real_hash(values, empty_is_null)

    monkeypatch.setattr(ids, "_hash", counted)
    ids._HASHED_DICTIONARIES.clear()
    normalised = pa.concat_tables([normalise(pa.Table.from_batches([b]), plan) for b in batches])
    assert normalised.equals(expected)
    # 12 batches of 2 row groups: sku and the sequence's items hashed once per row group, the row ids per batch
    assert len(hashed) == 2 * 2 + len(batches)


def test_int_ids_pass_through_and_nulls_become_the_missing_id():
    assert as_int_ids(pa.array([7, None, 2**40], pa.int64())).to_pylist() == [7, MISSING_ID, 2**40]
    assert as_int_ids(pa.array(["a", None])).to_pylist()[1] == MISSING_ID
    assert (hash_string_ids(pa.array([f"u{i}" for i in range(10_000)])).to_numpy() >= 0).all()


# ---------------------------------------------------------------------------- normalising values


def _plan(**kw) -> Normaliser:
    base = dict(ids=("ev_id", "device", "sku"), dense=("price",), dense_fill=0.0, label="clicked",
                label_threshold=None, sequence=None, sequence_of=None, delimiter=None)
    return Normaliser(**(base | kw))


def test_nulls_are_values_and_no_row_is_dropped():
    table = _table(700)
    out = normalise(table, _plan(dense_fill=-1.0))
    assert out.num_rows == table.num_rows
    assert out.schema.field("device").type == pa.int64() and out.schema.field("price").type == pa.float32()
    nulls = table.column("device").null_count
    assert nulls > 0 and pc.sum(pc.equal(out.column("device"), MISSING_ID)).as_py() == nulls
    assert pc.sum(pc.equal(out.column("price"), -1.0)).as_py() == table.column("price").null_count == 100
    assert len(set(out.column("ev_id").to_pylist())) == 700  # distinct string row ids stay distinct


@pytest.mark.parametrize(("values", "threshold", "expected"), [
    (pa.array([0, 1, 1]), None, [0, 1, 1]),
    (pa.array([True, False, True]), None, [True, False, True]),
    (pa.array([0.0, 1.0, 0.0]), None, [0.0, 1.0, 0.0]),
    (pa.array([3.5, 4.0, 5.0]), 4.0, [0, 1, 1]),  # rating >= 4
])
def test_label_forms(values, threshold, expected):
    out = normalise(pa.table({"clicked": values}), _plan(label_threshold=threshold))
    assert out.column("clicked").to_pylist() == expected


def test_delimited_sequences_hash_text_ids_and_parse_integer_ones():
    text = sequence_ids(pa.array(["a^b", "", None, "b"]), "^", text_items=True)
    a, b = hash_string_ids(pa.array(["a", "b"])).to_pylist()
    assert text.to_pylist() == [[a, b], [0], [], [b]]
    assert sequence_ids(pa.array(["1^2", "3"]), "^", text_items=False).to_pylist() == [[1, 2], [3]]
    assert sequence_ids(pa.array([["a"], None]), None).to_pylist() == [[a], []]
    with pytest.raises(DataError, match="set features.sequence.delimiter"):
        sequence_ids(pa.array(["1^2"]), None)
    # the items follow the type of the column the sequence shares an embedding with
    table = pa.table({"item": ["a", "b"], "hist": ["a^b", "b"]})
    out = normalise(table, _plan(ids=("item",), sequence="hist", sequence_of="item", delimiter="^"))
    assert out.column("hist").to_pylist() == [[a, b], [b]] and out.column("item").to_pylist() == [a, b]


def test_bad_rows_are_what_really_is_bad():
    rules = validate.RowRules(label="clicked", num_classes=2, ids=("ev_id", "device"), dense=("price",),
                              sequence=None, max_id=100, row_id="ev_id")
    table = pa.table({"ev_id": ["a", None, "c", "d"], "device": ["x", "y", None, "z"],
                      "price": [1.0, 2.0, float("nan"), float("inf")], "clicked": [1, 0, 1, 0]})
    assert validate.bad_row_reasons(table, rules).to_pylist() == [None, "ev_id: null", None, "price: inf"]


# ---------------------------------------------------------------------------- partitions


@pytest.mark.parametrize(("key", "form"), [("dt", "%Y%m%d"), ("ds", "%Y-%m-%d"), ("day", "%Y%m%d"),
                                           ("date", "%Y-%m-%d"), ("pt", "%Y%m%d")])
def test_partition_keys_are_detected(tmp_path, key, form):
    for i, day in enumerate(DAYS):
        (tmp_path / f"{key}={day.strftime(form)}").mkdir()
        pq.write_table(_table(10 + i, i), tmp_path / f"{key}={day.strftime(form)}" / "part-0.parquet")
    (tmp_path / "_SUCCESS").touch()
    source = LogSource(str(tmp_path))
    assert sorted(source.available()) == DAYS
    assert clicklogs.count_rows(source, list(source.inputs(DAYS).values())) == 21


def test_partition_key_that_matches_nothing_lists_what_is_there(tmp_path):
    (tmp_path / "dt=20261101").mkdir()
    with pytest.raises(DataError, match=r"no day partitions \(hour= folders.*found: dt=20261101.*partition_key"):
        LogSource(str(tmp_path), partition_key="hour").available()
    (tmp_path / "ds=2026-11-01").mkdir()
    with pytest.raises(DataError, match="use several keys .*ds, dt.*set data.partition_key"):
        LogSource(str(tmp_path)).available()
    assert list(LogSource(str(tmp_path), partition_key="ds").partitions(str(tmp_path))) == [DAYS[0]]


# ---------------------------------------------------------------------------- time columns


def _flat(tmp_path, times, name="log.parquet") -> str:
    table = _table(len(times)).append_column("ts", times)
    pq.write_table(table, tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("make", [
    lambda s: pa.array(s, pa.int64()),  # unix seconds
    lambda s: pa.array([v * 1000 for v in s], pa.int64()),  # unix ms, detected
    lambda s: pa.array(s, pa.int64()).cast(pa.timestamp("s", "UTC")),
    lambda s: pa.array([dt.datetime.fromtimestamp(v, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") for v in s]),
])
def test_time_column_forms_give_the_same_days(tmp_path, make):
    midnight = int(dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc).timestamp())
    seconds = [midnight - 3600, midnight - 1, midnight, midnight + 5, midnight + 86400]
    source = LogSource(_flat(tmp_path, make(seconds)), time=TimeColumn("ts"))
    assert rows_of(source) == {dt.date(2026, 11, 1): 2, dt.date(2026, 11, 2): 2, dt.date(2026, 11, 3): 1}


def rows_of(source: LogSource) -> dict:
    return {d: clicklogs.count_rows(source, [i]) for d, i in source.available().items()}


def test_time_zone_moves_the_day_boundary(tmp_path):
    # 2026-11-01 20:00 UTC is 2026-11-02 04:00 in Shanghai
    seconds = [int(dt.datetime(2026, 11, 1, 20, tzinfo=dt.timezone.utc).timestamp())]
    path = _flat(tmp_path, pa.array(seconds, pa.int64()))
    assert list(LogSource(path, time=TimeColumn("ts")).available()) == [dt.date(2026, 11, 1)]
    assert list(LogSource(path, time=TimeColumn("ts", timezone="Asia/Shanghai")).available()) == [dt.date(2026, 11, 2)]


@pytest.mark.parametrize("kind", [pa.int64(), "ms", pa.timestamp("s", "UTC"), pa.timestamp("us")])
def test_a_time_window_is_pushed_into_the_parquet_scan(tmp_path, kind):
    """A row group per day: the window's filter keeps only its day's row group, and filter + mask keep the
    same rows as the mask alone."""
    import pyarrow.dataset as pads

    days = [dt.date(2026, 11, d) for d in (1, 2, 3)]
    time = TimeColumn("ts", timezone="Europe/Berlin")
    seconds = np.concatenate([np.arange(*time.day_bounds(d), 7200) for d in days])  # 12 rows a day
    values = pa.array(seconds * 1000 if kind == "ms" else seconds, pa.int64())
    if isinstance(kind, pa.DataType) and pa.types.is_timestamp(kind):
        values = values.cast(pa.timestamp("s", "UTC")).cast(kind)
        if kind.tz is None:  # naive: Berlin wall-clock time
            values = pa.array([v.astimezone(dt.timezone(dt.timedelta(hours=1))).replace(tzinfo=None)
                               for v in values.to_pylist()], kind)
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"ts": values}), path, row_group_size=12)
    (fragment,) = pads.dataset(path).get_fragments()
    expression = time.pushdown(values.type, [days[1]]).to_pyarrow()
    assert [g.id for g in fragment.subset(filter=expression).row_groups] == [1]
    scanned = pads.dataset(path).to_table(filter=expression).column("ts")
    everything = pq.read_table(path).column("ts")
    assert time.mask(scanned, [days[1]]).sum() == time.mask(everything, [days[1]]).sum() == 12 == len(scanned)
    assert time.pushdown(pa.string(), [days[1]]) is None  # text times are parsed, not pruned


def test_unparseable_time_column_names_file_and_column(tmp_path):
    path = _flat(tmp_path, pa.array(["2026-11-01 10:00:00", "yesterday", "2026-11-02 01:00:00"]))
    with pytest.raises(DataError, match=r"data.time_column 'ts' in '.*log.parquet' holds text that is not a time, "
                                        r"e.g. 'yesterday'"):
        LogSource(path, time=TimeColumn("ts")).available()


# ---------------------------------------------------------------------------- CSV


def _csv(path, table: pa.Table, delimiter=",", header=True, gz=False):
    buffer = pa.BufferOutputStream()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(delimiter=delimiter, include_header=header))
    data = buffer.getvalue().to_pybytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def test_csv_schema_reads_ids_as_text_and_counts_rows(tmp_path):
    table = _table(50).set_column(1, "device", pa.array([str(i % 3) for i in range(50)]))  # all-digit ids
    source = LogSource(str(tmp_path), format="csv",
                       csv=CsvOptions(delimiter="\t", text_columns=("ev_id", "device", "sku")))
    uri = _csv(tmp_path / "day.tsv.gz", table, delimiter="\t", gz=True)
    schema = formats.file_schema(source, uri)
    assert schema.field("device").type == pa.string() and schema.field("price").type == pa.float64()
    assert formats.file_rows(source, uri) == 50
    assert formats.read_columns(source, uri, ["price"]).column("price").null_count == 8  # empty cells


def test_headerless_csv_takes_column_names(tmp_path):
    uri = _csv(tmp_path / "x.csv", _table(5), header=False)
    source = LogSource(str(tmp_path), format="csv",
                       csv=CsvOptions(header=False, column_names=("ev_id", "device", "sku", "price", "clicked")))
    assert formats.file_schema(source, uri).names == ["ev_id", "device", "sku", "price", "clicked"]
    assert formats.file_rows(source, uri) == 5


def test_ragged_csv_row_names_file_and_line(tmp_path):
    uri = _csv(tmp_path / "x.csv", _table(5))
    lines = open(uri).read().splitlines()
    lines[3] = lines[3] + ",extra"
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    source = LogSource(str(tmp_path), format="csv")
    with pytest.raises(DataError, match=r"x.csv, line 4: ragged CSV row, 6 fields where the header has 5"):
        formats.locate_csv_error(source, [uri])
    assert formats.file_rows(source, uri) == 5  # the ragged row still counts as an input row


# ---------------------------------------------------------------------------- through Ray Data


def _rules(**kw) -> validate.RowRules:
    base = dict(label="clicked", num_classes=2, ids=("ev_id", "device", "sku"), dense=("price",), sequence=None,
                max_id=2**62, row_id="ev_id")
    return validate.RowRules(**(base | kw))


@pytest.mark.ray
def test_a_ragged_csv_row_is_quarantined_and_the_rest_is_read_normalised(ray_cluster, tmp_path):
    for i, day in enumerate(DAYS):
        (tmp_path / "log" / f"dt={day:%Y%m%d}").mkdir(parents=True)
        _csv(tmp_path / "log" / f"dt={day:%Y%m%d}" / "part-0.csv.gz", _table(40, day=i), gz=True)
    first = tmp_path / "log" / f"dt={DAYS[0]:%Y%m%d}" / "part-0.csv.gz"
    lines = gzip.decompress(first.read_bytes()).decode().splitlines()
    lines[5] += ",surplus"
    first.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    source = LogSource(str(tmp_path / "log"), format="csv", csv=CsvOptions(text_columns=("ev_id", "device", "sku")))
    columns = ["ev_id", "device", "sku", "price", "clicked"]
    dataset = clicklogs.read_click_logs(source, DAYS, columns, rules=_rules(), fail=False,
                                        quarantine_dir=str(tmp_path / "bad"), normaliser=_plan())
    table = pa.concat_tables(dataset.iter_batches(batch_format="pyarrow"))
    assert table.num_rows == 80 - 1  # only the ragged row is gone: nulls are values
    assert all(table.schema.field(c).type == pa.int64() for c in ("ev_id", "device", "sku"))
    assert pc.count(table.column("ev_id"), mode="all").as_py() == len(set(table.column("ev_id").to_pylist()))
    assert pc.sum(pc.equal(table.column("device"), MISSING_ID)).as_py() > 0 and table.column("price").null_count == 0
    quarantined = pa.concat_tables(pq.read_table(p) for p in (tmp_path / "bad").glob("*.parquet"))
    assert quarantined.column("text").to_pylist() == [lines[5]] and quarantined.column("line").to_pylist() == [6]


@pytest.mark.ray
def test_a_flat_parquet_log_reads_each_day_by_its_time_column(ray_cluster, tmp_path):
    time = TimeColumn("ts", timezone="America/New_York")
    seconds = np.concatenate([np.arange(*time.day_bounds(d), 3600) for d in DAYS])  # a row an hour
    path = tmp_path / "flat.parquet"
    pq.write_table(_table(len(seconds)).append_column("ts", pa.array(seconds, pa.int64())), path, row_group_size=24)
    hours = {DAYS[0]: 25, DAYS[1]: 24}  # New York leaves summer time on 2026-11-01
    source = LogSource(str(path), time=time)
    for day in DAYS:
        dataset = clicklogs.read_click_logs(source, [day], ["ev_id", "clicked"], rules=_rules(ids=("ev_id",),
                                            dense=()), normaliser=_plan(ids=("ev_id",), dense=()))
        assert dataset.count() == hours[day]


@needs_shared
@pytest.mark.ray
def test_criteo_raw_hex_ids_and_nulls_read_as_they_are(ray_cluster):
    path = str(SHARED / "criteo" / "criteo_raw_tiny.parquet")
    raw = pq.read_table(path)
    source = LogSource({dt.date(2026, 1, 1): path})
    categorical, dense = [f"C{i}" for i in range(1, 27)], [f"I{i}" for i in range(1, 14)]
    plan = Normaliser(ids=("Id", *categorical), dense=tuple(dense), dense_fill=0.0, label="Label",
                      label_threshold=None, sequence=None, sequence_of=None, delimiter=None)
    dataset = clicklogs.read_click_logs(source, [dt.date(2026, 1, 1)], ["Id", "Label", *categorical, *dense],
                                        rules=_rules(label="Label", ids=("Id", *categorical), dense=tuple(dense),
                                                     row_id="Id"), normaliser=plan)
    table = pa.concat_tables(dataset.iter_batches(batch_format="pyarrow"))
    assert table.num_rows == raw.num_rows == 1999
    for column in categorical:
        assert table.schema.field(column).type == pa.int64()
        assert (pc.sum(pc.equal(table.column(column), MISSING_ID)).as_py() or 0) == raw.column(column).null_count
        assert pc.count_distinct(table.column(column)).as_py() == pc.count_distinct(raw.column(column), mode="all").as_py()
    assert table.column("I12").null_count == 0 and pc.sum(pc.equal(table.column("I12"), 0.0)).as_py() >= 1554
