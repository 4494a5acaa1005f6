"""Feature conversion, hashing, model families, and the self-describing checkpoint format."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.features import FeatureLayout, table_to_inputs
from pipeline.models import ModelConfig, build_model, count_parameters, load_model, save_model
from pipeline.models.encoder import hash_ids
from pipeline.models.fm import fm_interaction

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


def test_ragged_histories_are_truncated_or_padded_row_by_row():
    lists = [[1, 2, 3, 4, 5], [], None, [7, None, 8], [9], [10, 11, 12]]  # longer, empty, null, null id, short
    column = pa.chunked_array([pa.array(lists[:2], pa.list_(pa.int64())), pa.array(lists[2:], pa.list_(pa.int64()))])
    layout = FeatureLayout(categorical=(), dense=(), sequence="hist", sequence_length=3)
    expected = [[1, 2, 3], [0, 0, 0], [0, 0, 0], [7, 0, 8], [9, 0, 0], [10, 11, 12]]
    assert table_to_inputs(pa.table({"hist": column}), layout)["sequence"].tolist() == expected
    sliced = pa.table({"hist": column}).slice(3, 2)  # an Arrow slice: offsets into the parent's values
    assert table_to_inputs(sliced, layout)["sequence"].tolist() == expected[3:5]


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
    config = ModelConfig(model=family, embedding_dim=4, hash_buckets=64, hidden=(8,), cross_layers=2,
                         sequence_pooling=pooling)
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
    config = ModelConfig(model="mlp", embedding_dim=4, hash_buckets=100, hidden=(8,))
    counts = count_parameters(build_model(config, LAYOUT))
    assert counts["embedding"] == 2 * 100 * 4
    assert counts["total"] == counts["embedding"] + counts["dense"]


def test_save_and_load_round_trip(tmp_path):
    config = ModelConfig(model="dcn_v2", embedding_dim=4, hash_buckets=64, hidden=(8,), cross_layers=1,
                         sequence_pooling="attention")
    model = build_model(config, LAYOUT).eval()
    path = str(tmp_path / "m.pt")
    save_model(path, model, config, LAYOUT)
    loaded, loaded_config, layout = load_model(path)
    inputs = table_to_inputs(_table(), LAYOUT)
    assert layout == LAYOUT and loaded_config == config
    assert torch.equal(model(inputs), loaded(inputs))
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temp file


# --- model families: teachers dcn_v2, deepfm, bst; students mlp, fm, dcn_v2; custom plug-ins -----------------

BUILT_IN = ("dcn_v2", "deepfm", "bst", "mlp", "fm")
FAMILIES = BUILT_IN + ("custom",)


@pytest.fixture
def plugins(monkeypatch):
    """Puts tests/ on sys.path so the factory "plugin_models:..." imports (as a user's package would)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _config(family: str, out_dim: int = 1, **overrides) -> ModelConfig:
    """A tiny model section; every family, with only what the test cares about overridden."""
    config = {"model": family, "embedding_dim": 4, "hash_buckets": 64, "hidden": [8, 6], "cross_layers": 1,
              "attention_heads": 2, "out_dim": out_dim}
    if family == "custom":
        config |= {"factory": "plugin_models:tiny_linear", "factory_args": {"width": 5}}
    return ModelConfig.from_dict(config | overrides)


def _logit_shape(rows: int, out_dim: int) -> tuple[int, ...]:
    return (rows,) if out_dim == 1 else (rows, out_dim)


@pytest.mark.usefixtures("plugins")
@pytest.mark.parametrize("out_dim", [1, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_logits_of_the_task_shape_and_trains_its_embeddings(family, out_dim):
    torch.manual_seed(0)
    model = build_model(_config(family, out_dim), LAYOUT)
    inputs = table_to_inputs(_table(6), LAYOUT)
    logits = model(inputs)
    assert logits.shape == _logit_shape(6, out_dim) and torch.isfinite(logits).all()
    if out_dim == 1:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, (torch.arange(6) % 2).float())
    else:
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(6) % out_dim)
    loss.backward()
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert tables and all(t.weight.grad is not None and t.weight.grad.abs().sum() > 0 for t in tables)


@pytest.mark.parametrize("out_dim", [1, 3])
@pytest.mark.parametrize("family", BUILT_IN)
def test_forward_with_hidden_gives_the_same_logits_and_hidden_dim_columns(family, out_dim):
    torch.manual_seed(0)
    model = build_model(_config(family, out_dim), LAYOUT).eval()
    inputs = table_to_inputs(_table(5), LAYOUT)
    logits, hidden = model.forward_with_hidden(inputs)
    assert torch.equal(logits, model(inputs))
    assert isinstance(model.hidden_dim, int) and hidden.shape == (5, model.hidden_dim)


def test_fm_interaction_equals_the_sum_of_pairwise_dot_products():
    torch.manual_seed(0)
    vectors = torch.randn(3, 4, 5, dtype=torch.float64)  # (B, N, dim)
    pairwise = sum((vectors[:, i] * vectors[:, j]).sum(-1) for i, j in itertools.combinations(range(4), 2))
    assert torch.allclose(fm_interaction(vectors).sum(-1), pairwise)


def test_deepfm_logit_is_first_order_plus_pairwise_interactions_plus_deep():
    torch.manual_seed(0)
    model = build_model(_config("deepfm"), LAYOUT).eval()
    inputs = table_to_inputs(_table(4), LAYOUT)
    with torch.no_grad():
        torch.nn.init.normal_(model.first_order.weights.weight)  # zero at init: make the term visible
        vectors = model.encoder.embed(inputs)  # (B, 3, 4): user, item, pooled history
        dense = torch.log1p(inputs["dense"])  # prices are positive
        rows = hash_ids(inputs["categorical"], 64) + torch.tensor([0, 64])  # (B, 2) rows of the F * 64 table
        linear = model.first_order.dense(dense).squeeze(-1) + model.first_order.bias
        first = model.first_order.weights.weight[rows].sum((1, 2)) + linear
        pairwise = sum((vectors[:, i] * vectors[:, j]).sum(-1) for i, j in itertools.combinations(range(3), 2))
        deep = model.head(model.deep(torch.cat([vectors.flatten(1), dense], dim=1))).squeeze(-1)
        assert torch.allclose(model(inputs), first + pairwise + deep, atol=1e-6)


def test_mean_pooling_averages_the_real_history_items_and_their_gradients_only():
    torch.manual_seed(0)
    model = build_model(_config("mlp", sequence_pooling="mean"), LAYOUT)
    inputs = table_to_inputs(_table(4), LAYOUT)
    inputs["sequence"][1] = 0  # a row of padding only pools to zeros
    inputs["sequence"][2] = torch.tensor([0, 7, 0])  # padding before and after a real item
    padding_row = int(hash_ids(torch.tensor(0), 64)) + 64  # where id 0 lands in the item table
    with torch.no_grad():
        model.encoder.embedding.weight[padding_row] = 1000.0  # a padded slot that counted would show
    pooled = model.encoder.embed(inputs)[:, -1]  # (B, dim)
    rows = hash_ids(inputs["sequence"], 64) + 64
    weight = model.encoder.embedding.weight
    expected = torch.stack([weight[rows[0]].mean(0), torch.zeros(4), weight[rows[2, 1]], weight[rows[3, 0]]])
    assert torch.allclose(pooled, expected, atol=1e-4)  # 1e-4: 1000s cancel in float32
    grad, = torch.autograd.grad(pooled.sum(), weight)
    assert float(grad[padding_row].abs().max()) < 1e-6  # id 0 is no item: it learns nothing
    assert torch.allclose(grad[rows[2, 1]], torch.ones(4))  # the lone real item of row 2 gets all of it


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_bst_ignores_padded_history_positions(pooling):
    torch.manual_seed(0)
    model = build_model(_config("bst", sequence_pooling=pooling, transformer_layers=2), LAYOUT).eval()
    inputs = table_to_inputs(_table(4), LAYOUT)  # the last row's history is [5, 0, 0]: two padded slots
    padding_row = int(hash_ids(torch.tensor(0), 64)) + 64  # where id 0 lands in the item table
    real_rows = hash_ids(torch.cat([inputs["sequence"][inputs["sequence"] != 0], inputs["categorical"][:, 1]]), 64)
    assert padding_row - 64 not in real_rows.tolist()  # the test only means something if no real id shares it
    before = model(inputs)
    with torch.no_grad():
        model.encoder.embedding.weight[padding_row] += 100.0  # what a padded slot would read
        model.positions.weight[2:] += 100.0  # history slots 2 and 3: padding in the last row
    assert torch.allclose(model(inputs)[-1], before[-1], atol=1e-6)
    with torch.no_grad():
        model.positions.weight[1] += 100.0  # slot 1 holds a real item everywhere: this must matter
    assert not torch.allclose(model(inputs)[-1], before[-1], atol=1e-6)


def test_bst_with_an_empty_history_gives_finite_logits():
    model = build_model(_config("bst"), LAYOUT).eval()
    inputs = table_to_inputs(_table(4), LAYOUT)
    inputs["sequence"] = torch.zeros_like(inputs["sequence"])
    assert torch.isfinite(model(inputs)).all()


def test_bst_needs_a_sequence():
    layout = FeatureLayout(categorical=("user_id", "item_id"), dense=("price",))
    with pytest.raises(ValueError, match="features.sequence"):
        build_model(_config("bst"), layout)


def test_bst_heads_must_divide_the_embedding_dim():
    with pytest.raises(ValueError, match="attention_heads"):
        build_model(_config("bst", attention_heads=3), LAYOUT)


def test_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        build_model(_config("xgboost"), LAYOUT)


@pytest.mark.usefixtures("plugins")
@pytest.mark.parametrize("out_dim", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_every_family(tmp_path, family, out_dim):
    torch.manual_seed(0)
    config = _config(family, out_dim)
    model = build_model(config, LAYOUT).eval()
    path = str(tmp_path / f"{family}.pt")
    save_model(path, model, config, LAYOUT)
    loaded, loaded_config, layout = load_model(path)
    inputs = table_to_inputs(_table(), LAYOUT)
    assert loaded_config == config and layout == LAYOUT
    assert torch.equal(model(inputs), loaded(inputs))


def test_config_defaults_follow_the_spec():
    from pipeline.spec import ModelSpec

    spec = ModelSpec(model="mlp")
    assert ModelConfig.from_section(spec) == ModelConfig(model="mlp")  # a field left out means the same model
    assert set(ModelSpec.model_fields) == set(ModelConfig(model="mlp").to_dict()) - {"out_dim"}


def test_a_checkpoint_config_without_newer_keys_still_builds():
    old = ModelConfig.from_dict({"model": "mlp", "embedding_dim": 4, "hash_buckets": 64, "hidden": [8]})
    assert old.out_dim == 1 and old.dropout == 0.0
    assert build_model(old, LAYOUT)(table_to_inputs(_table(), LAYOUT)).shape == (4,)


@pytest.mark.parametrize("family", ["dcn_v2", "deepfm", "bst", "mlp"])
def test_dropout_applies_in_the_mlp_tower(family):
    model = build_model(_config(family, dropout=0.25), LAYOUT)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in model.deep)


def test_parameter_counts_include_first_order_and_position_tables():
    fm = count_parameters(build_model(_config("fm", out_dim=3), LAYOUT))
    assert fm["embedding"] == 2 * 64 * 4 + 2 * 64 * 3  # field embeddings + first-order weights per class
    bst = count_parameters(build_model(_config("bst"), LAYOUT))
    assert bst["embedding"] == 2 * 64 * 4 + (3 + 1) * 4  # field embeddings + positions (target + 3 slots)
    for counts in (fm, bst):
        assert counts["total"] == counts["embedding"] + counts["dense"] and counts["dense"] > 0


def test_fm_without_dense_features_works():
    layout = FeatureLayout(categorical=("user_id", "item_id"), dense=())
    inputs = table_to_inputs(_table(), layout)
    assert build_model(_config("fm"), layout)(inputs).shape == (4,)


@pytest.mark.usefixtures("plugins")
def test_plugin_builds_through_the_factory_with_its_arguments():
    model = build_model(_config("custom", out_dim=4, factory_args={"width": 7}), LAYOUT)
    assert type(model).__name__ == "TinyLinear" and model.embedding.embedding_dim == 7
    assert model.training  # the dummy-batch check leaves the mode as the factory made it


@pytest.mark.usefixtures("plugins")
@pytest.mark.parametrize("factory,args,message", [
    ("plugin_models:wrong_shape", {}, r"plugin_models:wrong_shape.*shape \(2, 2\), expected \(2,\)"),
    ("plugin_models:not_a_module", {}, "plugin_models:not_a_module.*nn.Module"),
    ("plugin_models:tiny_linear", {"depth": 2}, "plugin_models:tiny_linear.*factory_args"),
    ("plugin_models:missing", {}, "has no function 'missing'"),
    ("no_such_package.models:build", {}, "cannot import module 'no_such_package.models'"),
    (None, {}, "needs factory"),
])
def test_plugin_contract_violations_name_the_factory(factory, args, message):
    with pytest.raises(ValueError, match=message):
        build_model(_config("custom", factory=factory, factory_args=args), LAYOUT)


@pytest.mark.parametrize("family", BUILT_IN)
def test_missing_indicators_fill_and_flag_each_missing_dense_value(family):
    """With `missing_indicators`, a NaN dense value is filled with `dense_fill` and flagged in one more 0/1
    input: finite logits, and the flag is an input the model reads (it changes the logit)."""
    layout = FeatureLayout(categorical=("user_id", "item_id"), dense=("price", "stock"), sequence="hist",
                           sequence_length=3, sequence_field=1, missing_indicators=True, dense_fill=2.0)
    table = _table(6).append_column("stock", pa.array([1.0, None, 3.0, 4.0, 5.0, 6.0], pa.float32()))
    table = table.set_column(2, "price", pa.array([float("nan"), 2.0, 5.0, 7.0, 9.0, 1.0], pa.float32()))
    torch.manual_seed(0)
    model = build_model(_config(family), layout).eval()
    inputs = table_to_inputs(table, layout)
    assert torch.isnan(inputs["dense"]).sum() == 2  # a NaN price, and the null stock arrives as NaN too
    dense = model.encoder.dense(inputs)
    assert dense.shape == (6, 4)
    filled = torch.tensor([[2.0, 1.0], [2.0, 2.0]])  # row 0: price filled; row 1: stock filled
    assert torch.allclose(dense[:2, :2], torch.sign(filled) * torch.log1p(filled.abs()))
    assert dense[:2, 2:].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    logits = model(inputs)
    assert torch.isfinite(logits).all()
    with torch.no_grad():  # the same value, not missing: another input, another logit
        present = {**inputs, "dense": torch.where(torch.isnan(inputs["dense"]), 2.0, inputs["dense"])}
        assert not torch.allclose(model(present)[:2], logits[:2])
    plain = FeatureLayout(**{**layout.to_dict(), "missing_indicators": False})
    assert build_model(_config(family), plain).encoder.dense_dim == 2 and "missing_indicators" not in plain.to_dict()
