"""report.md and its plots: hand-made metrics, old metrics.json files, multiclass, and `distill report`."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipeline import storage
from pipeline.metrics import score_model, summarize
from pipeline.cli import main
from pipeline.plots import plot_names, write_plots
from pipeline.report import render_report, write_report
from pipeline.verdict import comparison_pairs, paired_bootstrap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
def _model(role: str, auc: float, total: int, n_bytes: int, p50: float) -> dict:
    return {"role": role, "family": "mlp" if role != "teacher" else "dcn_v2", "auc": auc, "gauc": auc - 0.01,
            "log_loss": 0.15, "mean_ctr_pred": 0.04, "params": {"total": total, "embedding": total - 100, "dense": 100},
            "bytes": n_bytes, "calibration": {"ece": 0.0123, "bins": [
                {"lo": 0.0, "hi": 0.1, "mean_pred": 0.03, "observed": 0.035, "rows": 900},
                {"lo": 0.1, "hi": 0.2, "mean_pred": 0.14, "observed": 0.12, "rows": 100}]},
            "latency": {"batch1_p50_ms": p50, "batch1_p99_ms": 2 * p50, "batched_rows_per_s": 50000.0,
                        "batch_size": 1024, "threads": 1},
            "slices": [{"value": "ios", "rows": 600, "positives": 30, "click_rate": 0.05, "scored": True,
                        "auc": auc + 0.01, "log_loss": 0.2},
                       {"value": "web", "rows": 400, "positives": 8, "click_rate": 0.02, "scored": False,
                        "reason": "fewer than 10 positives"}]}


@pytest.fixture
def run_metrics():
    """Builder of a full metrics.json dict (the shape job.py writes), binary by default."""

    def build(task: str = "binary", bootstrap: bool = True) -> dict:
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
            "eval": {"days": ["2026-11-04"], "rows": 1000, "positives": 38 if task == "binary" else None,
                     "click_rate": 0.038, "ceiling_auc": 0.8 if task == "binary" else None, "slice_by": "device",
                     "bootstrap": _bootstrap(task) if bootstrap else None},
            "models": models,
            "training": {"distilled": {"history": history, "steps": steps, "restarts": 1},
                         "hard": {"history": [{k: v for k, v in h.items() if k != "soft_loss"} for h in history]}},
            "summary": summarize(models, _bootstrap(task) if bootstrap else None),
        }

    return build


def _bootstrap(task: str) -> dict:
    """Hand-made intervals around the fixture's scores (AUC 0.70 / 0.69 / 0.66, accuracy 0.80 / 0.75 / 0.70)."""
    if task == "multiclass":
        return {"metric": "accuracy", "rounds": 200, "seed": 0, "confidence": 0.95,
                "models": {"teacher": [0.78, 0.82], "student_distilled": [0.73, 0.77], "student_hard": [0.68, 0.72]},
                "differences": {"teacher_minus_hard": [0.08, 0.12], "distilled_minus_hard": [0.03, 0.07],
                                "teacher_minus_distilled": [0.03, 0.07]}}
    return {"metric": "auc", "rounds": 200, "seed": 0, "confidence": 0.95,
            "models": {"teacher": [0.68, 0.72], "student_distilled": [0.67, 0.71], "student_hard": [0.64, 0.68]},
            "differences": {"teacher_minus_hard": [0.03, 0.05], "distilled_minus_hard": [0.01, 0.05],
                            "teacher_minus_distilled": [-0.005, 0.025]}}


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
    assert (teacher["95% CI"], table["student_hard"]["95% CI"]) == ("[0.6800, 0.7200]", "[0.6400, 0.6800]")
    assert (teacher["params"], teacher["size"], teacher["p50 ms"], teacher["p99 ms"]) == ("1,000", "4.0 MB", "2.000",
                                                                                          "4.000")
    assert table["student_distilled"]["rows/s"] == "50,000"
    assert (table["ceiling (true CTR)"]["AUC"], table["ceiling (true CTR)"]["95% CI"]) == ("0.8000", "-")
    assert "the teacher is 0.1000 below it" in report
    assert "from 2026-11-04, click rate 3.80%, 38 positives (held out" in report
    assert ("- AUC differences, paired bootstrap over the 1,000 eval rows (200 resamples), 95% CI: teacher - hard "
            "+0.0400 [+0.0300, +0.0500]; distilled - hard +0.0300 [+0.0100, +0.0500]; teacher - distilled +0.0100 "
            "[-0.0050, +0.0250].") in report
    assert ("- **Distillation helped on the eval days: distilled - hard +0.0300 AUC (95% CI [+0.0100, "
            "+0.0500]).**") in report
    assert "- Gap recovery (distilled - hard) / (teacher - hard): 75.0%." in report
    assert "10.0x fewer parameters than the teacher and is 10.0x smaller on disk (400.0 kB vs 4.0 MB)" in report
    assert "(4.0x speed-up)" in report
    assert "| student_distilled | 0.9100 | 0.8900 | 0.0042 |" in report  # agreement
    assert "## By device" in report and "| ios | 600 | 30 | 5.00% | 0.7100 | 0.7000 | 0.6700 |" in report
    assert "| web | 400 | 8 | 2.00% | n/a | n/a | n/a |" in report
    assert "Not scored, too few clicks to compare models on: web (fewer than 10 positives)." in report
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
    assert table["teacher"]["95% CI"] == "[0.7800, 0.8200]" and "positives" not in report
    assert "- Accuracy differences, paired bootstrap" in report
    assert "teacher - hard +0.1000 [+0.0800, +0.1200]" in report
    assert "+0.0500 accuracy" in report and "top-1 agreement" in report and "click rate" not in report
    assert "(plots/accuracy_bars.png)" in report and "calibration.png" not in report


def test_gap_recovery_undefined_when_the_teacher_loses(run_metrics):
    metrics = run_metrics()
    metrics["models"]["teacher"]["auc"] = 0.60
    metrics["eval"]["bootstrap"]["differences"]["teacher_minus_hard"] = [-0.08, -0.04]
    del metrics["summary"]  # recomputed from the models
    assert ("- Gap recovery n/a: the teacher is not better than the hard-label student (lead -0.0600, 95% CI "
            "[-0.0800, -0.0400]).") in render_report(metrics)


def test_gap_recovery_is_na_when_the_teachers_lead_is_noise(run_metrics):
    # The run: a 0.0001 lead over the hard-label student printed "gap recovery: -2214%".
    metrics = run_metrics()
    metrics["models"]["teacher"]["auc"] = 0.6601
    metrics["models"]["student_distilled"]["auc"] = 0.6579
    metrics["eval"]["bootstrap"]["differences"] |= {"teacher_minus_hard": [-0.0021, 0.0023],
                                                    "distilled_minus_hard": [-0.0065, 0.0021]}
    metrics["selection"] = {"on": "validation", "gate": None, "recommended": "distilled",
                            "reason": "distillation helped on validation: auc 0.6620 distilled vs 0.6600 hard"}
    report = render_report(metrics)
    assert ("- Gap recovery n/a: the teacher is not better than the hard-label student (lead +0.0001, 95% CI "
            "[-0.0021, +0.0023]).") in report
    assert "(teacher - hard):" not in report  # no percentage printed
    assert ("- **Distillation made no measurable difference on the eval days: distilled - hard -0.0021 AUC (95% CI "
            "[-0.0065, +0.0021]), within noise.**") in report
    assert ("- On the eval days, which took no part in the choice, the difference is within noise "
            "(distilled - hard -0.0021).") in report


def test_the_report_lists_every_teacher_search_trial(run_metrics):
    trials = {"metric": "val_auc", "max_epochs": 2, "best": "t_1", "trials": [
        {"trial": "t_0", "config": {"model": "deepfm"}, "epochs": [{"epoch": 1, "val_auc": 0.61}],
         "finished": False, "stopped_early": True, "score": None, "error": None},
        {"trial": "t_1", "config": {"model": "dcn_v2"}, "epochs": [{"epoch": 1, "val_auc": 0.70}, {"epoch": 2, "val_auc": 0.72}],
         "finished": True, "stopped_early": False, "score": 0.72, "error": None}]}
    report = render_report(run_metrics() | {"search": {"teacher": trials}})
    section = report.split("## Teacher search: teacher")[1].split("\n## ")[0]
    assert "2 trials, 1 finished, ranked on val_auc" in section
    assert "| t_0 | deepfm | 1 of 2 | 0.61 | stopped early |" in section
    assert "| t_1 | dcn_v2 | 2 of 2 | 0.72 | **best** |" in section
    assert "## Teacher search" not in render_report(run_metrics())  # no search, no section


def test_old_metrics_without_a_bootstrap_report_as_before(run_metrics):
    metrics = run_metrics(bootstrap=False)
    for key in ("bootstrap", "positives"):
        del metrics["eval"][key]
    for model in metrics["models"].values():
        model["slices"] = [{k: v for k, v in s.items() if k not in ("positives", "scored", "reason")}
                           | {"auc": 0.7} for s in model["slices"]]
    report = render_report(metrics)
    assert "95% CI" not in _table(report)["teacher"] and "positives" not in report
    assert "- Distilled student vs hard-label student: +0.0300 AUC." in report
    assert ("- Gap recovery (distilled - hard) / (teacher - hard): 75.0% (not checked against noise: no bootstrap, "
            "eval.bootstrap was 0).") in report
    assert "| web | 400 | 2.00% | 0.7000 | 0.7000 | 0.7000 |" in report


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
    _same_report_as_html(report, (tmp_path / "report.html").read_text(), tmp_path / "plots")


def _same_report_as_html(report: str, page: str, plots) -> None:
    """report.html is report.md's content in its order, self-contained: every plot inline, nothing fetched."""
    import base64
    import re

    headings = re.findall(r"^#+ (.+)$", report, flags=re.MULTILINE)
    shown = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h[1-6][^>]*>(.*?)</h[1-6]>", page)]
    assert shown == headings and headings
    rows = [line for line in report.splitlines() if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line)]
    assert page.count("<tr>") == len(rows)  # every table row, header rows included
    for png in plots.iterdir():
        assert f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page and 'src="plots/' not in page


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
    roles = {"teacher": "teacher", "distilled": "student_distilled", "hard": "student_hard"}
    bootstrap = paired_bootstrap(labels, logits, 100, pairs=comparison_pairs(roles))
    metrics = shape | {"eval": shape["eval"] | {"rows": 3000, "positives": int(labels.sum()), "bootstrap": bootstrap,
                                                "click_rate": float(labels.mean()), "slice_by": None},
                       "models": models, "summary": summarize(models, bootstrap)}
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
        assert table[name]["95% CI"] == "[{:.4f}, {:.4f}]".format(*saved["eval"]["bootstrap"]["models"][name])
    summary = saved["summary"]
    assert summary["teacher_minus_hard_ci"][0] > 0  # noise 2 vs no noise: a real lead
    assert f"Gap recovery (distilled - hard) / (teacher - hard): {summary['gap_recovery']:.1%}." in report
    low = summary["distilled_minus_hard_ci"][0]
    assert f"distilled - hard {summary['distilled_minus_hard']:+.4f} [{low:+.4f}, " in report
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


def test_the_report_shows_each_calibrated_model_before_and_after(run_metrics, tmp_path):
    metrics = run_metrics()
    quantile = {"ece": 0.0150, "strategy": "quantile", "bins": [
        {"lo": 0.0, "hi": 0.05, "mean_pred": 0.02, "observed": 0.03, "rows": 500},
        {"lo": 0.05, "hi": 0.3, "mean_pred": 0.09, "observed": 0.06, "rows": 500}]}
    distilled = metrics["models"]["student_distilled"]
    distilled["calibration_quantile"] = quantile
    distilled["calibrated"] = {
        "method": "platt", "auc": 0.69, "log_loss": 0.1400, "mean_ctr_pred": 0.0380,
        "calibrator": {"method": "platt", "slope": 0.8, "intercept": -0.25, "fitted_on": {"rows": 2000, "positives": 77}},
        "calibration": {"ece": 0.0011, "bins": distilled["calibration"]["bins"], "strategy": "uniform"},
        "calibration_quantile": quantile | {"ece": 0.0021}}
    text = render_report(metrics)
    assert "## Calibration (fitted on validation, scored on the evaluation days)" in text
    row = next(line for line in text.splitlines() if line.startswith("| student_distilled | platt"))
    assert "platt: 0.8000 x logit -0.2500 | 2,000 rows, 77 positives | 0.0123 -> 0.0011 | 0.0150 -> 0.0021 | " \
           "0.1500 -> 0.1400 | 0.0400 -> 0.0380 | 0.6900 -> 0.6900 |" in row
    assert "| teacher | " not in text.split("## Calibration")[1].split("##")[0]  # only calibrated models
    assert any(path.endswith("calibration.png") for path in write_plots(metrics, str(tmp_path)))


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as browsers and jq do."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_metrics_are_written_as_strict_json_with_null_for_undefined_numbers(run_metrics, tmp_path):
    metrics = run_metrics()
    metrics["models"]["student_hard"]["slices"][1]["auc"] = float("nan")  # a slice without clicks
    metrics["eval"]["ceiling_auc"] = float("inf")
    path = str(tmp_path / "metrics.json")
    storage.atomic_write_json(path, metrics)
    written = strict_json((tmp_path / "metrics.json").read_text())
    assert written["models"]["student_hard"]["slices"][1]["auc"] is None and written["eval"]["ceiling_auc"] is None
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_json('{"auc": NaN}')
    write_report(str(tmp_path), written)  # and a report renders from what was written
