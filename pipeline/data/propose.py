"""A proposed `features:` section for a log `distill inspect` has summarised: each column's role guessed from
its name, type and sampled values, with the reason beside it, so that a user checks guesses, not types.

The rules, in order: a 0/1 column with a click-like name is the label (else a rating-like column with a
threshold); a column unique per row whose name has "id" is the row id; a user-like name is the group; a
time column is left to `data.time_column`; a list column, or text whose values a delimiter splits, is the
sequence; a column that predicts the label perfectly is left out (the label was derived from it); text and
id-like integers are categorical; other numbers are dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.ids import is_string_like
from pipeline.data.inspect import ColumnProfile, LogSummary
from pipeline.metrics import auc

LABEL_NAMES = {"label", "clk", "click", "clicked", "isclick", "target", "y", "conversion", "converted",
               "purchase", "purchased"}
RATING_NAMES = {"rating", "score", "stars"}
GROUP_NAMES = {"user", "userid", "uid", "useruuid", "visitorid", "customerid", "memberid", "accountid"}
TIME_NAMES = {"timestamp", "time", "ts", "eventtime", "eventts", "datetime", "createdat", "clicktime"}
ID_HINTS = {"id", "code", "level", "class", "seg", "group", "type", "cat", "cate", "category", "brand",
            "customer", "gender", "occupation", "device", "position", "pos", "hour", "pid", "campaign", "shop",
            "item", "sku", "ad", "city", "region", "country", "os", "channel", "slot", "site", "app"}
DELIMITERS = ("^", "|", ";", ",")
MISSING_INDICATOR_RATE = 0.05  # a dense column at least this often null gets features.dense_missing_indicators


@dataclass
class Proposal:
    """The guessed roles, each with a reason; `left_out` lists the columns no role took."""

    label: str | None = None
    label_threshold: float | None = None
    id: str | None = None
    group: str | None = None
    time_column: str | None = None
    categorical: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    sequence: dict | None = None
    missing_indicators: bool = False  # features.dense_missing_indicators
    reasons: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)

    def features(self) -> dict:
        """The section as a spec's `features` mapping."""
        section = {"label": self.label, "id": self.id, "group": self.group, "categorical": self.categorical}
        if self.label_threshold is not None:
            section["label_threshold"] = self.label_threshold
        if self.dense:
            section["dense"] = self.dense
        if self.missing_indicators:
            section["dense_missing_indicators"] = True
        if self.sequence:
            section["sequence"] = self.sequence
        return section


def words(name: str) -> list[str]:
    """`cms_group_id` -> [cms, group, id]; `userId` -> [user, id]; `I12` -> [i]."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [w.lower() for w in re.split(r"[^A-Za-z]+", spaced) if w]


def squashed(name: str) -> str:
    return "".join(words(name))


def propose(summary: LogSummary) -> Proposal:
    """Every column's guessed role."""
    proposal, sample = Proposal(), summary.sample
    columns = {c.name: c for c in summary.columns}
    _pick_label(proposal, columns, sample)
    for column in columns.values():
        if column.name != proposal.label:
            _place(proposal, column, sample, summary)
    if proposal.sequence:
        _pick_embedding_of(proposal, sample)
    _missing_indicators(proposal, columns)
    return proposal


def _missing_indicators(proposal: Proposal, columns: dict[str, ColumnProfile]) -> None:
    """Missing indicators when a dense column is often null: that a count is missing may say something."""
    sparse = [name for name in proposal.dense if columns[name].null_rate >= MISSING_INDICATOR_RATE]
    if sparse:
        proposal.missing_indicators = True
        worst = max(sparse, key=lambda name: columns[name].null_rate)
        proposal.reasons["dense_missing_indicators"] = (f"{len(sparse)} dense column(s) {MISSING_INDICATOR_RATE:.0%} "
                                                        f"null or more ({worst}: {columns[worst].null_rate:.0%})")


def _pick_label(proposal: Proposal, columns: dict[str, ColumnProfile], sample: pa.Table) -> None:
    binary = [c for c in columns.values() if _is_binary(sample.column(c.name))]
    named = [c for c in binary if squashed(c.name) in LABEL_NAMES]
    if named or binary:
        label = (named or binary)[0]
        share = pc.mean(pc.cast(sample.column(label.name), pa.float64())).as_py()
        proposal.label = label.name
        proposal.reasons[label.name] = f"0/1 values, {share:.1%} positive" + ("" if named else " (no click-like name: check)")
        return
    for column in columns.values():
        if squashed(column.name) in RATING_NAMES and _is_number(column.type):
            values = sample.column(column.name).drop_null().to_numpy(zero_copy_only=False)
            threshold = next(v for v in np.unique(values) if (values >= v).mean() <= 0.5)
            proposal.label, proposal.label_threshold = column.name, float(threshold)
            proposal.reasons[column.name] = (f"no 0/1 column: {column.name} >= {threshold:g} is positive "
                                             f"({(values >= threshold).mean():.1%}); set the threshold you use")
            return
    proposal.reasons["label"] = "no 0/1 or rating column found: set features.label to your click column"


def _place(proposal: Proposal, column: ColumnProfile, sample: pa.Table, summary: LogSummary) -> None:
    name, kind, rows = column.name, column.type, sample.num_rows
    if column.distinct <= 1 and not pa.types.is_nested(kind):
        proposal.left_out[name] = "constant or empty in the sample"
    elif _is_time(column, summary):
        proposal.time_column = name
        proposal.left_out[name] = "the event time: use it as data.time_column, not as a feature"
    elif proposal.id is None and "id" in words(name) and column.distinct == rows and not column.null_rate:
        proposal.id = name
        proposal.reasons[name] = "unique per sampled row: the row id"
    elif proposal.group is None and squashed(name) in GROUP_NAMES:
        proposal.group, proposal.reasons[name] = name, f"a user column ({column.distinct:,} users sampled): GAUC groups"
        proposal.categorical.append(name)
    elif _sequence(column, sample, proposal):
        pass
    elif proposal.label and _leaks(sample, name, proposal.label):
        proposal.left_out[name] = f"predicts {proposal.label} perfectly in the sample: the label is derived from it"
    elif is_string_like(kind) or pa.types.is_boolean(kind) or pa.types.is_dictionary(kind) or \
            (pa.types.is_integer(kind) and (ID_HINTS & set(words(name)) or squashed(name).endswith("id"))):
        proposal.categorical.append(name)
    elif _is_number(kind):
        proposal.dense.append(name)
    else:
        proposal.left_out[name] = f"type {kind} is not a feature type"


def _sequence(column: ColumnProfile, sample: pa.Table, proposal: Proposal) -> bool:
    if proposal.sequence is not None:
        return False
    values = sample.column(column.name)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        counts = pc.list_value_length(values).drop_null().to_numpy(zero_copy_only=False)
        proposal.sequence = {"column": column.name, "length": _length(counts)}
        return True
    if not is_string_like(column.type):
        return False
    text = pc.cast(values.drop_null(), pa.string())
    for delimiter in DELIMITERS:
        if len(text) and pc.mean(pc.cast(pc.match_substring(text, delimiter), pa.float64())).as_py() >= 0.1:
            counts = pc.list_value_length(pc.split_pattern(text, delimiter)).to_numpy(zero_copy_only=False)
            proposal.sequence = {"column": column.name, "length": _length(counts), "delimiter": delimiter}
            return True
    return False


def _length(counts: np.ndarray) -> int:
    """Long enough for nine in ten histories."""
    return int(np.clip(np.percentile(counts, 90) if counts.size else 10, 1, 200))


def _pick_embedding_of(proposal: Proposal, sample: pa.Table) -> None:
    """The categorical column whose values the sequence's items are most often."""
    sequence = proposal.sequence
    column = sample.column(sequence["column"])
    items = pc.split_pattern(pc.cast(column, pa.string()), sequence["delimiter"]) if "delimiter" in sequence \
        else column
    items = set(pc.cast(pc.list_flatten(items), pa.string()).drop_null().to_pylist())
    overlap = {c: len(items & set(pc.cast(sample.column(c), pa.string()).drop_null().to_pylist()))
               for c in proposal.categorical}
    best = max(overlap, key=overlap.get) if overlap else None
    sequence["embedding_of"] = best
    share = overlap.get(best, 0) / max(len(items), 1)
    proposal.reasons[sequence["column"]] = (f"a history of {best} values ({share:.0%} of its sampled items are)"
                                            if share else "a history, of no column's values in the sample: check "
                                            "embedding_of")


def _is_binary(values: pa.ChunkedArray) -> bool:
    if pa.types.is_boolean(values.type):
        return True
    if not _is_number(values.type):
        return False
    unique = set(pc.unique(values.drop_null()).to_pylist())
    return len(unique) == 2 and unique <= {0, 1}


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _is_time(column: ColumnProfile, summary: LogSummary) -> bool:
    if summary.source.time is not None:
        return column.name == summary.source.time.column
    if pa.types.is_timestamp(column.type):
        return True
    if squashed(column.name) not in TIME_NAMES:
        return False
    if pa.types.is_integer(column.type):
        return 10**8 <= abs(column.example or 0) < 10**14  # unix seconds (1973-) or milliseconds
    if is_string_like(column.type):
        try:
            pc.cast(pa.array([str(column.example)]), pa.timestamp("us"))
            return True
        except pa.ArrowInvalid:
            return False
    return False


def _leaks(sample: pa.Table, name: str, label: str) -> bool:
    """Does the column rank the label perfectly (AUC 1 or 0)? Then it was the label's source."""
    if not _is_number(sample.column(name).type):
        return False
    both = sample.select([name, label]).drop_null()
    labels = pc.cast(both.column(label), pa.int64()).to_numpy()
    if both.num_rows < 10 or labels.min() == labels.max():
        return False
    score = auc(labels, both.column(name).to_numpy().astype(np.float64))
    return not np.isnan(score) and (score >= 0.999 or score <= 0.001)
