"""`report.md` (and the same as a self-contained `report.html`) from a run's metrics.json: what the numbers
mean for shipping the student.

Sections and columns follow what the run measured: accuracy instead of AUC for a multiclass task,
calibration and a ceiling for a binary one, agreement for students, slices with `eval.slice_by`, 95%
intervals with `eval.bootstrap`. The plots are drawn by `pipeline/plots.py`.
"""

from __future__ import annotations

import base64
import html
import math

from pipeline import storage
from pipeline.calibration import Calibrator
from pipeline.metrics import find_model, summarize
from pipeline.plots import plot_names, write_plots

PLOTS_DIR = "plots"
_ON_EVAL_DAYS = {"helped": "distillation helped", "hurt": "distillation hurt",
                 "within noise": "the difference is within noise"}  # summary["distillation"] in words
_AGREEMENT_NAMES = {"pearson": "Pearson (logits)", "spearman": "Spearman", "mean_abs_prob_diff": "mean abs prob diff",
                    "top1_agreement": "top-1 agreement"}


def write_report(run_dir: str, metrics: dict) -> str:
    """Writes `<run_dir>/report.md`, `<run_dir>/plots/*.png` and `<run_dir>/report.html` (the same report,
    self-contained: the plots inline); run_dir may be s3://. Returns the markdown."""
    written = write_plots(metrics, storage.join(run_dir, PLOTS_DIR))
    plots = {f"{PLOTS_DIR}/{path.rsplit('/', 1)[-1]}": path for path in written}
    text = render_report(metrics, plots=list(plots))
    storage.atomic_write_text(storage.join(run_dir, "report.md"), text)
    images = {name: storage.read_bytes(path) for name, path in plots.items()}
    storage.atomic_write_text(storage.join(run_dir, "report.html"),
                              render_html(text, images, title=f"Distillation report: {metrics['job']}"))
    return text


def render_html(markdown_text: str, images: dict[str, bytes], title: str) -> str:
    """The Markdown report as one self-contained HTML page: the same content in the same order (converted by
    the `markdown` package, tables included), each PNG inline as a data URI, no script, no network."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    for name, data in images.items():
        body = body.replace(f'src="{name}"', f'src="data:image/png;base64,{base64.b64encode(data).decode()}"')
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{PAGE_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


PAGE_CSS = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
            "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
            "th,td{border:1px solid #ccc;padding:.25rem .5rem}th{background:#f3f3f3}"
            "td{font-variant-numeric:tabular-nums}img{max-width:100%;display:block;margin:1rem 0}"
            "code{background:#f3f3f3;padding:0 .2rem}")  # report.html and the nightly history page


def render_report(metrics: dict, plots: list[str] | None = None) -> str:
    """The markdown report; `plots` are the image paths relative to the report (default: those metrics allow)."""
    task, models, bootstrap = metrics["task"], metrics["models"], metrics["eval"].get("bootstrap")
    summary = summarize(models, bootstrap)  # recomputed: old metrics.json files report as today's do
    sections = [
        _header(metrics),
        [render_table(models, metrics["eval"]["ceiling_auc"], task, bootstrap), *_ceiling(metrics)],
        _summary(metrics, summary, task),
        _selection(metrics.get("selection"), summary, metrics["eval"].get("held_out")),
        _search(metrics.get("search") or {}),
        _calibration(models),
        _agreement(models),
        _slices(metrics, task),
        _training(metrics["training"]),
        _export(metrics.get("export")),
        _plot_links(plots if plots is not None else [f"{PLOTS_DIR}/{name}" for name in plot_names(metrics)]),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def render_table(models: dict[str, dict], ceiling_auc: float | None = None, task: str = "binary",
                 bootstrap: dict | None = None) -> str:
    """Markdown table: one row per model (size, quality, latency), the ceiling (true-CTR AUC) last when known;
    with a bootstrap, the 95% interval of AUC (accuracy) next to it."""
    intervals = (bootstrap or {}).get("models")
    quality = ["accuracy", "top-5", "log-loss"] if task == "multiclass" else ["AUC", "GAUC", "log-loss", "ECE"]
    if intervals is not None:
        quality.insert(1, "95% CI")
    header = ["model", "family", "params", "embedding", "dense", "size", *quality, "p50 ms", "p99 ms", "rows/s"]
    rows = [header, ["---"] * 2 + ["---:"] * (len(header) - 2)]
    for name, m in models.items():
        params, latency = m["params"], m["latency"]
        if task == "multiclass":
            scores = [_num(m.get("accuracy")), _num(m.get("top5_accuracy")), _num(m.get("log_loss"))]
        else:  # gauc needs features.group
            scores = [_num(m.get("auc")), _num(m.get("gauc")), _num(m.get("log_loss")), _num(m["calibration"]["ece"])]
        if intervals is not None:
            scores.insert(1, _interval(intervals.get(name)))
        rows.append([name, m["family"], _count(params["total"]), _count(params["embedding"]),
                     _count(params["dense"]), _size(m["bytes"]), *scores, _num(latency["batch1_p50_ms"], 3),
                     _num(latency["batch1_p99_ms"], 3), _count(latency["batched_rows_per_s"])])
    if ceiling_auc is not None and task == "binary":
        rows.append(["ceiling (true CTR)", *["-"] * 5, _num(ceiling_auc), *["-"] * (len(header) - 7)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _header(metrics: dict) -> list[str]:
    evaluation = metrics["eval"]
    rate_text = f", click rate {evaluation['click_rate']:.2%}" if metrics["task"] == "binary" else ""
    if evaluation.get("positives") is not None:  # absent from runs before the bootstrap
        rate_text += f", {_count(evaluation['positives'])} positives"
    return [f"# Distillation report: {metrics['job']}", "",
            f"Evaluated on {_count(evaluation['rows'])} rows from {', '.join(evaluation['days'])}{rate_text} "
            f"({_held_out(metrics)}). Spec {metrics['spec_hash']}."]


def _held_out(metrics: dict) -> str:
    """How the evaluation rows were kept from training: whole days, or a hash fraction of the rows
    (`data.evaluation`; runs before it have no `held_out`)."""
    held_out, trained = metrics["eval"].get("held_out") or {"by": "days"}, ", ".join(metrics["train"]["days"])
    if held_out["by"] == "rows":
        return (f"held-out rows, not held-out days: the {held_out['fraction'] * 100:g}% of the rows whose "
                f"`{held_out['key']}` hashes into the evaluation side, kept out of training and of every choice "
                f"on {trained}")
    return f"held out from training on {trained}"


def _ceiling(metrics: dict) -> list[str]:
    ceiling = metrics["eval"]["ceiling_auc"]
    teacher = find_model(metrics["models"], "teacher", "teacher").get("auc")
    if ceiling is None:
        return []
    line = f"Ceiling: the true click probability scores AUC {ceiling:.4f} on these rows"
    return ["", line + ("." if _missing(teacher) else f"; the teacher is {ceiling - teacher:.4f} below it.")]


def _summary(metrics: dict, summary: dict, task: str) -> list[str]:
    models = metrics["models"]
    teacher, student = find_model(models, "teacher", "teacher"), find_model(models, "student_distilled", "distilled")
    lines = _verdict(summary, metrics["eval"], "accuracy" if task == "multiclass" else "AUC")
    if summary["compression_params"] is not None:
        line = f"- Compression: the student has {summary['compression_params']:.1f}x fewer parameters than the teacher"
        if summary["compression_bytes"] is not None:
            line += (f" and is {summary['compression_bytes']:.1f}x smaller on disk "
                     f"({_size(student['bytes'])} vs {_size(teacher['bytes'])})")
        lines.append(line + ".")
    if summary["latency_speedup"] is not None:
        lines.append(f"- Latency: batch-1 p50 {student['latency']['batch1_p50_ms']:.3f} ms for the student vs "
                     f"{teacher['latency']['batch1_p50_ms']:.3f} ms for the teacher "
                     f"({summary['latency_speedup']:.1f}x speed-up).")
    return [*lines, _label_line(metrics["label"])]


def _verdict(summary: dict, evaluation: dict, metric: str) -> list[str]:
    """The comparisons with their 95% intervals, whether distillation helped, and gap recovery or why it is n/a."""
    lines, bootstrap = [], evaluation.get("bootstrap")
    measured = [f"{name.replace('_minus_', ' - ')} {summary[name]:+.4f} {_interval(summary[f'{name}_ci'], True)}"
                for name in ("teacher_minus_hard", "distilled_minus_hard", "teacher_minus_distilled")
                if summary.get(f"{name}_ci") is not None]
    if measured:
        lines.append(f"- {metric[:1].upper()}{metric[1:]} differences, paired bootstrap over the "
                     f"{_count(evaluation['rows'])} eval rows ({bootstrap['rounds']} resamples), 95% CI: "
                     + "; ".join(measured) + ".")
    if summary.get("distillation_verdict") and summary.get("distilled_minus_hard_ci") is not None:
        lines.append(f"- **{summary['distillation_verdict']}**")
    elif summary["distilled_minus_hard"] is not None:  # no interval: the number alone, as before the bootstrap
        lines.append(f"- Distilled student vs hard-label student: {summary['distilled_minus_hard']:+.4f} {metric}.")
    reason = summary.get("gap_recovery_reason")
    if summary["gap_recovery"] is not None:
        note = f" ({reason})" if reason else ""
        lines.append(f"- Gap recovery (distilled - hard) / (teacher - hard): {summary['gap_recovery']:.1%}{note}.")
    elif reason:
        lines.append(f"- Gap recovery {reason}.")
    return lines


def _label_line(label: dict) -> str:
    line = f"- Soft labels: {_count(label['total_rows'])} rows in {label['shards']} shards ({label['status']})"
    if label["relabelled_days"]:
        line += f", labelled now: {', '.join(label['relabelled_days'])}"
    line += f", teacher sha256 {label['teacher_sha256'][:12]}"
    known = {"total_rows", "shards", "status", "relabelled_days", "teacher_sha256"}
    extra = [f"{k} {v}" for k, v in label.items() if k not in known and isinstance(v, (str, int, float, bool))]
    return line + "".join(f", {item}" for item in extra) + "."


def _selection(selection: dict | None, summary: dict, held_out: dict | None = None) -> list[str]:
    """The teacher gate and the student the run recommends, both decided on validation, and what the eval
    days or evaluation rows (`held_out`, held out from that choice) say. Absent from runs written before the
    validation split existed."""
    if not selection:
        return []
    lines = ["## Chosen on validation", ""]
    if gate := selection.get("gate"):
        state = "passed" if gate["passed"] else "**the teacher is too weak** (distill.on_weak_teacher: warn)"
        lines.append(f"- Teacher gate {state}: {gate['metric']} {gate['teacher']:.4f} against the hard-label "
                     f"student's {gate['hard']:.4f}, lift {gate['lift']:+.4f} (at least {gate['min_lift']:.4f} "
                     f"asked), on {gate['rows']:,} validation rows.")
    if candidates := selection.get("candidates"):
        metric = next(k for k in ("auc", "accuracy") if k in candidates[0])
        lines += [f"- Distillation candidates (`distill.search`), trained in one pass, scored on validation "
                  "at their kept epoch:", "", f"| candidate | soft loss | alpha | temperature | {metric} | "
                  "log-loss | epoch |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {'**' + c['role'] + '** (chosen)' if c['chosen'] else c['role']} | {c['soft_loss']} | "
                  f"{c['alpha']:g} | {c['temperature']:g} | {c[metric]:.4f} | {c['log_loss']:.4f} | {c['epoch']} |"
                  for c in candidates]
        lines.append("")
    lines.append(f"- Recommended student: **{selection['recommended']}**; {selection['reason']}.")
    if said := _ON_EVAL_DAYS.get(summary.get("distillation")):
        where = "evaluation rows" if (held_out or {}).get("by") == "rows" else "eval days"  # data.evaluation
        lines.append(f"- On the {where}, which took no part in the choice, {said} "
                     f"(distilled - hard {summary['distilled_minus_hard']:+.4f}).")
    return lines


def _search(searches: dict[str, dict]) -> list[str]:
    """Every trial of each teacher search (Ray Tune), ranked on validation; the best one is the teacher."""
    lines = []
    for role, trials in searches.items():
        finished = sum(t["finished"] for t in trials["trials"])
        lines += [f"## Teacher search: {role}", "",
                  f"{len(trials['trials'])} trials, {finished} finished, ranked on {trials['metric']} (validation) at "
                  f"each trial's kept epoch; ASHA stopped the others early. The best trial's model is the teacher.",
                  "", trials_table(trials), ""]
    return lines


def _calibration(models: dict[str, dict]) -> list[str]:
    """Each calibrated model before and after its calibrator (fitted on validation), on the eval days."""
    calibrated = {name: m for name, m in models.items() if m.get("calibrated")}
    if not calibrated:
        return []
    lines = ["## Calibration (fitted on validation, scored on the evaluation days)", "",
             "| model | calibrator | fitted on | ECE | ECE, equal-mass bins | log-loss | mean predicted CTR | AUC |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, m in calibrated.items():
        after, fitted = m["calibrated"], m["calibrated"]["calibrator"].get("fitted_on", {})
        pairs = [(m["calibration"]["ece"], after["calibration"]["ece"]),
                 ((m.get("calibration_quantile") or {}).get("ece"), after["calibration_quantile"]["ece"]),
                 (m["log_loss"], after["log_loss"]), (m.get("mean_ctr_pred"), after["mean_ctr_pred"]),
                 (m["auc"], after["auc"])]
        where = f"{_count(fitted.get('rows'))} rows, {_count(fitted.get('positives'))} positives"
        lines.append(f"| {name} | {_describe_calibrator(after['calibrator'])} | {where} | "
                     + " | ".join(f"{_num(before)} -> {_num(now)}" for before, now in pairs) + " |")
    return lines


def _describe_calibrator(raw: dict) -> str:
    return Calibrator.from_dict(raw).describe()


def _agreement(models: dict[str, dict]) -> list[str]:
    rows = {name: m["agreement"] for name, m in models.items() if m.get("agreement")}
    if not rows:
        return []
    keys = list(dict.fromkeys(k for values in rows.values() for k in values))
    lines = ["## Agreement with the teacher", "",
             "| model | " + " | ".join(_AGREEMENT_NAMES.get(k, k) for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(_num(values.get(k)) for k in keys) + " |" for name, values in rows.items()]
    return lines


def _slices(metrics: dict, task: str) -> list[str]:
    sliced = {name: {s["value"]: s for s in m["slices"]} for name, m in metrics["models"].items() if m.get("slices")}
    if not sliced:
        return []
    column = metrics["eval"]["slice_by"]
    metric, label = ("accuracy", "accuracy") if task == "multiclass" else ("auc", "AUC")
    first = next(iter(sliced.values()))
    counted = any("positives" in row for row in first.values())  # binary slices since the bootstrap
    rates = [] if task == "multiclass" else [*(["positives"] if counted else []), "click rate"]
    head = [column, "rows", *rates, *(f"{n} {label}" for n in sliced)]
    lines = [f"## By {column}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for value, row in first.items():
        cells = [str(value), _count(row["rows"]), *([_count(row.get("positives"))] if counted else [])]
        cells += [] if task == "multiclass" else [f"{row['click_rate']:.2%}"]
        cells += [_num(by_value.get(value, {}).get(metric)) if row.get("scored", True) else "n/a"
                  for by_value in sliced.values()]
        lines.append("| " + " | ".join(cells) + " |")
    flagged = [f"{value} ({row['reason']})" for value, row in first.items() if not row.get("scored", True)]
    if flagged:
        lines += ["", f"Not scored, too few clicks to compare models on: {', '.join(flagged)}."]
    return lines


def _training(training: dict[str, dict]) -> list[str]:
    finals = {role: (t.get("history") or t.get("steps") or [{}])[-1] for role, t in training.items()}
    if not finals:
        return []
    components = list(dict.fromkeys(k for final in finals.values() for k in final if k.endswith("loss")))
    head = ["role", "epochs", *(c.replace("_", " ") for c in components), "rows/s", "train s", "restarts"]
    note = "Losses of the last epoch (else of the last logged step); train s sums the epochs."
    lines = ["## Training", "", note, "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for role, final in finals.items():
        history = training[role].get("history") or []
        seconds = sum(h.get("seconds") or 0 for h in history)
        cells = [role, _count(len(history) or None), *(_num(final.get(c)) for c in components),
                 _count(final.get("rows_per_s")), _num(seconds or None, 1), _count(training[role].get("restarts"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _export(export: dict | None) -> list[str]:
    """The serving artifacts (parity, size) and the serving-speed table."""
    if not export:
        return []
    if export.get("error"):
        return ["## Serving artifact", "", f"- Export FAILED, nothing to publish: {export['error']}"]
    lines = ["## Serving artifact", ""]
    for name, variants in export.get("models", {}).items():
        described = [_variant(variant, result) for variant, result in variants.items()]
        lines.append(f"- {name}: " + "; ".join(described) + ".")
    serving = export.get("serving") or {}
    if serving.get("models"):
        lines += ["", f"Serving speed, one call at a time on {serving['threads']} intra-op thread(s): p50 (p99) ms per "
                  "call, rows/s.", "", *_serving_table(serving["models"]), *_serving_ratios(serving.get("ratios") or {})]
    return lines


def _variant(variant: str, result: dict) -> str:
    parity = result["parity"]
    if parity.get("tolerance") is None:  # a quantised variant: judged by its AUC loss
        kept = "kept" if result.get("kept", True) else "NOT kept"
        loss = f"AUC loss {parity['auc_loss']:+.5f} (budget {parity['max_auc_loss']})" if "auc_loss" in parity else ""
        return f"{variant} {_count(result['bytes'])} bytes, {loss}, {kept}"
    auc = f", AUC diff {parity['auc_abs_diff']:.1g}" if "auc_abs_diff" in parity else ""
    return (f"{variant} {_count(result['bytes'])} bytes, parity on {_count(parity['rows'])} eval rows: max |logit "
            f"diff| {parity['max_abs_diff']:.2g} (tolerance {parity['tolerance']:g}){auc}")


def _serving_table(models: dict) -> list[str]:
    batches = next(iter(next(iter(models.values())).values())).keys()
    lines = ["| model | runtime | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|" + "---:|" * len(batches)]
    for name, runtimes in models.items():
        for runtime, cells in runtimes.items():
            row = [f"{c['p50_ms']:.3f} ({c['p99_ms']:.3f}), {_count(round(c['rows_per_s']))}/s" for c in cells.values()]
            lines.append(f"| {name} | {runtime} | " + " | ".join(row) + " |")
    return lines


def _serving_ratios(ratios: dict) -> list[str]:
    lines = []
    if "batch1_best_vs_teacher_eager" in ratios:
        same = ", ".join(f"{r} {v:.1f}x" for r, v in ratios["batch1_same_runtime"].items())
        lines.append(f"- Batch 1: the student's p50 in its best runtime ({ratios['batch1_student_best_runtime']}) is "
                     f"{ratios['batch1_best_vs_teacher_eager']:.1f}x lower than the teacher's in eager PyTorch; "
                     f"runtime for runtime: {same}.")
    if "batch512_rows_per_s_best_vs_best" in ratios:
        best = ratios["batch512_best_runtimes"]
        lines.append(f"- Batch 512: the student scores {ratios['batch512_rows_per_s_best_vs_best']:.1f}x the teacher's "
                     f"rows/s, each in its best runtime ({', '.join(f'{k} {v}' for k, v in best.items())}).")
    return [""] + lines if lines else []


def _plot_links(paths: list[str]) -> list[str]:
    if not paths:
        return []
    links = [f"![{path.rsplit('/', 1)[-1][:-4].replace('_', ' ')}]({path})" for path in paths]
    return ["## Plots", "", "\n\n".join(links)]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value, digits: int = 4) -> str:
    return "-" if _missing(value) else f"{value:.{digits}f}"


def _interval(ci: list[float] | None, signed: bool = False) -> str:
    if ci is None:
        return "-"
    sign = "+" if signed else ""
    return f"[{ci[0]:{sign}.4f}, {ci[1]:{sign}.4f}]"


def _count(value) -> str:
    return "-" if _missing(value) else f"{value:,.0f}"


def _size(n_bytes) -> str:
    if _missing(n_bytes):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def trials_table(trials: dict) -> str:
    """The trials of `trials.json` as a markdown table: settings, epochs trained, the metric, the outcome."""
    keys = list(dict.fromkeys(k for t in trials["trials"] for k in t["config"]))
    metric = trials["metric"]
    lines = [f"| trial | {' | '.join(keys)} | epochs | {metric} | outcome |", "|---" * (len(keys) + 4) + "|"]
    for t in trials["trials"]:
        value = t["score"] if t["finished"] else (t["epochs"][-1].get(metric) if t["epochs"] else None)
        outcome = ("**best**" if t["trial"] == trials["best"] else "finished" if t["finished"]
                   else "stopped early" if t["stopped_early"] else f"failed: {t['error']}")
        cells = [t["trial"], *(_cell(t["config"].get(k)) for k in keys),
                 f"{len(t['epochs'])} of {trials['max_epochs']}", _cell(value), outcome]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " x ".join(map(str, value))
    return "" if value is None else str(value)
