"""Export to ONNX and TorchScript: parity with the eager model for every family, the signature, the INT8
variant, export errors, `distill export` and the torch-free `distill score` (no Ray: models are built here
with spread-out weights, so that parity compares logits of a realistic size)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import storage
from pipeline.cli import main
from pipeline.data.normalise import normalise
from pipeline.errors import DataError, ParityError
from pipeline.export import ExportError, TOLERANCE, export_model, graph_code_fingerprint
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig, build_model, save_model
from pipeline.serving import SIGNATURE, check_log_schema, read_signature, score_log
from pipeline.spec import parse_spec
from pipeline.stages.click_logs import generate
from pipeline.stages.export import export_checkpoint, parity_rows
from tests.conftest import ROOT

FAMILIES = {  # every teacher and student family, and a custom plug-in that exports
    "mlp": {"hidden": (16,)},
    "fm": {},
    "dcn_v2": {"hidden": (32, 16), "cross_layers": 2, "sequence_pooling": "attention"},
    "deepfm": {"hidden": (32, 16)},
    "bst": {"hidden": (32,), "attention_heads": 2, "transformer_layers": 1},
    "custom": {"factory": "tests.plugin_models:tiny_linear", "factory_args": {"width": 6}},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic log (2 train days, 1 eval day of 3,000 rows) and its spec; no Ray."""
    import yaml

    root = tmp_path_factory.mktemp("export")
    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    raw["data"]["path"], raw["output"]["root"] = str(root / "clicks"), str(root / "runs")
    raw["data"]["synthetic"]["rows_per_day"] = 3000
    raw["export"] = {"quantize": ["int8", "fp16"], "serving_batches": [1, 64], "serving_runs": 20}
    spec = parse_spec(raw)
    generate(spec)
    return spec, FeatureLayout.from_spec(spec.features), root


def spread_model(family: str, layout: FeatureLayout, seed: int = 0, out_dim: int = 1):
    """A model whose weights are spread like a trained one's (init is near zero: every logit would be ~0)."""
    torch.manual_seed(seed)
    config = ModelConfig(model=family, embedding_dim=8, hash_buckets=500, out_dim=out_dim, **FAMILIES[family])
    model = build_model(config, layout)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.15)
    return model.eval(), config


def saved(tmp_path, family: str, layout: FeatureLayout, seed: int = 0) -> str:
    model, config = spread_model(family, layout, seed)
    path = str(tmp_path / f"{family}-{seed}.pt")
    save_model(path, model, config, layout)
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_with_parity(world, tmp_path, family):
    spec, layout, _ = world
    rows = parity_rows(spec, layout)
    assert rows.rows == 3000 and rows.labels.sum() > 50  # every eval row of the day, with clicks among them
    results = export_checkpoint(spec, family, "student", saved(tmp_path, family, layout), rows, str(tmp_path),
                                formats=["onnx", "torchscript"])
    for fmt in ("onnx", "torchscript"):
        parity = results[fmt]["parity"]
        assert parity["passed"] and parity["rows"] == 3000, parity
        assert parity["max_scaled_diff"] <= TOLERANCE[fmt]
        assert parity["auc_abs_diff"] <= 1e-6
        assert 0.3 < parity["auc_eager"] < 0.7  # an untrained model, but a real ranking of real rows
        assert storage.exists(f"{results[fmt]['dir']}/{SIGNATURE}")
    assert json.loads(open(f"{results['onnx']['dir']}/parity.json").read())["max_abs_diff"] == \
        results["onnx"]["parity"]["max_abs_diff"]
    about = read_signature(results["onnx"]["dir"]).about  # what decides whether a kept export is made again
    assert about["graph_code"] == graph_code_fingerprint(FAMILIES[family].get("factory"))
    assert (about["graph_code"] != graph_code_fingerprint()) == (family == "custom")  # the plug-in's code counts


def test_the_id_hash_in_the_graph_is_torchs_on_extreme_ids(world):
    """The graph's arithmetic shift (`export._arithmetic_right_shift`, two ops) gives the eager hash's buckets
    for ids at and near the int64 limits, negative ids and 0: a wrong bucket would pick another embedding row."""
    import onnx
    import onnxruntime as ort

    _, layout, _ = world
    model, config = spread_model("mlp", layout)
    exported = export_model(model, config, layout, "onnx", raw_columns={}, dense_fill=0.0, sequence_delimiter=None,
                            about={"role": "student"})
    ops = {node.op_type for node in onnx.load_from_string(exported.model).graph.node}
    assert not ops & {"BitShift", "Where"}, ops  # not the exporter's seven-op emulation of the sign
    extremes = np.array([-2**63, 2**63 - 1, -1, 0, 1, -2**29, 2**29, -2**29 - 1, 2**35 + 7, -2**62 + 3], np.int64)
    rng = np.random.default_rng(0)
    ids = np.concatenate([extremes, rng.integers(-2**63, 2**63 - 1, 990, dtype=np.int64, endpoint=True)])
    fields = len(layout.categorical)
    arrays = {"categorical": np.stack([np.roll(ids, shift) for shift in range(fields)], axis=1),
              "dense": rng.normal(size=(len(ids), len(layout.dense))).astype(np.float32)}
    if layout.sequence_length:
        arrays["sequence"] = np.stack([np.roll(ids, -shift) for shift in range(layout.sequence_length)], axis=1)
    session = ort.InferenceSession(exported.model, providers=["CPUExecutionProvider"])
    logits = session.run(None, {i.name: arrays[i.name] for i in session.get_inputs()})[0]
    with torch.no_grad():
        eager = model({k: torch.from_numpy(v) for k, v in arrays.items()}).numpy()
    assert np.abs(logits - eager).max() <= TOLERANCE["onnx"] * max(1.0, np.abs(eager).max())


def test_other_shifts_keep_the_exporters_translation():
    """A plug-in's int32 shift, or an int64 shift by 63, is not the hash's: it is exported as the exporter
    translates it, with the same values as torch's."""
    import warnings

    import onnxruntime as ort

    from pipeline.export import OPSET, SHIFT_TRANSLATION

    class Shifts(torch.nn.Module):
        def forward(self, ids):
            return (ids >> 29) + (ids >> 63) + (ids.to(torch.int32) >> 3).to(torch.int64)

    ids = torch.cat([torch.randint(-2**62, 2**62, (300, 4)), torch.tensor([[-2**63, 2**63 - 1, -1, 0]])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Shifts(), (ids,), dynamo=True, opset_version=OPSET, verbose=False,
                                    custom_translation_table=SHIFT_TRANSLATION)
    ops = [node.op_type for node in program.model_proto.graph.node]
    assert ops.count("Where") == 2 and ops.count("Div") == 1  # two emulated shifts, one by the hash's ops
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_array_equal(out, Shifts()(ids).numpy())


@pytest.mark.parametrize("family", ["mlp", "deepfm"])
def test_missing_indicators_export_with_parity_and_a_nan_in_the_signature(world, family):
    """A model with missing indicators fills and flags missing dense values inside the graph: the exports
    give the eager logits on rows with NaN dense values, and the scorer's normaliser hands over NaN."""
    from pipeline.export import eager_predictor, exported_predictor
    from pipeline.features import table_to_arrays

    spec, plain, _ = world
    layout = FeatureLayout(**{**plain.to_dict(), "missing_indicators": True, "dense_fill": 1.5})
    model, config = spread_model(family, layout)
    rows = parity_rows(spec, layout)
    arrays = {k: v.copy() for k, v in rows.arrays.items()}
    arrays["dense"][::7, 0] = np.nan  # every 7th row misses its first dense value
    arrays["dense"][::11, -1] = np.nan
    eager = eager_predictor(model)(arrays)
    assert np.isfinite(eager).all()
    for fmt in ("onnx", "torchscript"):
        exported = export_model(model, config, layout, fmt, raw_columns={}, dense_fill=1.5, sequence_delimiter=None,
                                about={"role": "student"})
        assert np.abs(exported_predictor(exported)(arrays) - eager).max() <= 1e-5, fmt
    signature = exported.signature
    assert signature.feature_layout.missing_indicators and signature.normaliser().dense_fill is None
    column = plain.dense[0]
    table = pa.table({column: pa.array([1.0, None], pa.float32())})
    assert np.isnan(table_to_arrays(normalise(table, signature.normaliser()), FeatureLayout(
        categorical=(), dense=(column,)))["dense"][1, 0])


def test_multiclass_export_keeps_every_logit(world, tmp_path):
    spec, layout, _ = world
    model, config = spread_model("mlp", layout, out_dim=4)
    rows = parity_rows(spec, layout, rows=500)
    exported = export_model(model, config, layout, "onnx", raw_columns=rows.kinds, dense_fill=0.0,
                            sequence_delimiter=None, about={"role": "student"})
    from pipeline.export import check_parity, exported_predictor

    logits = exported_predictor(exported)(rows.arrays)
    assert logits.shape == (500, 4)
    assert check_parity(model, logits, rows.arrays, None, "onnx")["max_abs_diff"] <= TOLERANCE["onnx"]
    assert exported.signature.output["shape"] == ["batch", 4] and exported.signature.task == "multiclass"


def test_signature_round_trip(world, tmp_path):
    spec, layout, _ = world
    rows = parity_rows(spec, layout, rows=200)
    results = export_checkpoint(spec, "student", "student", saved(tmp_path, "mlp", layout), rows, str(tmp_path),
                                formats=["onnx"])
    signature = read_signature(results["onnx"]["dir"])
    assert signature.feature_layout == layout
    assert signature.raw_columns == {"user_id": "integer", "item_id": "integer", "category_id": "integer",
                                     "hour": "integer", "device": "integer", "position": "integer",
                                     "price": "number", "user_activity": "number", "item_popularity": "number",
                                     "hist_item_ids": "list<integer>"}
    assert [(i["name"], i["dtype"], i["shape"]) for i in signature.inputs] == [
        ("categorical", "int64", ["batch", 6]), ("dense", "float32", ["batch", 3]), ("sequence", "int64", ["batch", 5])]
    assert signature.missing_id == -1 and "hash_array" in signature.string_id_hash
    assert signature.about["checkpoint_sha256"] and signature.about["opset"] == 18
    import onnxruntime as ort

    session = ort.InferenceSession(f"{results['onnx']['dir']}/model.onnx")
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("categorical", "tensor(int64)"), ("dense", "tensor(float)"), ("sequence", "tensor(int64)")]
    assert session.get_inputs()[0].shape[0] not in (1, 7)  # the batch is dynamic, not the tracing example's


def test_int8_and_fp16_embeddings_are_smaller_and_kept_only_within_the_auc_budget(world, tmp_path):
    spec, layout, _ = world
    rows = parity_rows(spec, layout)
    checkpoint = saved(tmp_path, "mlp", layout)
    results = export_checkpoint(spec, "student", "student", checkpoint, rows, str(tmp_path))
    int8 = results["onnx-int8"]["parity"]
    table = 6 * 500 * 8 * 4  # fields x buckets x dim x fp32 bytes: most of the model
    assert results["onnx"]["bytes"] - results["onnx-int8"]["bytes"] >= 0.7 * table  # 1 byte a weight, not 4
    assert 0 < int8["max_abs_diff"] < 0.1 and abs(int8["auc_loss"]) < 0.005  # rounded on purpose, but close
    assert int8["auc_fp32"] == pytest.approx(results["onnx"]["parity"]["auc_exported"])
    fp16 = results["onnx-fp16"]["parity"]  # 2 bytes a weight; rounding an entry of ~0.15 moves it by <= 1e-4
    assert 0.45 * table <= results["onnx"]["bytes"] - results["onnx-fp16"]["bytes"] <= 0.55 * table
    assert 0 < fp16["max_abs_diff"] < 0.01 and abs(fp16["auc_loss"]) <= 0.0005 and results["onnx-fp16"]["kept"]
    assert read_signature(results["onnx-fp16"]["dir"]).quantized == "fp16"
    kept = int8["auc_loss"] <= spec.export.max_quantized_auc_loss
    assert results["onnx-int8"]["kept"] == int8["passed"] == kept
    # the budget decides: none (a loss above 0 is too much) or a loose one
    for budget, expect in ((-1.0, False), (0.01, True)):
        strict = spec.model_copy(update={"export": spec.export.model_copy(update={"max_quantized_auc_loss": budget})})
        exported = export_checkpoint(strict, "s", "student", checkpoint, rows, str(tmp_path / str(budget)))
        for mode in ("int8", "fp16"):
            out, variant = exported[f"onnx-{mode}"], tmp_path / str(budget) / "export" / "s" / f"onnx-{mode}"
            assert out["kept"] is expect and (variant / "model.onnx").exists() is expect
            if expect:
                assert read_signature(out["dir"]).quantized == mode
            else:
                assert f"{mode.upper()} embeddings lose" in out["parity"]["error"]


def test_an_op_the_exporter_lacks_is_named(world):
    spec, layout, _ = world
    config = ModelConfig(model="custom", factory="tests.plugin_models:running_max")
    model = build_model(config, layout)
    with pytest.raises(ExportError, match=r"op aten\.cummax is not supported.*--format"):
        export_model(model, config, layout, "onnx", raw_columns={}, dense_fill=0.0, sequence_delimiter=None,
                     about={"role": "student"})
    exported = export_model(model, config, layout, "torchscript", raw_columns={}, dense_fill=0.0,
                            sequence_delimiter=None, about={"role": "student"})
    assert exported.signature.file == "model.ts"  # the other format still works


def test_a_broken_export_fails_parity_and_writes_only_the_report(world, tmp_path, monkeypatch):
    spec, layout, _ = world
    rows = parity_rows(spec, layout, rows=500)
    import pipeline.stages.export as stage

    real = stage.exported_predictor
    monkeypatch.setattr(stage, "exported_predictor", lambda exported, threads=1: (
        lambda arrays: real(exported, threads)(arrays) + np.float32(1e-3)))  # a subtly wrong runtime
    with pytest.raises(ParityError, match=r"max \|logit diff\| 0.001 .* > tolerance 1e-05\) over 500 rows.*Worst: row"):
        export_checkpoint(spec, "student", "student", saved(tmp_path, "mlp", layout), rows, str(tmp_path),
                          formats=["onnx"])
    directory = tmp_path / "export" / "student" / "onnx"
    assert (directory / "parity.json").exists() and not (directory / "model.onnx").exists()
    assert not json.loads((directory / "parity.json").read_text())["passed"]


# ---- distill export / distill score -------------------------------------------------------------------------

@pytest.fixture
def finished_run_dir(world, tmp_path):
    """A run directory as `distill run` leaves it (spec.json, metrics.json naming the checkpoints)."""
    return _finished_run_dir(world, tmp_path)


def _finished_run_dir(world, tmp_path):
    spec, layout, _ = world
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    models = {"teacher": {"role": "teacher", "checkpoint": saved(tmp_path, "dcn_v2", layout, seed=1)},
              "student_distilled": {"role": "distilled", "checkpoint": saved(tmp_path, "mlp", layout, seed=2)},
              "student_hard": {"role": "hard", "checkpoint": saved(tmp_path, "mlp", layout, seed=3)}}
    (run_dir / "metrics.json").write_text(json.dumps({"models": models, "selection": {"recommended": "student_hard"}}))
    return run_dir


def test_distill_export_defaults_to_the_recommended_student(finished_run_dir, capsys):
    assert main(["export", str(finished_run_dir), "--format", "onnx"]) == 0
    assert "onnx:" in capsys.readouterr().out
    exported = json.loads((finished_run_dir / "metrics.json").read_text())["export"]["models"]
    assert list(exported) == ["student_hard"] and exported["student_hard"]["onnx"]["parity"]["passed"]
    assert (finished_run_dir / "export" / "student_hard" / "onnx" / "model.onnx").exists()


def test_distill_export_bad_input(finished_run_dir, tmp_path, capsys):
    assert main(["export", str(finished_run_dir), "--model", "student_big"]) == 2
    assert "has no model 'student_big'; its models are ['student_distilled', 'student_hard', 'teacher']" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(finished_run_dir), "--format", "tflite"])
    assert exit_.value.code == 2 and "choose from 'onnx', 'torchscript'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported_student(world, tmp_path_factory):
    """The distilled student of a finished run, exported by `distill export` once for the module's tests."""
    run_dir = _finished_run_dir(world, tmp_path_factory.mktemp("exported"))
    assert main(["export", str(run_dir), "--model", "student_distilled", "--format", "onnx"]) == 0
    return run_dir / "export" / "student_distilled" / "onnx"


def test_score_matches_the_parity_checked_logits(world, exported_student, tmp_path):
    spec, layout, _ = world
    log = f"{spec.data.path}/date=2026-11-03"
    out = tmp_path / "scored.parquet"
    result = score_log(str(exported_student), log, str(out))
    scored = pq.read_table(out)
    assert result["rows"] == scored.num_rows == 3000  # rows in = rows out
    from pipeline.export import eager_logits
    from pipeline.models import load_model

    model, _, _ = load_model(read_signature(str(exported_student)).about["checkpoint"])
    rows = parity_rows(spec, layout)
    np.testing.assert_allclose(scored.column("logit").to_numpy(), eager_logits(model, rows.arrays), atol=1e-5)
    np.testing.assert_allclose(scored.column("probability").to_numpy(),
                               1 / (1 + np.exp(-scored.column("logit").to_numpy())), rtol=1e-6)
    assert scored.column("event_id").to_pylist() == pq.read_table(log).column("event_id").to_pylist()


def test_score_without_torch(world, exported_student, tmp_path):
    """The artifact stands alone: `distill score` in a process where importing torch fails."""
    spec, _, _ = world
    day = pq.read_table(f"{spec.data.path}/date=2026-11-03").slice(0, 700)
    csv = tmp_path / "log.csv"
    pacsv.write_csv(day.drop_columns(["hist_item_ids"]).append_column(
        "hist_item_ids", pa.array(["^".join(map(str, h)) for h in day.column("hist_item_ids").to_pylist()])), csv)
    parquet = tmp_path / "log.parquet"
    pq.write_table(day, parquet)
    blocker = ("import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ImportError('torch is blocked in this process')\n"
               "sys.meta_path.insert(0, _NoTorch())\n"
               "from pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "scored.parquet"
    proc = subprocess.run([sys.executable, "-c", blocker, "score", str(exported_student), str(parquet), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "scored 700 rows" in proc.stdout and pq.read_table(out).num_rows == 700
    proc = subprocess.run([sys.executable, "-c", blocker, "-c", "import torch"], capture_output=True, text=True)
    assert proc.returncode != 0  # the blocker works: torch really cannot load there
    # a CSV log with the sequence as delimited text is a dtype mismatch, not a silent parse
    proc = subprocess.run([sys.executable, "-c", blocker, "score", str(exported_student), str(csv), "--out",
                           str(tmp_path / "csv.parquet")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "column 'hist_item_ids' holds text" in proc.stderr and "list<integer>" in proc.stderr


def test_score_names_missing_and_mistyped_columns(world, exported_student, tmp_path, capsys):
    spec, _, _ = world
    day = pq.read_table(f"{spec.data.path}/date=2026-11-03").slice(0, 100)
    bad = tmp_path / "bad.parquet"
    pq.write_table(day.drop_columns(["price"]).set_column(
        day.column_names.index("user_id") - 0, "user_id", pa.array(day.column("user_id").to_numpy().astype(float))),
        bad)
    assert main(["score", str(exported_student), str(bad), "--out", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert "column 'price' is missing" in err
    assert "column 'user_id' holds float (double), the model was evaluated on integer" in err
    assert not (tmp_path / "o.parquet").exists()
    text_ids = tmp_path / "text-ids.csv"
    pacsv.write_csv(day.drop_columns(["hist_item_ids"]).set_column(
        day.column_names.index("user_id"), "user_id", pa.array([f"u{v}" for v in day.column("user_id").to_pylist()])),
        text_ids)
    with pytest.raises(DataError, match=r"text-ids.csv: column 'user_id': .*invalid value 'u\d+'.*evaluated on"):
        score_log(str(exported_student), str(text_ids), str(tmp_path / "o.parquet"))
    with pytest.raises(DataError, match="no such file"):
        score_log(str(exported_student), str(tmp_path / "none"), str(tmp_path / "o.parquet"))
    signature = read_signature(str(exported_student))
    check_log_schema(day.schema, signature, "ok")  # the evaluation day itself passes


def test_score_makes_a_missing_out_folder_and_names_an_unwritable_one(world, exported_student, tmp_path, capsys):
    spec, _, _ = world
    log = str(tmp_path / "log.parquet")
    pq.write_table(pq.read_table(f"{spec.data.path}/date=2026-11-03").slice(0, 50), log)
    out = tmp_path / "new" / "folder" / "scored.parquet"
    assert main(["score", str(exported_student), log, "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 50
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["score", str(exported_student), log, "--out", str(tmp_path / "a-file" / "scored.parquet")]) == 2
    err = capsys.readouterr().err
    assert "output directory" in err and "a-file is not writable" in err and "set --out" in err
    assert "Traceback" not in err


def test_parity_allows_an_auc_change_only_as_large_as_near_ties_explain():
    from pipeline.serving import parity_report

    labels = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    eager = np.array([0.5, 0.50000003, -1.0, 2.0, 0.1, -0.3, 0.7, -2.0])  # float64: no rounding into ties
    swapped = eager.copy()
    swapped[0] = 0.50000006  # 6e-8 moves a click above the non-click 3e-8 away: one pair of 12 flips
    report = parity_report(eager, swapped, labels, 1e-5)
    assert report["auc_abs_diff"] == pytest.approx(1 / 12) and report["auc_flippable"] == pytest.approx(1 / 12)
    assert report["passed"]  # the logits agree to 6e-8; the AUC moved only by the near-tied pair
    wrong = eager.copy()
    wrong[3] = -3.0  # a click falls below every non-click: a real ranking error
    assert not parity_report(eager, wrong, labels, 1e-5)["passed"]
