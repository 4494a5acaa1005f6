"""report.md and its plots: hand-made metrics, old metrics.json files, multiclass, and `distill report`."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipeline import storage
from pipeline.metrics import score_model, summarize
from pipeline.cli import main
from pipeline.report import plot_names, render_report, write_plots, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
def _model(role: str, auc: float, total: int, n_bytes: int, p50: float) -> dict:
    return {"role": role, "family": "mlp" if role != "teacher" else "dcn_v2", "auc": auc, "gauc": auc - 0.01,
            "log_loss": 0.15, "mean_ctr_pred": 0.04, "params": {"total": total, "embedding": total - 100, "dense": 100},
            "bytes": n_bytes, "calibration": {"ece": 0.0123, "bins": [
                {"lo": 0.0, "hi": 0.1, "mean_pred": 0.03, "observed": 0.035, "rows": 900},
                {"lo": 0.1, "hi": 0.2, "mean_pred": 0.14, "observed": 0.12, "rows": 100}]},
            "latency": {"batch1_p50_ms": p50, "batch1_p99_ms": 2 * p50, "batched_rows_per_s": 50000.0,
                        "batch_size": 1024, "threads": 1},
            "slices": [{"value": "ios", "rows": 600, "click_rate": 0.05, "auc": auc + 0.01, "log_loss": 0.2},
                       {"value": "web", "rows": 400, "click_rate": 0.02, "auc": auc - 0.01, "log_loss": 0.1}]}


@pytest.fixture
def run_metrics():
    """Builder of a full metrics.json dict (the shape job.py writes), binary by default."""

    def build(task: str = "binary") -> dict:
        models = {"teacher": _model("teacher", 0.70, 1000, 4_000_000, 2.0),
                  "student_distilled": _model("distilled", 0.69, 100, 400_000, 0.5),
                  "student_hard": _model("hard", 0.66, 100, 400_000, 0.5)}
        models["student_distilled"]["agreement"] = {"pearson": 0.91, "spearman": 0.89, "mean_abs_prob_diff": 0.0042}
        if task == "multiclass":
            for m, accuracy in zip(models.values(), (0.8, 0.75, 0.7)):
                for key in ("auc", "gauc", "mean_ctr_pred", "calibration", "slices"):
                    m.pop(key)
                m |= {"accuracy": accuracy, "top5_accuracy": 0.95, "log_loss": 0.9}
            models["student_distilled"]["agreement"] = {"top1_agreement": 0.88}
        steps = [{"step": s, "lr": 0.01 * min(1, (s + 1) / 3), "loss": 1 / (s + 1), "hard_loss": 0.5 / (s + 1),
                  "soft_loss": 0.5 / (s + 1)} for s in range(10)]
        history = [{"epoch": e, "loss": 0.3 - 0.1 * e, "hard_loss": 0.2, "soft_loss": 0.1 - 0.05 * e,
                    "rows_per_s": 1234.0, "seconds": 10.0} for e in range(2)]
        return {
            "job": "unit", "spec_hash": "abc123", "task": task, "train": {"days": ["2026-11-01"]},
            "label": {"total_rows": 3000, "shards": 2, "status": "labelled", "relabelled_days": ["2026-11-01"],
                      "teacher_sha256": "0123456789abcdef", "temperature": 2.0},
            "eval": {"days": ["2026-11-04"], "rows": 1000, "click_rate": 0.038,
                     "ceiling_auc": 0.8 if task == "binary" else None, "slice_by": "device"},
            "models": models,
            "training": {"distilled": {"history": history, "steps": steps, "restarts": 1},
                         "hard": {"history": [{k: v for k, v in h.items() if k != "soft_loss"} for h in history]}},
            "summary": summarize(models),
        }

    return build


def _table(report: str) -> dict[str, dict[str, str]]:
    """The main table of a report as {model: {column: cell}}."""
    lines = report.split("\n\n")[2].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_render_report_formats_every_section(run_metrics):
    report = render_report(run_metrics())
    table = _table(report)
    teacher = table["teacher"]
    assert (teacher["AUC"], teacher["GAUC"], teacher["ECE"]) == ("0.7000", "0.6900", "0.0123")
    assert (teacher["params"], teacher["size"], teacher["p50 ms"], teacher["p99 ms"]) == ("1,000", "4.0 MB", "2.000",
                                                                                          "4.000")
    assert table["student_distilled"]["rows/s"] == "50,000"
    assert table["ceiling (true CTR)"]["AUC"] == "0.8000"
    assert "the teacher is 0.1000 below it" in report
    assert "- Gap recovery (distilled - hard) / (teacher - hard): 75.0%." in report
    assert "- Distilled student vs hard-label student: +0.0300 AUC." in report
    assert "10.0x fewer parameters than the teacher and is 10.0x smaller on disk (400.0 kB vs 4.0 MB)" in report
    assert "(4.0x speed-up)" in report
    assert "| student_distilled | 0.9100 | 0.8900 | 0.0042 |" in report  # agreement
    assert "## By device" in report and "| ios | 600 | 5.00% | 0.7100 | 0.7000 | 0.6700 |" in report
    assert ("3,000 rows in 2 shards (labelled), labelled now: 2026-11-01, teacher sha256 0123456789ab, "
            "temperature 2.0") in report
    assert "| distilled | 2 | 0.2000 | 0.2000 | 0.0500 | 1,234 | 20.0 | 1 |" in report  # last epoch, 2 epochs
    assert "| hard | 2 | 0.2000 | 0.2000 | - | 1,234 | 20.0 | - |" in report
    for name in ("loss_curves", "lr_schedule", "calibration", "auc_bars"):
        assert f"(plots/{name}.png)" in report


def test_render_report_multiclass(run_metrics):
    report = render_report(run_metrics("multiclass"))
    table = _table(report)
    assert "AUC" not in table["teacher"] and table["teacher"]["accuracy"] == "0.8000"
    assert table["student_hard"]["top-5"] == "0.9500"
    assert "- Gap recovery (distilled - hard) / (teacher - hard): 50.0%." in report
    assert "+0.0500 accuracy" in report and "top-1 agreement" in report and "click rate" not in report
    assert "(plots/accuracy_bars.png)" in report and "calibration.png" not in report


def test_gap_recovery_undefined_when_the_teacher_loses(run_metrics):
    metrics = run_metrics()
    metrics["models"]["teacher"]["auc"] = 0.60
    del metrics["summary"]  # recomputed from the models
    assert "gap recovery is undefined" in render_report(metrics)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_write_report_writes_the_markdown_and_non_empty_pngs(run_metrics, tmp_path, task):
    write_report(str(tmp_path), run_metrics(task))
    report = (tmp_path / "report.md").read_text()
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    expected = {"binary": ["auc_bars.png", "calibration.png", "loss_curves.png", "lr_schedule.png"],
                "multiclass": ["accuracy_bars.png", "loss_curves.png", "lr_schedule.png"]}[task]
    assert pngs == expected
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/{name})" in report


def test_write_plots_without_steps_draws_epochs(run_metrics, tmp_path):
    metrics = run_metrics()
    del metrics["training"]["distilled"]["steps"]
    written = write_plots(metrics, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in written] == ["loss_curves.png", "calibration.png", "auc_bars.png"]


def test_distill_report_rebuilds_the_report_from_metrics_json(tmp_path, capsys, run_metrics):
    rng = np.random.default_rng(5)
    labels = (rng.random(3000) < 0.1).astype(int)
    truth = rng.normal(size=3000) + 1.5 * labels
    logits = {"teacher": truth, "student_distilled": truth + rng.normal(size=3000),
              "student_hard": truth + 2 * rng.normal(size=3000)}
    shape = run_metrics()  # what job.py writes, with real scores in place of its models
    models = {name: score_model(labels, z, rng.integers(0, 50, 3000), bins=10,
                                teacher_logits=None if name == "teacher" else logits["teacher"])
              | {k: shape["models"][name][k] for k in ("role", "family", "params", "bytes", "latency")}
              for name, z in logits.items()}
    metrics = shape | {"eval": shape["eval"] | {"rows": 3000, "click_rate": float(labels.mean()), "slice_by": None},
                       "models": models, "summary": summarize(models)}
    storage.atomic_write_json(str(tmp_path / "metrics.json"), metrics)

    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report in capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    table = _table(report)
    for name, m in saved["models"].items():  # every number in the table is metrics.json's, rounded
        assert (table[name]["AUC"], table[name]["GAUC"]) == (f"{m['auc']:.4f}", f"{m['gauc']:.4f}")
        assert table[name]["log-loss"] == f"{m['log_loss']:.4f}"
        assert table[name]["ECE"] == f"{m['calibration']['ece']:.4f}"
    assert f"{saved['summary']['gap_recovery']:.1%}" in report
    assert (tmp_path / "plots" / "calibration.png").stat().st_size > 0


def test_distill_report_without_metrics_json_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.json not found" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_distill_report_with_broken_metrics_json_exits_2(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text('{"job": ')
    assert main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_write_report_to_a_remote_store_goes_through_storage(run_metrics):
    # memory:// stands in for s3://: both are remote fsspec filesystems written with one put per file.
    import fsspec

    write_report("memory://distill-report-test/run", run_metrics())
    fs = fsspec.filesystem("memory")
    assert fs.cat("/distill-report-test/run/report.md").startswith(b"# Distillation report: unit")
    assert fs.cat("/distill-report-test/run/plots/auc_bars.png")[:8] == PNG_MAGIC
