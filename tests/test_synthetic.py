"""Tests for pipeline.data.synthetic: determinism, schema, partition layout and click statistics."""

import datetime
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.synthetic import SYNTHETIC_COLUMNS, ceiling_auc, generate_click_logs

START = datetime.date(2024, 3, 30)
SMALL = dict(users=300, items=1000, categories=12, seq_len=6)

EXPECTED_TYPES = {
    "event_id": pa.int64(), "user_id": pa.int64(), "item_id": pa.int64(),
    "category_id": pa.int64(), "hour": pa.int64(), "device": pa.int64(), "position": pa.int64(),
    "price": pa.float32(), "user_activity": pa.float32(), "item_popularity": pa.float32(),
    "clicked": pa.int64(), "true_ctr": pa.float32(),
}


@pytest.fixture
def click_logs(tmp_path):
    """Builder: writes click logs under a fresh dir; each test sets only what it cares about."""
    counter = iter(range(1000))

    def build(days=2, rows_per_day=500, start_date=START, **kwargs):
        out_dir = str(tmp_path / f"logs{next(counter)}" / "nested")
        return generate_click_logs(out_dir, start_date=start_date, days=days,
                                   rows_per_day=rows_per_day, **{**SMALL, **kwargs})

    return build


def _read(partitions):
    return pa.concat_tables([pq.read_table(os.path.join(p, "part-00000.parquet")) for p in partitions])


def _file_bytes(partitions):
    return [open(os.path.join(p, "part-00000.parquet"), "rb").read() for p in partitions]


def test_same_seed_gives_identical_bytes(click_logs):
    assert _file_bytes(click_logs(seed=3)) == _file_bytes(click_logs(seed=3))


def test_different_seed_gives_different_data(click_logs):
    first, second = _read(click_logs(seed=3)), _read(click_logs(seed=4))
    assert not first["clicked"].equals(second["clicked"])
    assert not first["item_id"].equals(second["item_id"])


def test_days_differ_but_share_the_world(click_logs):
    day_a, day_b = (pq.read_table(os.path.join(p, "part-00000.parquet")) for p in click_logs())
    assert not day_a["item_id"].equals(day_b["item_id"])
    # Per-item features come from the world, drawn once: the same item has the same price every day.
    prices = {}
    for table in (day_a, day_b):
        for item, price in zip(table["item_id"].to_pylist(), table["price"].to_pylist()):
            assert prices.setdefault(item, price) == price


def test_a_date_does_not_depend_on_start_date(click_logs):
    from_start = click_logs(days=2)
    from_second_day = click_logs(days=1, start_date=START + datetime.timedelta(days=1))
    assert _file_bytes(from_start)[1:] == _file_bytes(from_second_day)


def test_partitions_are_dated_in_order(click_logs, tmp_path):
    partitions = click_logs(days=3)  # crosses a month boundary
    names = [os.path.basename(p) for p in partitions]
    assert names == ["date=2024-03-30", "date=2024-03-31", "date=2024-04-01"]
    root = os.path.dirname(partitions[0])
    assert sorted(os.listdir(root)) == names
    for part in partitions:  # no temp file is left beside the data
        assert os.listdir(part) == ["part-00000.parquet"]


def test_schema_and_value_ranges(click_logs):
    table = _read(click_logs(days=2, rows_per_day=2000))
    assert tuple(table.column_names) == SYNTHETIC_COLUMNS
    for name, dtype in EXPECTED_TYPES.items():
        assert table.schema.field(name).type == dtype, name
    hist_type = table.schema.field("hist_item_ids").type
    assert pa.types.is_list(hist_type) and hist_type.value_type == pa.int64()

    col = {name: table[name].to_numpy() for name in EXPECTED_TYPES}
    assert len(np.unique(col["event_id"])) == len(table)
    for name, lo, hi in [("user_id", 1, SMALL["users"]), ("item_id", 1, SMALL["items"]),
                         ("category_id", 1, SMALL["categories"]), ("hour", 0, 23),
                         ("device", 0, 2), ("position", 1, 10), ("clicked", 0, 1)]:
        assert lo <= col[name].min() and col[name].max() <= hi, name
    assert (col["price"] > 0).all()
    assert ((col["true_ctr"] > 0) & (col["true_ctr"] < 1)).all()

    hist = table["hist_item_ids"].combine_chunks()
    assert (hist.value_lengths().to_numpy() == SMALL["seq_len"]).all()
    seqs = hist.values.to_numpy().reshape(len(table), SMALL["seq_len"])
    assert seqs.min() >= 0 and seqs.max() <= SMALL["items"]
    # Padding (0) only trails the real clicks.
    assert not ((seqs[:, :-1] == 0) & (seqs[:, 1:] != 0)).any()


def test_item_has_fixed_category(click_logs):
    table = _read(click_logs(days=2, rows_per_day=2000))
    pairs = np.unique(np.stack([table["item_id"].to_numpy(), table["category_id"].to_numpy()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]


def test_click_rate_and_ceiling_auc_with_defaults(tmp_path):
    partitions = generate_click_logs(str(tmp_path), start_date=START, days=2, rows_per_day=20_000)
    table = _read(partitions)
    clicked, true_ctr = table["clicked"].to_numpy(), table["true_ctr"].to_numpy()
    assert 0.02 <= clicked.mean() <= 0.08
    assert 0.75 <= ceiling_auc(clicked, true_ctr) <= 0.85


def test_impressions_are_skewed_towards_popular_items(tmp_path):
    partitions = generate_click_logs(str(tmp_path), start_date=START, days=1, rows_per_day=20_000)
    counts = np.sort(np.bincount(_read(partitions)["item_id"].to_numpy()))[::-1]
    # Under uniform traffic the top 1% of 20k items would get about 1% of impressions.
    assert counts[:200].sum() > 0.2 * counts.sum()


def test_ceiling_auc_matches_a_perfect_ranking():
    assert ceiling_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(days=0), "`days`"),
    (dict(seq_len=0), "seq_len"),
    (dict(rows_per_day=0), "rows_per_day"),
    (dict(items=5, categories=12), "categories"),
])
def test_rejects_bad_sizes(click_logs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        click_logs(**kwargs)


def test_drift_changes_tastes_slowly_and_zero_drift_changes_nothing(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    day = datetime.date(2026, 11, 1)
    kwargs = dict(start_date=day, days=1, rows_per_day=4000, users=300, items=1000, categories=10, seed=3)
    still = generate_click_logs(str(tmp_path / "a"), **kwargs)[0]
    zero = generate_click_logs(str(tmp_path / "b"), drift=0.0, **kwargs)[0]
    moved = generate_click_logs(str(tmp_path / "c"), drift=0.05, **kwargs)[0]

    def ctr(path):
        return pq.read_table(f"{path}/part-00000.parquet").column("true_ctr").to_numpy()

    assert (ctr(still) == ctr(zero)).all()
    # Same impressions (the day's draws do not depend on drift), different click probabilities.
    assert pq.read_table(f"{still}/part-00000.parquet").column("item_id").equals(
        pq.read_table(f"{moved}/part-00000.parquet").column("item_id"))
    assert np.corrcoef(ctr(still), ctr(moved))[0, 1] < 0.99
