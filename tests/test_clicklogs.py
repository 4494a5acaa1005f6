"""Reading click logs: partition selection, clear errors, column projection through Ray Data."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.data import clicklogs
from pipeline.errors import DataError

NOV = [dt.date(2026, 11, d) for d in (1, 2, 3)]


def test_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match=r"click-log path '.*nowhere' does not exist"):
        clicklogs.partition_paths(str(tmp_path / "nowhere"), NOV)


def test_directory_without_partitions(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no date=YYYY-MM-DD partitions"):
        clicklogs.partition_paths(str(tmp_path / "empty"), NOV)


def test_missing_days_listed_with_what_exists(click_logs):
    root = click_logs(days=2)
    with pytest.raises(DataError, match=r"missing click-log partitions .*: 2026-11-03; available days: "
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


@pytest.mark.ray
def test_read_streams_only_the_selected_days_and_columns(ray_cluster, click_logs):
    root = click_logs(days=3, rows=300)
    dataset = clicklogs.read_click_logs(root, NOV[1:], ["user_id", "clicked"])
    assert dataset.count() == 600
    names = dataset.schema().names
    assert "user_id" in names and "clicked" in names and "price" not in names and "true_ctr" not in names
