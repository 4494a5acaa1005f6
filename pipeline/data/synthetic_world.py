"""The hidden world and click model behind the synthetic click logs (`pipeline.data.synthetic` writes them).

A "world" (users, items, categories, latent vectors) is drawn once from the seed; each day draws its
impressions from its own RNG, seeded from (seed, day index). The hidden click model mixes user-item
affinity, position bias, popularity, per-user price sensitivity, device x hour and category x hour
effects and a behaviour-sequence match, so a model that only memorises ids stays clearly below the
ceiling ``roc_auc(clicked, true_ctr)``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

SYNTHETIC_COLUMNS: tuple[str, ...] = (
    "event_id", "user_id", "item_id", "category_id", "hour", "device", "position", "price",
    "user_activity", "item_popularity", "hist_item_ids", "clicked", "true_ctr",
)

# The privileged signal (`data.synthetic.privileged`): a noisy view of the hidden user-item affinity, a column
# of the log that serving would not have (a post-impression signal, or a cross too costly to compute online).
PRIVILEGED_COLUMN = "affinity_hint"
_HINT_NOISE_STD = 0.6  # about half the affinity's spread (std ~1.16): corr(hint, affinity) ~0.89
_LATENT_DIM = 8
_POSITIONS = 10
MAX_ROWS_PER_DAY = 10**9  # event_id = day * 10**9 + row must stay unique
# Hourly traffic shape: quiet nights, a lunch bump and an evening peak.
_HOUR_TRAFFIC = (2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 7, 8, 7, 6, 6, 6, 7, 8, 10, 11, 10, 7, 4)


@dataclass(frozen=True)
class World:
    """Everything that persists across days: ids, latent vectors and the per-id features."""

    item_category: np.ndarray  # (I,) category index 0..C-1
    item_latent: np.ndarray  # (I, D)
    item_bias: np.ndarray  # (I,) hidden quality
    item_cdf: np.ndarray  # (I,) impression distribution, Zipf-like
    item_popularity: np.ndarray  # (I,) float32 feature: log1p(past views)
    price: np.ndarray  # (I,) float32
    cat_order: np.ndarray  # (I,) item indices sorted by category
    cat_cum: np.ndarray  # (I,) cumulative impression weight along cat_order
    cat_lo: np.ndarray  # (C,) cat_cum value before each category's segment
    cat_hi: np.ndarray  # (C,) cat_cum value at the end of each segment
    cat_last: np.ndarray  # (C,) index of the last item of each segment
    cat_hour: np.ndarray  # (C, 24) category x hour-of-day effect
    user_cdf: np.ndarray  # (U,) impression distribution, Zipf-like
    user_activity: np.ndarray  # (U,) float32 feature: log1p(past sessions)
    user_latent: np.ndarray  # (U, D)
    user_bias: np.ndarray  # (U,)
    user_cat_cdf: np.ndarray  # (U, C) cumulative category preference
    user_price_sens: np.ndarray  # (U,)
    user_device: np.ndarray  # (U,) preferred device
    user_pool: np.ndarray  # (U, P) past clicks (item indices), most recent first
    device_hour: np.ndarray  # (3, 24) device x hour effect


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Zipf-like weights over ``n`` ids, ranks shuffled so that popularity is not the id order."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(weights / weights.sum())


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, axis=-1)
    return cdf / cdf[..., -1:]


def _sample_cdf(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _item_fields(rng: np.random.Generator, items: int, cat_vec: np.ndarray,
                 cat_share: np.ndarray) -> dict:
    """Per-item world fields: category, latent vector, impression weight, popularity and price."""
    categories = len(cat_share)
    # Every category gets at least one item; the rest follow the category shares.
    item_category = np.concatenate([np.arange(categories),
                                    _sample_cdf(rng, _cdf(cat_share), items - categories)])
    item_weight = _zipf_weights(rng, items, 0.9)
    views = item_weight * 5e6 * rng.lognormal(0.0, 0.3, items)
    log_price = rng.normal(3.0, 0.6, categories)[item_category] + rng.normal(0.0, 0.4, items)
    # Items sorted by category with a running weight, so a weighted draw within a category is one
    # searchsorted inside that category's segment.
    cat_order = np.argsort(item_category, kind="stable")
    cat_cum = np.cumsum(item_weight[cat_order])
    seg_end = np.cumsum(np.bincount(item_category, minlength=categories))
    cat_hi = cat_cum[seg_end - 1]
    hours = np.arange(24)
    return dict(
        item_category=item_category,
        item_latent=cat_vec[item_category] + 0.7 * rng.normal(size=(items, _LATENT_DIM)),
        item_bias=rng.normal(0.0, 0.3, items), item_cdf=_cdf(item_weight),
        item_popularity=np.log1p(views).astype(np.float32),
        price=np.exp(log_price).astype(np.float32), cat_order=cat_order, cat_cum=cat_cum,
        cat_lo=np.concatenate([[0.0], cat_hi[:-1]]), cat_hi=cat_hi, cat_last=seg_end - 1,
        cat_hour=rng.normal(0.0, 0.35, (categories, 1))
        * np.sin(2 * np.pi * (hours - rng.uniform(0, 24, (categories, 1))) / 24),
    )


def _user_fields(rng: np.random.Generator, users: int, cat_vec: np.ndarray,
                 cat_share: np.ndarray) -> dict:
    """Per-user world fields: traffic weight, activity, tastes, price sensitivity and device."""
    user_weight = _zipf_weights(rng, users, 0.7)
    sessions = user_weight * 2e6 * rng.lognormal(0.0, 0.3, users)
    # Sparse tastes: most users care about a handful of categories.
    user_pref = 0.9 * rng.dirichlet(np.full(len(cat_share), 0.15), users) + 0.1 * cat_share
    taste = user_pref @ cat_vec / np.sqrt((user_pref**2).sum(1, keepdims=True))  # (U, D)
    hours = np.arange(24)
    return dict(
        user_cdf=_cdf(user_weight), user_activity=np.log1p(sessions).astype(np.float32),
        user_latent=0.8 * taste + 0.5 * rng.normal(size=(users, _LATENT_DIM)),
        user_bias=rng.normal(0.0, 0.3, users), user_cat_cdf=_cdf(user_pref),
        user_price_sens=rng.lognormal(np.log(0.3), 0.6, users),
        user_device=rng.integers(0, 3, users),
        device_hour=rng.normal(0.0, 0.25, (3, 1)) * np.cos(2 * np.pi * (hours - 20) / 24)
        + rng.normal(0.0, 0.1, (3, 24)),
    )


def build_world(seed: int, users: int, items: int, categories: int, seq_len: int) -> World:
    """Draws the persistent world from ``seed`` alone, so every day shares it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    cat_vec = rng.normal(size=(categories, _LATENT_DIM))  # (C, D)
    cat_share = rng.dirichlet(np.full(categories, 3.0))  # (C,)
    world = World(**_item_fields(rng, items, cat_vec, cat_share),
                   **_user_fields(rng, users, cat_vec, cat_share),
                   user_pool=np.empty((users, 0), np.int64))
    # Past clicks: 2 * seq_len items per user from the user's preferred categories; drawn with the
    # samplers above, hence after the rest of the world exists.
    pool_users = np.repeat(np.arange(users), 2 * seq_len)
    pool = _sample_in_category(rng, world, _sample_user_category(rng, world, pool_users))
    return replace(world, user_pool=pool.reshape(users, 2 * seq_len))


def _sample_user_category(rng: np.random.Generator, world: World, user: np.ndarray) -> np.ndarray:
    """One category per row from that row's user's preference, vectorised via a shifted flat CDF."""
    n_users, n_cats = world.user_cat_cdf.shape
    # Row u's CDF, shifted by u, spans (u, u + 1], so one searchsorted over the flat array serves
    # every user; the clip guards against u + r rounding up to u + 1.
    flat = (world.user_cat_cdf + np.arange(n_users)[:, None]).ravel()
    idx = np.searchsorted(flat, user + rng.random(len(user)), side="right")
    return np.clip(idx - user * n_cats, 0, n_cats - 1)


def _sample_in_category(rng: np.random.Generator, world: World,
                        category: np.ndarray) -> np.ndarray:
    """One item index per row from ``category``, weighted by item impression weight."""
    lo, hi = world.cat_lo[category], world.cat_hi[category]
    pos = np.searchsorted(world.cat_cum, lo + rng.random(len(category)) * (hi - lo), side="right")
    # The clip guards against rounding past the segment's end.
    return world.cat_order[np.minimum(pos, world.cat_last[category])]


def _draw_history(rng: np.random.Generator, world: World, user: np.ndarray, intent: np.ndarray,
                  seq_len: int) -> np.ndarray:
    """Recent clicks, most recent first (item indices, -1 = padding).

    A sliding window over the user's pool of past clicks, with the most recent slots often replaced
    by items of the session's intent category.
    """
    n = len(user)
    pool = world.user_pool
    # Active users have longer histories; some are shorter than seq_len and get padded.
    n_valid = np.minimum(rng.poisson(0.8 * world.user_activity[user]), seq_len)  # (N,)
    start = rng.integers(0, pool.shape[1], n)[:, None]  # (N, 1) where the user's window begins
    slot = (start + np.arange(seq_len)) % pool.shape[1]  # (N, L)
    # The intent changes per session, which is what makes the sequence informative beyond user_id.
    fresh = rng.random((n, seq_len)) < 0.55 * np.exp(-0.25 * np.arange(seq_len))  # (N, L)
    fresh_items = _sample_in_category(rng, world, np.repeat(intent, seq_len)).reshape(n, seq_len)
    hist = np.where(fresh, fresh_items, pool[user[:, None], slot])
    return np.where(np.arange(seq_len) < n_valid[:, None], hist, -1)


def _draw_impressions(rng: np.random.Generator, world: World, rows: int, seq_len: int) -> dict:
    """The observable columns of one day's impressions (0-based ids)."""
    user = _sample_cdf(rng, world.user_cdf, rows)
    n_cats = world.cat_hour.shape[0]
    explore = rng.random(rows) < 0.2
    tastes = _sample_user_category(rng, world, user)
    intent = np.where(explore, rng.integers(0, n_cats, rows), tastes)  # the session's category
    # Impressions: global best-sellers, the session intent, or another of the user's tastes.
    source = rng.random(rows)
    best_sellers = _sample_cdf(rng, world.item_cdf, rows)
    for_intent = _sample_in_category(rng, world, intent)
    for_tastes = _sample_in_category(rng, world, _sample_user_category(rng, world, user))
    item = np.where(source < 0.45, best_sellers, np.where(source < 0.8, for_intent, for_tastes))
    device = np.where(rng.random(rows) < 0.7, world.user_device[user], rng.integers(0, 3, rows))
    hour = _sample_cdf(rng, _cdf(np.asarray(_HOUR_TRAFFIC, float)), rows)
    position = rng.integers(1, _POSITIONS + 1, rows)
    return {"user": user, "item": item, "hour": hour, "device": device, "position": position,
            "hist": _draw_history(rng, world, user, intent, seq_len)}


def _click_logit(world: World, imp: dict) -> np.ndarray:
    """The hidden click model: the logit behind ``true_ctr``.

    logit = b + 0.55 <user, item> - 0.55 log(position) + 0.12 popularity - sens_u * price_z
            + device_hour + category_hour + 1.7 seq_match + user_bias + item_bias
    """
    user, item, hour, hist = imp["user"], imp["item"], imp["hour"], imp["hist"]
    cat = world.item_category[item]
    affinity = _affinity(world, imp)
    position_bias = -0.55 * np.log(imp["position"])
    pop = world.item_popularity
    popularity = 0.12 * (pop[item] - pop.mean())  # (N,); log-views, so heavy-tailed items stay sane
    log_price = np.log(world.price)
    price = -world.user_price_sens[user] * (log_price[item] - log_price.mean()) / log_price.std()
    context = world.device_hour[imp["device"], hour] + world.cat_hour[cat, hour]
    # Sequence x target: the share of real history clicks in the target's category.
    valid = hist >= 0
    same_cat = (world.item_category[np.maximum(hist, 0)] == cat[:, None]) & valid
    seq_match = same_cat.sum(1) / np.maximum(valid.sum(1), 1)
    return (-3.9 + 0.55 * affinity + position_bias + popularity + price + context + 1.7 * seq_match
            + world.user_bias[user] + world.item_bias[item])


def _affinity(world: World, imp: dict) -> np.ndarray:
    """<user, item> / sqrt(D): the user-item affinity of each impression, 0.55 of it in the click logit."""
    return (world.user_latent[imp["user"]] * world.item_latent[imp["item"]]).sum(1) / np.sqrt(_LATENT_DIM)


def affinity_hint(world: World, imp: dict, seed: int, day: int) -> np.ndarray:
    """The privileged column: affinity + N(0, _HINT_NOISE_STD^2), float32. Its noise has its own RNG stream,
    so every other column of the day is the same with or without it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3, day]))
    return (_affinity(world, imp) + rng.normal(0.0, _HINT_NOISE_STD, len(imp["user"]))).astype(np.float32)


_DRIFT_ANCHOR = datetime.date(2026, 1, 1).toordinal()


def _drifted(world: World, day: int, seed: int, drift: float) -> World:
    """The world on `day` when user tastes drift: each user's latent vector rotates slowly, by
    `drift` radians a day from a fixed anchor date, towards a direction of its own.

    A rotation keeps tastes bounded, and depending on the date alone keeps each date's file the same
    whatever `start_date` generated it. drift = 0 leaves the world untouched.
    """
    if drift == 0:
        return world
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))  # its own stream: the world stays as is
    direction = rng.normal(size=world.user_latent.shape)  # (U, D)
    norms = np.linalg.norm(world.user_latent, axis=1, keepdims=True)
    direction *= norms / np.linalg.norm(direction, axis=1, keepdims=True)
    angle = drift * (day - _DRIFT_ANCHOR)
    return replace(world, user_latent=np.cos(angle) * world.user_latent + np.sin(angle) * direction)


def day_table(world: World, day: int, seed: int, rows: int, seq_len: int, drift: float = 0.0,
              privileged: bool = False) -> pa.Table:
    """One day's impressions, clicks and true CTRs as an Arrow table in SYNTHETIC_COLUMNS order, then (with
    `privileged`) PRIVILEGED_COLUMN."""
    world = _drifted(world, day, seed, drift)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, day]))
    imp = _draw_impressions(rng, world, rows, seq_len)
    true_ctr = 1.0 / (1.0 + np.exp(-_click_logit(world, imp)))
    clicked = (rng.random(rows) < true_ctr).astype(np.int64)
    offsets = pa.array(np.arange(0, rows * seq_len + 1, seq_len, dtype=np.int32))
    hist_values = pa.array((imp["hist"] + 1).ravel().astype(np.int64))  # padding -1 -> 0
    hist_ids = pa.ListArray.from_arrays(offsets, hist_values)
    item = imp["item"]
    columns = [
        day * MAX_ROWS_PER_DAY + np.arange(rows, dtype=np.int64),
        imp["user"] + 1, item + 1, world.item_category[item] + 1, imp["hour"], imp["device"],
        imp["position"], world.price[item], world.user_activity[imp["user"]],
        world.item_popularity[item], hist_ids, clicked, true_ctr.astype(np.float32),
    ]
    arrays = [c if isinstance(c, pa.Array) else pa.array(c) for c in columns]
    arrays = [a.cast(pa.int64()) if pa.types.is_integer(a.type) else a for a in arrays]
    table = pa.Table.from_arrays(arrays, names=list(SYNTHETIC_COLUMNS))
    if privileged:
        table = table.append_column(PRIVILEGED_COLUMN, pa.array(affinity_hint(world, imp, seed, day)))
    return table
