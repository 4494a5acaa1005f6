"""`distill inspect`'s output: the summary as comments, then the proposal as YAML a user pastes into a job
spec. The whole text is valid YAML (`yaml.safe_load` gives {data: ..., features: ...})."""

from __future__ import annotations

import datetime as dt
import math

import yaml

from pipeline.data.inspect import LogSummary
from pipeline.data.propose import Proposal

NOMINAL_DAY = dt.date(2026, 1, 1)  # the day a log without days is given (any date would do)


def render(target: str, summary: LogSummary, proposal: Proposal) -> str:
    """The summary as `#` lines, then `data:` (where the days allow) and `features:`."""
    lines = [f"# distill inspect {target}", *_summary_lines(summary), "#",
             "# Proposed sections: every role below is a guess from names, types and the sample; check them.",
             *_data_lines(summary, proposal), *_feature_lines(proposal)]
    return "\n".join(lines) + "\n"


def _summary_lines(summary: LogSummary) -> list[str]:
    rows = f"{summary.rows:,} rows" if summary.rows is not None else "rows not counted (CSV over 256 MiB)"
    lines = [f"# {summary.source.format}, {len(summary.files)} file(s), {rows}; layout: {summary.layout}"]
    if summary.days:
        days = sorted(summary.days)
        lines.append(f"# days: {len(days)} from {days[0]} to {days[-1]}, rows per day {min(summary.days.values()):,}"
                     f"..{max(summary.days.values()):,}")
    lines += [f"# sample: {summary.sample.num_rows:,} rows (distinct counts are of the sample)", "#",
              f"# {'column':<24} {'type':<16} {'nulls':>7} {'distinct':>9}  example"]
    for column in summary.columns:
        example = repr(column.example)
        lines.append(f"# {column.name:<24} {str(column.type):<16} {column.null_rate:>7.1%} {column.distinct:>9,}  "
                     f"{example[:40] + ('...' if len(example) > 40 else '')}")
    return lines


def _data_lines(summary: LogSummary, proposal: Proposal) -> list[str]:
    """A `data:` section with days split as a start (the last day evaluates), or why none can be."""
    source, days = summary.source, sorted(summary.days or [])
    time_column = source.time.column if source.time else proposal.time_column
    if time_column and not days:
        return [f"# data: set data.time_column: {time_column} (and data.timezone) to derive days; run "
                f"`distill inspect PATH --time-column {time_column}` to see them"]
    if len(days) < 2:
        return _held_out_rows(summary, proposal, days)
    data = {"source": "csv" if source.format == "csv" else "parquet"}
    if isinstance(source.location, dict):
        data["partitions"] = {d.isoformat(): p for d, p in source.location.items()}
    else:
        data["path"] = source.location
    if source.partition_key:
        data["partition_key"] = source.partition_key
    if time_column:
        data["time_column"] = time_column
        data["timezone"] = source.time.timezone if source.time else "UTC"
    if source.format == "csv" and source.csv.delimiter != ",":
        data["csv"] = {"delimiter": source.csv.delimiter}
    first_eval = _eval_start(summary.days)
    data["train_days"] = {"start": days[0].isoformat(), "end": (days[first_eval] - dt.timedelta(days=1)).isoformat()}
    data["eval_days"] = {"start": days[first_eval].isoformat(), "end": days[-1].isoformat()}
    if proposal.id or proposal.group:
        data["validation"] = {"fraction": 0.1}
    elif len(days) >= 3:
        data["validation"] = {"days": 1}
    lines = ["data:"] + [f"  {key}: {_flow(value)}" for key, value in data.items()]
    lines[lines.index(f"  eval_days: {_flow(data['eval_days'])}")] += "   # a start: the last days, ~10% of the rows"
    return lines


def _held_out_rows(summary: LogSummary, proposal: Proposal, days: list[dt.date]) -> list[str]:
    """A log of one day, or of none (a file without partitions or time): trained and evaluated on that day
    (a nominal one), the evaluation rows held out by a hash of a row key (`data.evaluation`)."""
    key = proposal.id or proposal.group
    if key is None:
        return ["# data: the log has fewer than two days and no row id or user column to hold evaluation rows out "
                "by; give data.partitions a file per day or a data.time_column"]
    source = summary.source
    day = days[0] if days else NOMINAL_DAY
    data = {"source": "csv" if source.format == "csv" else "parquet"}
    if days and not isinstance(source.location, dict):
        data["path"] = source.location
        data.update({"partition_key": source.partition_key} if source.partition_key else {})
    else:
        location = source.location if not isinstance(source.location, dict) else source.location[day]
        data["partitions"] = {day.isoformat(): location}
    data |= {"train_days": {"start": day.isoformat(), "end": day.isoformat()},
             "eval_days": {"start": day.isoformat(), "end": day.isoformat()},
             "evaluation": {"fraction": 0.2, "by": key}, "validation": {"fraction": 0.1, "by": key}}
    notes = {"partitions": "a log without days is one nominal day", "eval_days": "the same day: evaluation is by rows",
             "evaluation": f"a fifth of the rows, by a stable hash of {key}: scored, never trained or chosen on"}
    return ["data:"] + [f"  {k}: {_flow(v)}" + (f"   # {notes[k]}" if k in notes and not (k == "partitions" and days)
                                                 else "") for k, v in data.items()]


def _eval_start(rows_by_day: dict[dt.date, int]) -> int:
    """Index of the first evaluation day: the last days hold about a tenth of the rows (one day at least,
    and one training day at least)."""
    counts = [rows_by_day[d] for d in sorted(rows_by_day)]
    total, tail, index = sum(counts), 0, len(counts) - 1
    while index > 1 and tail + counts[index] < 0.1 * total:
        tail += counts[index]
        index -= 1
    return index


def _feature_lines(proposal: Proposal) -> list[str]:
    lines = ["features:"]
    unset = {"label": proposal.reasons.get("label"), "id": "no column is unique per row: rows are counted",
             "group": "no user-like column: GAUC does not apply"}
    for key, value in proposal.features().items():
        if key == "sequence":
            reason = proposal.reasons.get(value["column"])
        elif key == "dense_missing_indicators":
            reason = proposal.reasons.get(key)
        else:
            reason = proposal.reasons.get(value) if isinstance(value, str) else unset.get(key) if value is None else None
        lines.append(f"  {key}: {_flow(value)}" + (f"   # {reason}" if reason else ""))
    lines += [f"  # left out: {name}: {why}" for name, why in proposal.left_out.items()]
    return lines


def _flow(value) -> str:
    """One-line YAML for a value."""
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...").strip()
