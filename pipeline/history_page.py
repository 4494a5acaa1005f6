"""`nightly/index.html`: the nightly history of one model as a page people look at.

From the cycle records (`nightly/cycles/<D>.json`) and the registry's HISTORY.json it charts, night by night:
the champion's and the challenger's metric on the evaluated day with each decision marked (promoted,
refused, recalibrated), rollbacks, the rows relabelled and reused, and both models' ECE; a table lists every
decision with its reason. Self-contained like report.html: charts inline as PNG, no script, no network.
Pure: no Ray.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math

from pipeline import registry, storage
from pipeline.plots import png
from pipeline.report import PAGE_CSS

PAGE = "index.html"
_MARKERS = {"promoted": ("o", "tab:green"), "rejected": ("x", "tab:red"), "recalibrated": ("D", "tab:purple")}


def read_cycles(nightly_dir: str) -> list[dict]:
    """Every cycle record, oldest night first."""
    paths = storage.list_files(storage.join(nightly_dir, "cycles"), suffix=".json")
    return sorted((storage.read_json(p) for p in paths), key=lambda r: r["date"])


def write_history_page(spec) -> str:
    """Writes `<nightly_dir>/index.html` for a spec with a schedule section, from its cycle records and its
    registry's history; returns the page's path. `distill history`, every cycle and every manual promote or
    rollback refresh it."""
    root, model = spec.schedule.registry, spec.registry_model_name
    cycles = read_cycles(spec.nightly_dir)
    path = storage.join(spec.nightly_dir, PAGE)
    storage.atomic_write_text(path, render_history(model, spec.schedule.gate.metric, cycles,
                                                   registry.history(root, model)))
    return path


def render_history(model: str, metric: str, cycles: list[dict], registry_events: list[dict]) -> str:
    rollbacks = [e for e in registry_events if e.get("action") == "rollback"]
    charts = [("quality", _chart(_draw_metric, cycles, metric)), ("rows", _chart(_draw_rows, cycles, metric))]
    if any(_number(c.get("challenger_ece")) is not None for c in cycles):
        charts.append(("calibration", _chart(_draw_ece, cycles, metric)))
    parts = [f"<h1>Nightly history: {html.escape(model)}</h1>",
             f"<p>{len(cycles)} night(s), {cycles[0]['date']} to {cycles[-1]['date']}; champion now "
             f"<b>{html.escape(str(cycles[-1].get('champion_after')))}</b>.</p>" if cycles else "<p>No nights yet.</p>"]
    parts += [f'<img alt="{name}" id="chart-{name}" src="data:image/png;base64,{data}">' for name, data in charts
              if cycles]
    parts += [_decisions(cycles, metric), _rollbacks(rollbacks)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Nightly history: {html.escape(model)}</title>\n<style>{PAGE_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body>\n</html>\n")


def _chart(draw, cycles: list[dict], metric: str) -> str:
    return base64.b64encode(png(lambda figure, _: draw(figure, cycles, metric), {})).decode()


def _nights(cycles: list[dict]) -> list[dt.date]:
    return [dt.date.fromisoformat(c["date"]) for c in cycles]


def _draw_metric(figure, cycles: list[dict], metric: str) -> None:
    ax, nights = figure.subplots(), _nights(cycles)
    for role, style in (("champion", "-"), ("challenger", "--")):
        values = [_number((c.get(role) or {}).get(metric)) for c in cycles]
        ax.plot(nights, [math.nan if v is None else v for v in values], linestyle=style, marker=".", label=role)
    for decision, (marker, colour) in _MARKERS.items():
        hits = [(n, _number(c["challenger"].get(metric))) for n, c in zip(nights, cycles)
                if c.get("decision") == decision and _number(c["challenger"].get(metric)) is not None]
        if hits:
            ax.scatter(*zip(*hits), marker=marker, color=colour, s=60, zorder=3, label=decision)
    ax.set(title=f"{metric} on the evaluated day", xlabel="night", ylabel=metric)
    ax.legend(fontsize="small")
    _night_axis(ax, nights)


def _draw_rows(figure, cycles: list[dict], metric: str) -> None:
    ax, nights = figure.subplots(), _nights(cycles)
    relabelled = [c.get("relabelled_rows", len(c.get("relabelled", []))) for c in cycles]
    reused = [c.get("reused_rows", len(c.get("reused", []))) for c in cycles]
    unit = "rows" if all("relabelled_rows" in c for c in cycles) else "days"  # records before rows were kept
    ax.bar(nights, relabelled, label=f"relabelled ({unit})", color="tab:orange")
    ax.bar(nights, reused, bottom=relabelled, label=f"reused ({unit})", color="tab:blue")
    ax.set(title=f"soft labels per night: {unit} relabelled and reused", xlabel="night", ylabel=unit)
    ax.legend(fontsize="small")
    _night_axis(ax, nights)


def _draw_ece(figure, cycles: list[dict], metric: str) -> None:
    ax, nights = figure.subplots(), _nights(cycles)
    for key, label in (("champion_ece", "champion"), ("challenger_ece", "challenger")):
        values = [_number(c.get(key)) for c in cycles]
        ax.plot(nights, [math.nan if v is None else v for v in values], marker=".", label=f"{label} ECE")
    ax.set(title="ECE on the evaluated day, as each model serves", xlabel="night", ylabel="ECE")
    ax.legend(fontsize="small")
    _night_axis(ax, nights)


def _night_axis(ax, nights: list[dt.date]) -> None:
    """One tick a night (every few nights for a long history), labelled by date."""
    from matplotlib import dates

    ax.xaxis.set_major_locator(dates.DayLocator(interval=max(1, len(nights) // 10)))
    ax.xaxis.set_major_formatter(dates.DateFormatter("%Y-%m-%d"))
    ax.tick_params(axis="x", labelrotation=30)


def _decisions(cycles: list[dict], metric: str) -> str:
    rows = ["<tr><th>night</th><th>decision</th><th>challenger</th><th>champion</th><th>version</th>"
            "<th>champion after</th><th>reason</th></tr>"]
    for c in reversed(cycles):  # newest first: what people open the page for
        cells = [c["date"], c.get("decision", ""), _cell(c["challenger"].get(metric)),
                 _cell((c.get("champion") or {}).get(metric)), c.get("version", ""), c.get("champion_after") or "",
                 c.get("reason", "")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>")
    return f"<h2>Decisions</h2>\n<table id=\"decisions\">\n" + "\n".join(rows) + "\n</table>"


def _rollbacks(events: list[dict]) -> str:
    if not events:
        return "<h2>Rollbacks</h2>\n<p>None.</p>"
    rows = ["<tr><th>when</th><th>to</th><th>from</th><th>reason</th></tr>"]
    rows += ["<tr>" + "".join(f"<td>{html.escape(str(e.get(k, '')))}</td>" for k in ("at", "version", "previous",
                                                                                   "reason")) + "</tr>"
             for e in events]
    return "<h2>Rollbacks</h2>\n<table id=\"rollbacks\">\n" + "\n".join(rows) + "\n</table>"


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _cell(value) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.4f}"
