"""`report.md` and its plots from a run's metrics.json: what the numbers mean for shipping the student.

Sections and columns follow what the run measured: accuracy instead of AUC for a multiclass task,
calibration and a ceiling for a binary one, agreement for students, slices with `eval.slice_by`.
"""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import storage
from pipeline.metrics import find_model, summarize

PLOTS_DIR = "plots"
_AGREEMENT_NAMES = {"pearson": "Pearson (logits)", "spearman": "Spearman", "mean_abs_prob_diff": "mean abs prob diff",
                    "top1_agreement": "top-1 agreement"}


def write_report(run_dir: str, metrics: dict) -> str:
    """Writes `<run_dir>/report.md` and `<run_dir>/plots/*.png` (run_dir may be s3://); returns the markdown."""
    written = write_plots(metrics, storage.join(run_dir, PLOTS_DIR))
    text = render_report(metrics, plots=[f"{PLOTS_DIR}/{path.rsplit('/', 1)[-1]}" for path in written])
    storage.atomic_write_text(storage.join(run_dir, "report.md"), text)
    return text


def render_report(metrics: dict, plots: list[str] | None = None) -> str:
    """The markdown report; `plots` are the image paths relative to the report (default: those metrics allow)."""
    task, models = metrics["task"], metrics["models"]
    sections = [
        _header(metrics),
        [render_table(models, metrics["eval"]["ceiling_auc"], task), *_ceiling(metrics)],
        _summary(metrics, task),
        _selection(metrics.get("selection")),
        _agreement(models),
        _slices(metrics, task),
        _training(metrics["training"]),
        _plot_links(plots if plots is not None else [f"{PLOTS_DIR}/{name}" for name in plot_names(metrics)]),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def render_table(models: dict[str, dict], ceiling_auc: float | None = None, task: str = "binary") -> str:
    """Markdown table: one row per model (size, quality, latency), the ceiling (true-CTR AUC) last when known."""
    quality = ["accuracy", "top-5", "log-loss"] if task == "multiclass" else ["AUC", "GAUC", "log-loss", "ECE"]
    header = ["model", "family", "params", "embedding", "dense", "size", *quality, "p50 ms", "p99 ms", "rows/s"]
    rows = [header, ["---"] * 2 + ["---:"] * (len(header) - 2)]
    for name, m in models.items():
        params, latency = m["params"], m["latency"]
        if task == "multiclass":
            scores = [_num(m.get("accuracy")), _num(m.get("top5_accuracy")), _num(m.get("log_loss"))]
        else:  # gauc needs features.group
            scores = [_num(m.get("auc")), _num(m.get("gauc")), _num(m.get("log_loss")), _num(m["calibration"]["ece"])]
        rows.append([name, m["family"], _count(params["total"]), _count(params["embedding"]),
                     _count(params["dense"]), _size(m["bytes"]), *scores, _num(latency["batch1_p50_ms"], 3),
                     _num(latency["batch1_p99_ms"], 3), _count(latency["batched_rows_per_s"])])
    if ceiling_auc is not None and task == "binary":
        rows.append(["ceiling (true CTR)", *["-"] * 5, _num(ceiling_auc), *["-"] * (len(header) - 7)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _header(metrics: dict) -> list[str]:
    evaluation = metrics["eval"]
    rate_text = f", click rate {evaluation['click_rate']:.2%}" if metrics["task"] == "binary" else ""
    return [f"# Distillation report: {metrics['job']}", "",
            f"Evaluated on {_count(evaluation['rows'])} rows from {', '.join(evaluation['days'])}{rate_text} "
            f"(held out from training on {', '.join(metrics['train']['days'])}). Spec {metrics['spec_hash']}."]


def _ceiling(metrics: dict) -> list[str]:
    ceiling = metrics["eval"]["ceiling_auc"]
    teacher = find_model(metrics["models"], "teacher", "teacher").get("auc")
    if ceiling is None:
        return []
    line = f"Ceiling: the true click probability scores AUC {ceiling:.4f} on these rows"
    return ["", line + ("." if _missing(teacher) else f"; the teacher is {ceiling - teacher:.4f} below it.")]


def _summary(metrics: dict, task: str) -> list[str]:
    models = metrics["models"]
    summary = summarize(models)
    metric = "accuracy" if task == "multiclass" else "AUC"
    teacher, student = find_model(models, "teacher", "teacher"), find_model(models, "student_distilled", "distilled")
    lines = []
    if summary["distilled_minus_hard"] is not None:
        lines.append(f"- Distilled student vs hard-label student: {summary['distilled_minus_hard']:+.4f} {metric}.")
    if summary["gap_recovery"] is not None:
        lines.append(f"- Gap recovery (distilled - hard) / (teacher - hard): {summary['gap_recovery']:.1%}.")
    elif teacher and find_model(models, "student_hard", "hard"):
        lines.append("- The teacher does not beat the hard-label student here: gap recovery is undefined.")
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


def _label_line(label: dict) -> str:
    line = f"- Soft labels: {_count(label['total_rows'])} rows in {label['shards']} shards ({label['status']})"
    if label["relabelled_days"]:
        line += f", labelled now: {', '.join(label['relabelled_days'])}"
    line += f", teacher sha256 {label['teacher_sha256'][:12]}"
    known = {"total_rows", "shards", "status", "relabelled_days", "teacher_sha256"}
    extra = [f"{k} {v}" for k, v in label.items() if k not in known and isinstance(v, (str, int, float, bool))]
    return line + "".join(f", {item}" for item in extra) + "."


def _selection(selection: dict | None) -> list[str]:
    """The teacher gate and the student the run recommends, both decided on validation. Absent from runs
    written before the validation split existed."""
    if not selection:
        return []
    lines = ["## Chosen on validation", ""]
    if gate := selection.get("gate"):
        state = "passed" if gate["passed"] else "**the teacher is too weak** (distill.on_weak_teacher: warn)"
        lines.append(f"- Teacher gate {state}: {gate['metric']} {gate['teacher']:.4f} against the hard-label "
                     f"student's {gate['hard']:.4f}, lift {gate['lift']:+.4f} (at least {gate['min_lift']:.4f} "
                     f"asked), on {gate['rows']:,} validation rows.")
    lines.append(f"- Recommended student: **{selection['recommended']}**; {selection['reason']}.")
    return lines


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
    head = [column, "rows", *([] if task == "multiclass" else ["click rate"]), *(f"{n} {label}" for n in sliced)]
    lines = [f"## By {column}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for value, row in first.items():
        cells = [str(value), _count(row["rows"]), *([] if task == "multiclass" else [f"{row['click_rate']:.2%}"])]
        cells += [_num(by_value.get(value, {}).get(metric)) for by_value in sliced.values()]
        lines.append("| " + " | ".join(cells) + " |")
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


def _plot_links(paths: list[str]) -> list[str]:
    if not paths:
        return []
    links = [f"![{path.rsplit('/', 1)[-1][:-4].replace('_', ' ')}]({path})" for path in paths]
    return ["## Plots", "", "\n\n".join(links)]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value, digits: int = 4) -> str:
    return "-" if _missing(value) else f"{value:.{digits}f}"


def _count(value) -> str:
    return "-" if _missing(value) else f"{value:,.0f}"


def _size(n_bytes) -> str:
    if _missing(n_bytes):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


# --- plots -------------------------------------------------------------------------------------------


def plot_names(metrics: dict) -> list[str]:
    """The PNG files `write_plots` draws for these metrics (each needs its part of metrics.json)."""
    training, models = metrics["training"].values(), metrics["models"].values()
    quality = "accuracy" if metrics["task"] == "multiclass" else "auc"
    wanted = {
        "loss_curves.png": any(t.get("steps") or t.get("history") for t in training),
        "lr_schedule.png": any("lr" in step for t in training for step in t.get("steps") or []),
        "calibration.png": any(m.get("calibration", {}).get("bins") for m in models),  # binary only
        f"{quality}_bars.png": any(not _missing(m.get(quality)) for m in models),
    }
    return [name for name, needed in wanted.items() if needed]


def write_plots(metrics: dict, out_dir: str) -> list[str]:
    """Draws `plot_names(metrics)` into out_dir (local or s3://); returns the paths written."""
    draw = {"loss_curves.png": _draw_losses, "lr_schedule.png": _draw_lr, "calibration.png": _draw_calibration,
            "auc_bars.png": _draw_quality, "accuracy_bars.png": _draw_quality}
    written = []
    for name in plot_names(metrics):
        path = storage.join(out_dir, name)
        storage.atomic_write_bytes(path, _png(draw[name], metrics))
        written.append(path)
    return written


def _png(draw, metrics: dict) -> bytes:
    figure = Figure(figsize=(6, 4), layout="constrained")  # no pyplot: no global state, no GUI backend
    FigureCanvasAgg(figure)
    draw(figure, metrics)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _draw_losses(figure, metrics: dict) -> None:
    roles = {role: t for role, t in metrics["training"].items() if t.get("steps") or t.get("history")}
    figure.set_size_inches(5 * len(roles), 4)
    for ax, (role, t) in zip(figure.subplots(1, len(roles), squeeze=False)[0], roles.items()):
        points, x_key = (t["steps"], "step") if t.get("steps") else (t["history"], "epoch")
        for component in dict.fromkeys(k for p in points for k in p if k.endswith("loss")):
            xy = [(p[x_key], p[component]) for p in points if not _missing(p.get(component))]
            ax.plot(*zip(*xy), label=component.replace("_", " "), marker="" if x_key == "step" else "o")
        ax.set(title=role, xlabel=x_key, ylabel="loss")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")


def _draw_lr(figure, metrics: dict) -> None:
    ax = figure.subplots()
    for role, t in metrics["training"].items():
        xy = [(s["step"], s["lr"]) for s in t.get("steps") or [] if not _missing(s.get("lr"))]
        if xy:
            ax.plot(*zip(*xy), label=role)
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.legend(fontsize="small")


def _draw_calibration(figure, metrics: dict) -> None:
    ax, top = figure.subplots(), 0.0
    for name, m in metrics["models"].items():
        calibration = m.get("calibration", {})  # binary only
        if calibration.get("bins"):
            pred, observed = [b["mean_pred"] for b in calibration["bins"]], [b["observed"] for b in calibration["bins"]]
            ax.plot(pred, observed, marker="o", label=f"{name} (ECE {calibration['ece']:.4f})")
            top = max(top, *pred, *observed)
    top = min(1.0, top * 1.1 or 1.0)  # CTRs are small: zoom to where the predictions lie
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect calibration")
    ax.set(title="reliability diagram", xlabel="mean predicted CTR", ylabel="observed click rate",
           xlim=(0, top), ylim=(0, top))
    ax.legend(fontsize="small")


def _draw_quality(figure, metrics: dict) -> None:
    key = "accuracy" if metrics["task"] == "multiclass" else "auc"
    scores = {name: m[key] for name, m in metrics["models"].items() if not _missing(m.get(key))}
    figure.set_size_inches(max(6, 1.2 * len(scores)), 4)
    ax = figure.subplots()
    bars = ax.bar(list(scores), list(scores.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.4f", fontsize="small")
    ceiling = metrics["eval"]["ceiling_auc"] if key == "auc" else None
    if ceiling is not None:
        ax.axhline(ceiling, linestyle="--", color="tab:red", label=f"ceiling (true CTR) {ceiling:.4f}")
        ax.legend(fontsize="small")
    values = [*scores.values(), *([ceiling] if ceiling is not None else [])]
    ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03))  # differences are small: zoom in
    label = "accuracy" if key == "accuracy" else "AUC"
    ax.set(title=f"{label} per model", ylabel=label)
    ax.tick_params(axis="x", labelrotation=20)
