"""The plots of `report.md`, drawn from a run's metrics.json: losses, learning rate, calibration, quality per model.

Matplotlib without pyplot (no global state, no GUI backend); each plot needs its part of metrics.json.
"""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import storage


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
        storage.atomic_write_bytes(path, png(draw[name], metrics))
        written.append(path)
    return written


def png(draw, metrics: dict) -> bytes:
    """PNG bytes of `draw(figure, metrics)` on a 6x4 inch figure."""
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
    """Equal-mass bins where a run has them (at low click rates equal widths put nearly every row in the
    first bin); each calibrated model's curve dashed, in its model's colour."""
    ax, top = figure.subplots(), 0.0
    for index, (name, m) in enumerate(metrics["models"].items()):
        colour = f"C{index % 10}"
        curves = [(m.get("calibration_quantile") or m.get("calibration", {}), name, "-")]  # binary only
        if m.get("calibrated"):
            calibrated = m["calibrated"]
            curves.append((calibrated["calibration_quantile"], f"{name}, {calibrated['method']}", "--"))
        for calibration, label, style in curves:
            if calibration.get("bins"):
                pred = [b["mean_pred"] for b in calibration["bins"]]
                observed = [b["observed"] for b in calibration["bins"]]
                ax.plot(pred, observed, marker="o", linestyle=style, color=colour,
                        label=f"{label} (ECE {calibration['ece']:.4f})")
                top = max(top, *pred, *observed)
    top = min(1.0, top * 1.1 or 1.0)  # CTRs are small: zoom to where the predictions lie
    ax.plot([0, top], [0, top], linestyle=":", color="grey", label="perfect calibration")
    ax.set(title="reliability diagram (equal-mass bins)", xlabel="mean predicted CTR",
           ylabel="observed click rate", xlim=(0, top), ylim=(0, top))
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


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
