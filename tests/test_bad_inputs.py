"""Bad inputs no other test file covers, one test each (the README's "Every bad input and fault" table lists
them with the rest): the message names what is wrong, where, and how to fix it, and nothing is written.

Spec rules, click-log files (real Parquet, CSV and gzip files under tmp_path), S3 settings and commands used
on the wrong spec. Fast: no Ray.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.data import clicklogs
from pipeline.data.normalise import Normaliser, normalise
from pipeline.data.sources import LogSource, TimeColumn
from pipeline.errors import DataError, SpecError
from pipeline.spec import load_spec, parse_spec
from tests.conftest import free_port

DAYS = [dt.date(2026, 11, 1)]
NOON = int(dt.datetime(2026, 11, 1, 12, tzinfo=dt.timezone.utc).timestamp())


@pytest.fixture
def raw(tiny_spec_dict) -> dict:
    return copy.deepcopy(tiny_spec_dict)


def _spec_error(raw: dict, match: str) -> str:
    with pytest.raises(SpecError, match=match) as info:
        parse_spec(raw)
    return str(info.value)


def _write_spec(tmp_path: Path, raw: dict, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _exits_2(capsys, args: list[str]) -> str:
    """Runs the CLI; checks exit code 2 and no traceback; returns stderr."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------- spec


def test_an_empty_spec_file_is_not_a_spec(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError, match=r"empty\.yaml: the spec must be a YAML mapping of sections, got NoneType"):
        load_spec(path)


def test_an_override_into_a_value_that_is_not_a_section(tmp_path, raw):
    with pytest.raises(SpecError, match=r"override 'name\.x=1': 'name' is not a section"):
        load_spec(_write_spec(tmp_path, raw), ["name.x=1"])


def test_an_impossible_calendar_day(raw):
    raw["data"]["train_days"] = {"start": "2026-02-30", "end": "2026-03-01"}
    _spec_error(raw, r"data\.train_days\.start: .*day value is outside expected range \(got '2026-02-30'\)")


def test_a_value_not_among_the_choices_lists_them(raw):
    raw["data"]["on_bad_rows"] = "skip"
    _spec_error(raw, r"data\.on_bad_rows: Input should be 'fail' or 'quarantine' \(got 'skip'\)")


def test_the_label_listed_as_a_feature(raw):
    raw["features"]["label"] = "price"
    _spec_error(raw, r"features: label column 'price' is also a feature; remove it from the feature lists")


def test_data_path_and_data_partitions_together(raw):
    raw["data"]["partitions"] = {"2026-11-01": "a.parquet"}
    _spec_error(raw, r"data: give data\.path .* or data\.partitions .*, not both or neither")


def test_a_job_name_that_is_a_path(raw):
    raw["name"] = "../elsewhere"
    _spec_error(raw, r"name: '\.\./elsewhere' is not a job name: use letters, digits.*\(it names directories\)")


def test_a_bst_teacher_without_a_behaviour_sequence(raw):
    """Once passed by the spec and then failed inside a Ray Train worker; now refused by the spec."""
    raw["features"].pop("sequence")
    raw["teacher"].update(model="bst", sequence_pooling="mean")
    _spec_error(raw, r"teacher\.model: bst reads a behaviour sequence, but this teacher has none; add "
                     r"features\.sequence .* or choose dcn_v2 or deepfm")


def test_a_synthetic_log_with_more_categories_than_items(tmp_path, raw, capsys):
    """Once passed by the spec and then stopped `distill generate` with a ValueError traceback."""
    raw["data"]["synthetic"].update(items=10, categories=12)
    _spec_error(raw, r"data\.synthetic: items \(10\) must be >= categories \(12\) .*raise items or lower categories")
    err = _exits_2(capsys, ["generate", _write_spec(tmp_path, raw)])
    assert "data.synthetic: items (10)" in err
    assert not Path(raw["data"]["path"]).exists()  # nothing generated


# ---------------------------------------------------------------------------- data


def _day_table(rows: int = 3) -> pa.Table:
    return pa.table({"event_id": list(range(rows)), "ts": [NOON + i for i in range(rows)],
                     "clicked": [i % 2 for i in range(rows)]})


def test_a_partition_folder_that_names_no_real_day(tmp_path):
    (tmp_path / "date=2026-13-45").mkdir()
    pq.write_table(_day_table(), tmp_path / "date=2026-13-45" / "part-0.parquet")
    with pytest.raises(DataError, match=rf"partition '{tmp_path}/date=2026-13-45' names no real day; rename it "
                                        r"\(YYYY-MM-DD or YYYYMMDD\)"):
        clicklogs.partition_paths(str(tmp_path), DAYS)


def test_data_partitions_naming_a_file_that_does_not_exist(tmp_path):
    gone = str(tmp_path / "gone.parquet")
    with pytest.raises(DataError, match=r"data\.partitions names paths that do not exist: \{'2026-11-01': "
                                        rf"'{gone}'\}}; fix the paths"):
        clicklogs.partition_paths({DAYS[0]: gone}, DAYS)


def _flat_log(tmp_path: Path, ts: pa.Array, name: str = "log.parquet") -> str:
    pq.write_table(pa.table({"ts": ts, "clicked": [0] * len(ts)}), tmp_path / name)
    return str(tmp_path / name)


def test_a_time_column_that_is_all_null(tmp_path):
    path = _flat_log(tmp_path, pa.array([None, None], pa.int64()))
    with pytest.raises(DataError, match=r"data\.time_column 'ts' of the logs under .*log\.parquet' holds no times "
                                        r"\(every value is null\); point data\.time_column at the event time"):
        LogSource(path, time=TimeColumn("ts")).available()


def test_a_time_column_that_holds_no_times(tmp_path):
    path = _flat_log(tmp_path, pa.array([True, False]))
    with pytest.raises(DataError, match=r"data\.time_column 'ts' in '.*log\.parquet' has type bool; expected unix "
                                        r"seconds or ms .*set data\.time_column to such a column"):
        LogSource(path, time=TimeColumn("ts")).available()


@pytest.mark.parametrize("form", ["parquet", "csv"])
def test_a_time_column_the_file_lacks(tmp_path, form):
    """Once pyarrow's "No match for FieldRef" (Parquet) or a KeyError traceback (CSV)."""
    table = pa.table({"t": [NOON], "clicked": [1]})
    path = tmp_path / f"log.{form}"
    pq.write_table(table, path) if form == "parquet" else pacsv.write_csv(table, path)
    with pytest.raises(DataError, match=rf"data\.time_column 'ts' is not a column of '{path}'; columns present: "
                                        r"\['t', 'clicked'\]; set data\.time_column to the event-time column"):
        LogSource(str(path), format=form, time=TimeColumn("ts")).available()


def _flat_spec(tmp_path: Path, raw: dict, path: Path, source: str = "parquet") -> str:
    raw["data"].update(source=source, path=str(path), time_column="ts")
    return _write_spec(tmp_path, raw)


def test_a_truncated_flat_log_read_by_its_time_column(tmp_path, raw, capsys):
    """Once a pyarrow traceback from `distill validate --data` and `distill run`: the time column is read
    before the footer checks."""
    (tmp_path / "log").mkdir()
    good = tmp_path / "good.parquet"
    pq.write_table(_day_table(100), good)
    data = good.read_bytes()
    (tmp_path / "log" / "part-0.parquet").write_bytes(data[: len(data) // 2])
    err = _exits_2(capsys, ["validate", _flat_spec(tmp_path, raw, tmp_path / "log"), "--data"])
    assert f"{tmp_path}/log/part-0.parquet is not a readable Parquet file, truncated or corrupt" in err
    assert "rewrite it, or remove it from its partition" in err


def test_an_empty_csv_file(tmp_path, raw, capsys):
    """A zero-byte CSV (a failed export): once an ArrowInvalid traceback from `inspect` and a flat-log read."""
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "day.csv").write_bytes(b"")
    expected = f"{tmp_path}/log/day.csv is not a readable CSV file, truncated or corrupt (Empty CSV file)"
    assert expected in _exits_2(capsys, ["inspect", str(tmp_path / "log")])
    assert expected in _exits_2(capsys, ["validate", _flat_spec(tmp_path, raw, tmp_path / "log", "csv"), "--data"])


def test_a_corrupt_gzip_csv_is_named_once_per_file(tmp_path, raw, capsys):
    """Once a BadGzipFile traceback from `distill validate --data` (its row sample read the file again)."""
    days = ("2026-11-01", "2026-11-02", "2026-11-03")
    for day in days:
        (tmp_path / "log" / f"date={day}").mkdir(parents=True)
        (tmp_path / "log" / f"date={day}" / "part-0.csv.gz").write_bytes(b"plain text, not gzip")
    raw["data"].update(source="csv", path=str(tmp_path / "log"))
    err = _exits_2(capsys, ["validate", _write_spec(tmp_path, raw), "--data"])
    assert "3 problems with the click logs" in err
    for day in days:
        named = f"{tmp_path}/log/date={day}/part-0.csv.gz is not a readable CSV file, truncated or corrupt"
        assert err.count(named) == 1
    assert not (tmp_path / "runs").exists()  # validate writes nothing


def test_csv_files_where_parquet_is_expected(tmp_path):
    (tmp_path / "date=2026-11-01").mkdir()
    pacsv.write_csv(_day_table(), tmp_path / "date=2026-11-01" / "part-0.csv")
    with pytest.raises(DataError, match=r"date=2026-11-01' holds no \.parquet files; remove it or rewrite it "
                                        r"\(CSV logs need data\.source: csv\)"):
        clicklogs.count_rows(list(clicklogs.partition_paths(str(tmp_path), DAYS).values()))


def test_a_zero_byte_parquet_file(tmp_path):
    partition = tmp_path / "date=2026-11-01"
    partition.mkdir()
    (partition / "part-0.parquet").write_bytes(b"")  # an upload that never wrote a byte
    with pytest.raises(DataError, match=rf"{partition}/part-0\.parquet is not a readable Parquet file, truncated "
                                        r"or corrupt \(Parquet file size is 0 bytes\); rewrite it"):
        clicklogs.count_rows([str(partition)])


def test_text_sequence_ids_against_integer_item_ids():
    plan = Normaliser(ids=("item",), dense=(), dense_fill=0.0, label="clicked", label_threshold=None,
                      sequence="hist", sequence_of="item", delimiter="^")
    with pytest.raises(DataError, match=r"sequence column 'hist' holds text ids, but the column it shares an "
                                        r"embedding with holds integers; write that column's ids as text too"):
        normalise(pa.table({"item": [1, 2], "hist": ["a^b", "c"], "clicked": [0, 1]}), plan)


# ---------------------------------------------------------------------------- storage


@pytest.fixture
def bare_aws(tmp_path, monkeypatch):
    """No AWS credentials anywhere, and an endpoint of this test's own (s3fs caches clients per endpoint)."""
    for name in [n for n in os.environ if n.startswith(("AWS_", "DISTILL_S3_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup, no wait
    monkeypatch.setenv("DISTILL_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    return monkeypatch


def test_an_s3_path_without_aws_credentials(bare_aws):
    with pytest.raises(DataError, match=r"no AWS credentials found for s3://clicks/log; export AWS_ACCESS_KEY_ID "
                                        r"and AWS_SECRET_ACCESS_KEY, or set AWS_PROFILE"):
        clicklogs.partition_paths("s3://clicks/log", DAYS)


def test_an_aws_profile_that_does_not_exist(bare_aws):
    bare_aws.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(DataError, match=r"AWS profile 'no-such-profile' not found \(for s3://clicks/log\); fix "
                                        r"storage\.profile or AWS_PROFILE"):
        clicklogs.partition_paths("s3://clicks/log", DAYS)


def test_scoring_with_a_directory_that_holds_no_export(tmp_path, capsys):
    log = _flat_log(tmp_path, pa.array([NOON]))
    err = _exits_2(capsys, ["score", str(tmp_path), log, "--out", str(tmp_path / "scored.parquet")])
    assert f"{tmp_path} holds no signature.json, so it is not an exported model; make one with `distill export" in err
    assert not (tmp_path / "scored.parquet").exists()


# ---------------------------------------------------------------------------- commands on the wrong spec


def test_generate_with_a_spec_that_reads_real_logs(tmp_path, raw, capsys):
    raw["data"]["source"] = "parquet"
    err = _exits_2(capsys, ["generate", _write_spec(tmp_path, raw)])
    assert "data.source is 'parquet'; `distill generate` needs data.source: synthetic" in err
    assert not Path(raw["data"]["path"]).exists()


@pytest.mark.parametrize(("command", "shown"), [
    (["nightly"], "has no schedule section; `distill nightly` needs one (see jobs/nightly.yaml)"),
    (["registry", "{spec}", "list"], "has no schedule section, so no registry; add schedule.registry"),
    (["history"], "has no schedule section, so no nightly history; add one"),
])
def test_nightly_commands_on_a_spec_without_a_schedule(tmp_path, raw, capsys, command, shown):
    spec = _write_spec(tmp_path, raw)
    args = [a.format(spec=spec) for a in command] if "{spec}" in command else [*command, spec]
    assert f"{spec} {shown}" in _exits_2(capsys, args)
    assert not Path(raw["output"]["root"]).exists()


def test_registry_promote_without_a_version(tmp_path, raw, capsys):
    raw["schedule"] = {"registry": str(tmp_path / "registry")}
    err = _exits_2(capsys, ["registry", _write_spec(tmp_path, raw), "promote"])
    assert "`distill registry promote` needs a version id (see `distill registry list`)" in err
    assert not (tmp_path / "registry").exists()
