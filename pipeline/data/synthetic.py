"""Deterministic synthetic e-commerce click logs with a known true CTR: the default data set.

Each day becomes one Parquet partition ``<out_dir>/date=YYYY-MM-DD/part-00000.parquet``, drawn from
a world and a hidden click model (`pipeline.data.synthetic_world`) that depend on the seed alone, so a
model that only memorises ids stays clearly below the ceiling ``roc_auc(clicked, true_ctr)``.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.synthetic_world import MAX_ROWS_PER_DAY, PRIVILEGED_COLUMN, SYNTHETIC_COLUMNS, build_world, day_table
from pipeline.metrics import auc

__all__ = ["PRIVILEGED_COLUMN", "SYNTHETIC_COLUMNS", "ceiling_auc", "generate_click_logs"]

_ROW_GROUP_SIZE = 65_536  # fixed so the same rows always give the same bytes


def _write_atomic(table: pa.Table, path: str) -> None:
    """Writes to a temp name in the same dir, then renames, so a crash never leaves a half file."""
    # A leading dot hides the temp file from Parquet dataset discovery while it is being written.
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, row_group_size=_ROW_GROUP_SIZE, compression="snappy")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_args(days: int, rows_per_day: int, users: int, items: int, categories: int,
                seq_len: int) -> None:
    """Raises ValueError, saying what to change, when a size is out of range."""
    sizes = dict(days=days, rows_per_day=rows_per_day, users=users, categories=categories,
                 seq_len=seq_len)
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}")
    if rows_per_day >= MAX_ROWS_PER_DAY:
        raise ValueError(f"`rows_per_day` must be < 10**9 to keep event_id unique, got {rows_per_day}")
    if items < categories:
        raise ValueError(f"items ({items}) must be >= categories ({categories}) so every category "
                         "has an item; raise `items` or lower `categories`")


def generate_click_logs(out_dir: str, *, start_date: datetime.date, days: int, rows_per_day: int,
                        users: int = 5000, items: int = 20000, categories: int = 50,
                        seq_len: int = 10, seed: int = 0, drift: float = 0.0, privileged: bool = False) -> list[str]:
    """Writes synthetic click logs, one Parquet partition per day.

    The world (users, items, latent vectors) depends only on ``seed`` and the sizes; each day's
    impressions depend on ``seed`` and the date (its ordinal is the day index), so a date's data is
    the same whatever ``start_date`` it was generated from, and ``event_id`` (day index * 10**9 +
    row) is unique across dates.

    Args:
        out_dir: Root directory; created with its parents if missing.
        start_date: The first day written.
        days: Number of consecutive days.
        rows_per_day: Impressions per day.
        users: Number of users; ids are 1..users.
        items: Number of items; ids are 1..items (0 is the history padding).
        categories: Number of categories; ids are 1..categories.
        seq_len: Length of ``hist_item_ids`` (most recent first, padded with 0).
        seed: Seed of the world and of every day.
        drift: Radians per day by which user tastes rotate (0: a stationary world); e.g. 0.05 moves
            tastes noticeably within a couple of weeks, so nightly retraining has something to learn.
        privileged: Adds PRIVILEGED_COLUMN (`affinity_hint`): a noisy view of the hidden user-item affinity,
            for a teacher's extra features (privileged-feature distillation); the other columns stay the same.

    Returns:
        The partition directories ``<out_dir>/date=YYYY-MM-DD``, in date order.

    Raises:
        ValueError: If a size is out of range.
    """
    _check_args(days, rows_per_day, users, items, categories, seq_len)
    world = build_world(seed, users, items, categories, seq_len)
    partitions = []
    for offset in range(days):  # one day in memory at a time
        date = start_date + datetime.timedelta(days=offset)
        part_dir = os.path.join(out_dir, f"date={date.isoformat()}")
        os.makedirs(part_dir, exist_ok=True)
        table = day_table(world, date.toordinal(), seed, rows_per_day, seq_len, drift, privileged)
        _write_atomic(table, os.path.join(part_dir, "part-00000.parquet"))
        partitions.append(part_dir)
    return partitions


def ceiling_auc(clicked, true_ctr) -> float:
    """ROC AUC of the true CTR against the clicks: the best AUC any model can expect.

    Args:
        clicked: 0/1 labels (array-like).
        true_ctr: The hidden true click probabilities (array-like).

    Returns:
        ``auc(clicked, true_ctr)`` (`pipeline.metrics.auc`, the ROC AUC).
    """
    return auc(np.asarray(clicked), np.asarray(true_ctr))
