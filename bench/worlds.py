"""The quality benchmark's data sets besides the demo world, written as `date=YYYY-MM-DD` Parquet partitions.

- `marketplace_world`: a second synthetic world whose click model is built differently from the demo's
  (pipeline/data/synthetic_world.py): a search marketplace with queries instead of users, a cascade
  examination that depends on slot *and* device, query-product relevance through latent factors, a
  brand x region preference table, a discount effect that depends on the product's rating, and a shipping
  penalty that depends on the region. It writes `true_ctr`, so the report has a ceiling AUC.
- `movielens_days`: the MovieLens ratings (../shared/data) cut into equal time slices by timestamp, one
  slice a "day", so training is on the past and evaluation on the latest ratings.
- `criteo_with_ids`: the Criteo sample's two files with a row id, which the hash validation split needs.

Each returns the partition map (`data.partitions`) and is idempotent: written once under `root`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FIRST_DAY = dt.date(2026, 1, 1)
MARKETPLACE_COLUMNS = ("event_id", "query_id", "shop_id", "product_id", "brand_id", "region", "weekday", "slot",
                       "device", "discount", "rating", "shipping_days", "clicked", "true_ctr")


def _write_days(root: Path, tables: list[pa.Table]) -> dict[str, str]:
    partitions = {}
    for index, table in enumerate(tables):
        day = (FIRST_DAY + dt.timedelta(days=index)).isoformat()
        path = root / f"date={day}" / "part-0.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        partitions[day] = str(path)
    return partitions


def marketplace_world(root: Path, days: int = 4, rows_per_day: int = 50_000, seed: int = 11) -> dict[str, str]:
    """{day: parquet path} of the marketplace world's click log (the world fixed by `seed`)."""
    rng = np.random.default_rng(seed)
    queries, products, shops, brands, regions, latent = 2_000, 30_000, 3_000, 400, 30, 6
    query_vec = rng.normal(0, 1, (queries, latent))
    product_vec = rng.normal(0, 1, (products, latent))
    product_shop = rng.integers(0, shops, products)
    product_brand = rng.zipf(1.6, products) % brands
    product_rating = np.clip(rng.normal(4.0, 0.6, products), 1, 5)
    brand_region = rng.normal(0, 0.8, (brands, regions))  # regional brand preference
    shop_quality = rng.normal(0, 0.5, shops)
    region_shipping = rng.uniform(0.02, 0.25, regions)  # how much a region minds slow shipping
    query_popularity = rng.zipf(1.3, queries * 4) % queries
    tables = []
    for day in range(days):
        day_rng = np.random.default_rng([seed, day])
        n = rows_per_day
        query = day_rng.choice(query_popularity, n)
        # products shown for a query: near its latent direction (a retrieval stage), with noise
        candidates = day_rng.integers(0, products, (n, 8))
        scores = np.einsum("nd,nkd->nk", query_vec[query], product_vec[candidates])
        product = candidates[np.arange(n), scores.argmax(axis=1)]
        slot = day_rng.integers(1, 21, n)
        device = day_rng.choice(3, n, p=[0.6, 0.3, 0.1])  # app, mobile web, desktop
        region = day_rng.integers(0, regions, n)
        discount = np.round(day_rng.beta(1.2, 5, n), 2)
        shipping = day_rng.integers(1, 11, n)
        # cascade examination: steeper on small screens
        decay = np.array([0.55, 0.9, 0.35])[device]
        examine = 1.0 / slot ** decay
        relevance = np.einsum("nd,nd->n", query_vec[query], product_vec[product]) / np.sqrt(latent)
        rating = product_rating[product]
        attract = (1.1 * relevance + brand_region[product_brand[product], region] + shop_quality[product_shop[product]]
                   + discount * (rating - 3.0) * 2.5  # a discount sells a good product, not a bad one
                   - region_shipping[region] * shipping - 2.6)
        true_ctr = examine * (1 / (1 + np.exp(-attract)))
        clicked = (day_rng.random(n) < true_ctr).astype(np.int64)
        tables.append(pa.table({
            "event_id": np.arange(n, dtype=np.int64) + day * 10**9, "query_id": query.astype(np.int64),
            "shop_id": product_shop[product].astype(np.int64), "product_id": product.astype(np.int64),
            "brand_id": product_brand[product].astype(np.int64), "region": region.astype(np.int64),
            "weekday": np.full(n, (FIRST_DAY + dt.timedelta(days=day)).weekday(), dtype=np.int64),
            "slot": slot.astype(np.int64), "device": device.astype(np.int64),
            "discount": discount.astype(np.float32), "rating": np.round(rating, 1).astype(np.float32),
            "shipping_days": shipping.astype(np.float32), "clicked": clicked,
            "true_ctr": true_ctr.astype(np.float32)}))
    return _write_days(root / f"marketplace-{days}x{rows_per_day}-s{seed}", tables)


def movielens_days(root: Path, ratings: Path, days: int = 5, history: int = 0) -> dict[str, str]:
    """{day: parquet path}: the ratings sorted by time and cut into `days` slices of equal size, with
    `hour` and `weekday` of the rating and a row id; label = rating >= 4 (as shipped). With `history`, also
    `hist_movie_ids`: the movies the user rated just before, most recent first, 0 padding a user's first
    ratings (a behaviour sequence made of real behaviour)."""
    table = pq.read_table(ratings).sort_by("timestamp")
    seconds = table.column("timestamp").to_numpy().astype(np.int64)
    when = seconds.astype("datetime64[s]")
    table = table.append_column("event_id", pa.array(np.arange(len(table), dtype=np.int64)))
    table = table.append_column("hour", pa.array(((seconds // 3600) % 24).astype(np.int64)))
    table = table.append_column("weekday", pa.array(((when.astype("datetime64[D]").astype(np.int64) + 3) % 7)))
    table = table.drop_columns(["rating"])  # the label is made of it: never a feature
    if history:
        previous = previous_items(table.column("userId").to_numpy(), table.column("movieId").to_numpy(), history)
        table = table.append_column("hist_movie_ids", pa.ListArray.from_arrays(
            pa.array(np.arange(0, previous.size + 1, history, dtype=np.int32)), pa.array(previous.ravel())))
    bounds = np.linspace(0, len(table), days + 1).astype(int)
    name = f"movielens-{days}" + (f"-history{history}" if history else "")
    return _write_days(root / name, [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])])


def previous_items(users: np.ndarray, items: np.ndarray, length: int) -> np.ndarray:
    """(rows, length): for each row (rows in time order), the items of the same user's `length` rows before
    it, the latest first; 0 where the user has fewer."""
    by_user = pd.Series(items).groupby(users)  # a shift within each user keeps the rows' (time) order
    return np.stack([by_user.shift(back).fillna(0).to_numpy(np.int64) for back in range(1, length + 1)], axis=1)


def criteo_with_ids(root: Path, train: Path, test: Path) -> dict[str, str]:
    """{day: parquet path}: the Criteo sample's train and test files, each row given an id."""
    tables, offset = [], 0
    for path in (train, test):
        table = pq.read_table(path)
        tables.append(table.append_column("row_id", pa.array(np.arange(len(table), dtype=np.int64) + offset)))
        offset += len(table)
    return _write_days(root / "criteo", tables)


def click_rate(partitions: dict[str, str], label: str) -> float:
    labels = pa.concat_arrays([pq.read_table(p, columns=[label]).column(0).combine_chunks()
                               for p in partitions.values()])
    return pc.mean(labels).as_py()
