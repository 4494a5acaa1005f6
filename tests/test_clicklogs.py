"""Reading click logs: partition selection, clear errors, column projection through Ray Data."""

from __future__ import annotations

import datetime as dt

import pyarrow.parquet as pq
import pytest

from pipeline.data import clicklogs, validate
from pipeline.errors import DataError
from tests.conftest import ROOT

NOV = [dt.date(2026, 11, d) for d in (1, 2, 3)]


def test_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match=r"click-log path '.*nowhere' does not exist"):
        clicklogs.partition_paths(str(tmp_path / "nowhere"), NOV)


def test_directory_without_partitions(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no day partitions \(date=, dt=, ds=, day= or pt= folders .*found: nothing.*partition_key.*time_column.*partitions"):
        clicklogs.partition_paths(str(tmp_path / "empty"), NOV)


def test_missing_days_listed_with_what_exists(click_logs):
    root = click_logs(days=2)
    with pytest.raises(DataError, match=r"missing click-log days .*: 2026-11-03; available days: "
                                        r"2026-11-01, 2026-11-02"):
        clicklogs.partition_paths(root, NOV)


def test_empty_partition_is_an_error(click_logs, tmp_path):
    root = click_logs(days=1)
    (tmp_path / "e" / "date=2026-11-01").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no .parquet files"):
        clicklogs.count_rows([str(tmp_path / "e" / "date=2026-11-01")])
    assert clicklogs.count_rows(list(clicklogs.partition_paths(root, NOV[:1]).values())) == 500


def test_missing_columns_listed_with_what_exists(click_logs):
    paths = list(clicklogs.partition_paths(click_logs(days=1), NOV[:1]).values())
    with pytest.raises(DataError, match=r"lack column\(s\) \['brand_id'\]; columns present: \['event_id'"):
        clicklogs.check_columns(paths, ["user_id", "brand_id"])


def test_every_file_is_checked_not_only_the_first(click_logs):
    paths = list(clicklogs.partition_paths(click_logs(days=2), NOV[:2]).values())
    (later,) = validate.parquet_files(paths[1:])
    pq.write_table(pq.read_table(later).drop_columns(["price"]), later)  # only day 2 lacks it
    with pytest.raises(DataError, match=rf"click logs at '{later}' lack column\(s\) \['price'\]"):
        clicklogs.check_columns(paths, ["user_id", "price"])


def test_checks_and_row_counts_come_from_the_footers(click_logs):
    paths = list(clicklogs.partition_paths(click_logs(days=2, rows=300), NOV[:2]).values())
    assert clicklogs.count_rows(paths) == 600 and clicklogs.partition_fingerprint(paths[0], paths[0])["rows"] == 300
    assert clicklogs.check_columns is validate.check_columns
    footers = clicklogs.check_columns(paths, ["user_id"])
    assert [(f.partition, f.rows, f.row_groups) for f in footers] == [(p, 300, 1) for p in paths]


@pytest.mark.ray
def test_read_streams_only_the_selected_days_and_columns(ray_cluster, click_logs):
    root = click_logs(days=3, rows=300)
    dataset = clicklogs.read_click_logs(root, NOV[1:], ["user_id", "clicked"])
    assert dataset.count() == 600
    names = dataset.schema().names
    assert "user_id" in names and "clicked" in names and "price" not in names and "true_ctr" not in names


CRITEO = ROOT.parent / "shared" / "data" / "criteo"


@pytest.mark.skipif(not CRITEO.is_dir(), reason="the shared Criteo sample is not next to this checkout")
def test_criteo_sample_job_reads_the_real_files(monkeypatch):
    """jobs/criteo-sample.yaml maps two flat files to two days; its inputs pass every footer check."""
    from pipeline.stages.click_logs import check_inputs
    from pipeline.spec import load_spec

    monkeypatch.chdir(ROOT)  # the spec's paths are relative to the project root
    spec = load_spec(ROOT / "jobs" / "criteo-sample.yaml")
    check_inputs(spec)
    paths = clicklogs.partition_paths(spec.data.location, spec.data.all_days())
    assert [clicklogs.count_rows([p]) for p in paths.values()] == [10_000, 10_000]
    moved = load_spec(ROOT / "jobs" / "criteo-sample.yaml",
                      [f"data.partitions={{2026-01-01: {CRITEO}/criteo_indexed_test.parquet, "
                       f"2026-01-02: {CRITEO}/criteo_indexed_train.parquet}}"])
    assert str(moved.data.location[dt.date(2026, 1, 1)]).endswith("criteo_indexed_test.parquet")
