"""Feature conversion, hashing, model families, and the self-describing checkpoint format."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.features import FeatureLayout, table_to_inputs
from pipeline.models import build_model, count_parameters, load_model, save_model
from pipeline.models.encoder import hash_ids

LAYOUT = FeatureLayout(categorical=("user_id", "item_id"), dense=("price",), sequence="hist",
                       sequence_length=3, sequence_field=1)


def _table(rows: int = 4) -> pa.Table:
    return pa.table({
        "user_id": pa.array(np.arange(rows) + 10**12, pa.int64()),  # ids far beyond any bucket count
        "item_id": pa.array(np.arange(rows) + 1, pa.int64()),
        "price": pa.array(np.linspace(1, 100, rows), pa.float32()),
        "hist": pa.array([[1, 2, 3]] * (rows - 1) + [[5]], pa.list_(pa.int64())),  # last row is ragged
    })


def test_table_to_inputs_shapes_and_padding():
    inputs = table_to_inputs(_table(), LAYOUT)
    assert inputs["categorical"].shape == (4, 2) and inputs["categorical"].dtype == torch.int64
    assert inputs["dense"].shape == (4, 1) and inputs["dense"].dtype == torch.float32
    assert inputs["sequence"].tolist()[-1] == [5, 0, 0]  # padded with 0
    assert inputs["sequence"].tolist()[0] == [1, 2, 3]


def test_hashing_stays_in_range_for_any_id():
    ids = torch.tensor([0, 1, -7, 2**62, 10**18, -(2**63)])
    buckets = hash_ids(ids, 97)
    assert ((buckets >= 0) & (buckets < 97)).all()
    assert hash_ids(ids, 97).tolist() == buckets.tolist()  # deterministic


def test_hashing_spreads_consecutive_ids():
    buckets = hash_ids(torch.arange(10_000), 1000)
    counts = torch.bincount(buckets, minlength=1000)
    assert counts.max() < 40  # roughly uniform (mean 10), not clumped


@pytest.mark.parametrize("family,pooling", [("dcn_v2", "attention"), ("mlp", "mean")])
def test_models_produce_one_logit_per_row_and_learn(family, pooling):
    torch.manual_seed(0)
    config = {"model": family, "embedding_dim": 4, "hash_buckets": 64, "hidden": [8], "cross_layers": 2,
              "sequence_pooling": pooling}
    model = build_model(config, LAYOUT)
    inputs = table_to_inputs(_table(32), LAYOUT)
    labels = (torch.arange(32) % 2).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(inputs), labels)
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(inputs).shape == (32,)
    assert loss.item() < first * 0.7  # it can fit a small batch


def test_parameter_counts_split_embeddings_from_dense():
    config = {"model": "mlp", "embedding_dim": 4, "hash_buckets": 100, "hidden": [8]}
    counts = count_parameters(build_model(config, LAYOUT))
    assert counts["embedding"] == 2 * 100 * 4
    assert counts["total"] == counts["embedding"] + counts["dense"]


def test_save_and_load_round_trip(tmp_path):
    config = {"model": "dcn_v2", "embedding_dim": 4, "hash_buckets": 64, "hidden": [8], "cross_layers": 1,
              "sequence_pooling": "attention"}
    model = build_model(config, LAYOUT).eval()
    path = str(tmp_path / "m.pt")
    save_model(path, model, config, LAYOUT)
    loaded, loaded_config, layout = load_model(path)
    inputs = table_to_inputs(_table(), LAYOUT)
    assert layout == LAYOUT and loaded_config == config
    assert torch.equal(model(inputs), loaded(inputs))
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temp file
