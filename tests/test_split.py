"""Row splits (pipeline/data/split.py), fast: the evaluation side is independent of the validation side,
stable across runs and machines, and training, validation and evaluation rows partition every row once."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.split import RowSplit, evaluation_mask, validation_mask
from pipeline.spec import parse_spec


def _ids(table: pa.Table) -> set[int]:
    return set(table.column("row").to_pylist())


def test_the_evaluation_side_is_independent_of_the_validation_side():
    keys = pa.array(np.arange(100_000))
    validation, evaluation = validation_mask(keys, 0.3), evaluation_mask(keys, 0.2)
    assert abs(validation.mean() - 0.3) < 0.005 and abs(evaluation.mean() - 0.2) < 0.005
    assert abs((validation & evaluation).mean() - 0.3 * 0.2) < 0.004  # 0.0595 measured; the product is 0.06
    # the same fraction on both sides is not the same keys (one digit range would give an overlap of 0.2)
    assert abs((validation_mask(keys, 0.2) & evaluation).mean() - 0.04) < 0.004


def test_the_evaluation_side_is_pinned_and_keeps_each_key_on_one_side():
    pinned = [True, False, True, False, True, False, True, True, True, False]  # pandas' hash_array of 0..9
    assert evaluation_mask(pa.array(np.arange(10)), 0.5).tolist() == pinned
    criteo_ids = pa.array(np.arange(10_000_000, 10_000_010))  # the first Ids of criteo_raw_tiny
    assert np.flatnonzero(evaluation_mask(criteo_ids, 0.2)).tolist() == [2, 7]
    keys = pa.array(np.arange(20_000) % 5_000)  # 4 rows per key, in chunks as Ray Data hands them over
    mask = evaluation_mask(keys, 0.2)
    assert np.array_equal(mask, evaluation_mask(pa.chunked_array([keys.slice(0, 7), keys.slice(7)]), 0.2))
    assert all(len(set(mask[keys.to_numpy() == k])) == 1 for k in range(100))


@pytest.mark.parametrize("validation_key", ["user", "row", None], ids=["by user", "same key", "by days"])
def test_training_validation_and_evaluation_rows_partition_every_row_once(validation_key):
    rows = 30_000
    table = pa.table({"row": np.arange(rows), "user": np.arange(rows) % 3_000})
    split = RowSplit(validation_key=validation_key, validation_fraction=0.15 if validation_key else 0.0,
                     evaluation_key="row", evaluation_fraction=0.2)
    train, validation, evaluation = (_ids(split.keep(table, side)) for side in ("train", "validation", "evaluation"))
    expected = set(np.flatnonzero(evaluation_mask(table.column("row"), 0.2)).tolist())
    assert evaluation == expected  # evaluation rows are the evaluation side, whatever the validation side
    if validation_key is None:  # validation by days: a batch of validation days is validation rows, less evaluation
        assert validation == train == set(range(rows)) - expected
        return
    assert len(train) + len(validation) + len(evaluation) == rows
    assert train | validation | evaluation == set(range(rows))
    assert not validation & evaluation and not train & (validation | evaluation)
    held = validation_mask(table.column(validation_key), 0.15)
    assert validation == set(np.flatnonzero(held).tolist()) - expected
    assert abs(len(train) / rows - (1 - 0.15) * (1 - 0.2)) < 0.01  # what the lr schedule's row estimate assumes


def test_without_an_evaluation_split_the_eval_days_are_all_evaluation_rows():
    table = pa.table({"row": np.arange(1_000)})
    split = RowSplit(validation_key="row", validation_fraction=0.5)
    assert split.keep(table, "evaluation").num_rows == 1_000
    assert split.keep(table, "train").num_rows + split.keep(table, "validation").num_rows == 1_000


def test_the_spec_names_the_keys_and_the_share_held_out(tiny_spec_dict):
    raw = copy.deepcopy(tiny_spec_dict)
    raw["data"] |= {"validation": {"fraction": 0.1, "by": "user_id"}, "evaluation": {"fraction": 0.2},
                    "eval_days": raw["data"]["train_days"]}
    spec = parse_spec(raw)
    assert spec.split_keys == ["user_id", "event_id"]  # evaluation by features.id, the default
    assert RowSplit.from_spec(spec) == RowSplit("user_id", 0.1, "event_id", 0.2)
    assert spec.data.held_out_fraction == pytest.approx(1 - 0.9 * 0.8)
    raw["data"]["validation"] = {"days": 1}
    raw["data"]["evaluation"]["by"] = "user_id"
    spec = parse_spec(raw)
    assert spec.split_keys == ["user_id"] and spec.data.held_out_fraction == pytest.approx(0.2)
    assert RowSplit.from_spec(spec) == RowSplit(None, 0.0, "user_id", 0.2)
