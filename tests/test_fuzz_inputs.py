"""Corrupt click-log files, fuzzed: Hypothesis flips bytes in and truncates a real day's Parquet and CSV files,
and each case goes through what the pipeline does with a day (the file checks on footers, then the read the
label stage does, then the bad-row rules with quarantine). Every case must end in one of:

- a `DataError` naming the file (refused before any work, or at the read);
- rows set aside in quarantine, every row accounted for;
- a clean read: the flip landed in a value that is still a valid value (a price, an id in range). No reader
  can tell that from the real data without checksums; it is counted, not hidden.

Never another exception (a traceback) and never a hang (Hypothesis's deadline). Bounded: a fixed number of
examples with a deadline each. One corrupt data page also goes through the real label stage on Ray.
"""

from __future__ import annotations

import collections
import datetime as dt
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data import formats, validate
from pipeline.data.normalise import Normaliser, normalise
from pipeline.data.synthetic import generate_click_logs
from pipeline.errors import DataError
from pipeline.spec import parse_spec
from pipeline.stages.click_logs import check_inputs, log_source
from tests.conftest import JOBS

DAY = dt.date(2026, 11, 1)
ROWS = 1_200
EXAMPLES = 60
OUTCOMES: dict[str, collections.Counter] = {"parquet": collections.Counter(), "csv": collections.Counter()}


def _write_day(root: Path, fmt: str) -> Path:
    """Two days of the synthetic log (a train and an eval day) as `fmt`, row groups of 300 rows; returns the
    first day's file."""
    generate_click_logs(str(root / "gen"), start_date=DAY, days=2, rows_per_day=ROWS, users=200, items=500,
                        categories=10, seq_len=5, seed=3)
    for day in (DAY, DAY + dt.timedelta(days=1)):
        source = next((root / "gen" / f"date={day}").glob("*.parquet"))
        partition = root / "clicks" / f"date={day}"
        partition.mkdir(parents=True)
        table = pq.read_table(source)
        if fmt == "parquet":
            pq.write_table(table, partition / "part-0.parquet", row_group_size=300)
        else:
            _write_csv(table, partition / "part-0.csv")
    shutil.rmtree(root / "gen")
    return next((root / "clicks" / f"date={DAY}").glob("part-0.*"))


def _write_csv(table: pa.Table, path: Path) -> None:
    import pyarrow.csv as pacsv

    sequence = [" ".join(map(str, items)) for items in table.column("hist_item_ids").to_pylist()]
    table = table.set_column(table.schema.get_field_index("hist_item_ids"), "hist_item_ids", pa.array(sequence))
    pacsv.write_csv(table, path)


def _spec(root: Path, fmt: str):
    raw = yaml.safe_load((JOBS / "tiny.yaml").read_text())
    raw["data"] = {"path": str(root / "clicks"), "source": fmt, "on_bad_rows": "quarantine",
                   "train_days": {"start": str(DAY), "end": str(DAY)},
                   "eval_days": {"start": str(DAY + dt.timedelta(days=1)), "end": str(DAY + dt.timedelta(days=1))}}
    if fmt == "csv":
        raw["features"]["sequence"]["delimiter"] = " "
    raw["output"]["root"] = str(root / "runs")
    return parse_spec(raw)


class Day(collections.namedtuple("Day", "format root file original spec")):
    def __repr__(self) -> str:  # a failing example names the file, not its bytes
        return f"Day({self.format}, {self.file})"


@pytest.fixture(scope="module", params=["parquet", "csv"])
def day(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    file = _write_day(root, request.param)
    yield Day(request.param, root, file, file.read_bytes(), _spec(root, request.param))
    print(f"\n{request.param} fuzz outcomes over {EXAMPLES} examples: {dict(OUTCOMES[request.param])}")


corruptions = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
)


def _corrupt(original: bytes, corruption) -> bytes:
    kind, how = corruption
    if kind == "truncate":
        return original[:int(how * len(original))]
    data = bytearray(original)
    for where, mask in how:
        data[int(where * len(data))] ^= mask
    return bytes(data)


# pyarrow cannot hand a ragged CSV row that is not UTF-8 to the row handler (it fails decoding the row's text,
# "Exception ignored"), and then fails the read, which is named: the outcome is right, the noise is pyarrow's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@settings(max_examples=EXAMPLES, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(corruption=corruptions)
def test_a_corrupt_file_is_named_quarantined_or_read_never_a_traceback(day, corruption):
    fmt, root, file, original, spec = day
    file.write_bytes(_corrupt(original, corruption))
    try:
        OUTCOMES[fmt][_outcome(spec, file)] += 1
    finally:
        file.write_bytes(original)


def _outcome(spec, file: Path) -> str:
    """What the pipeline makes of the day: "refused up front", "refused at the read", "quarantined" or "read"."""
    source, columns = log_source(spec), [spec.features.id, spec.features.label, *spec.features.input_columns()]
    try:
        check_inputs(spec)  # footers (a CSV's first block): before any work
    except DataError as exc:
        assert str(file) in str(exc), f"the error does not name {file}: {exc}"
        return "refused up front"
    try:
        formats.locate_unreadable(source, [str(file)], columns)  # what the label stage does when a read fails
    except DataError as exc:
        assert str(file) in str(exc), f"the error does not name {file}: {exc}"
        return "refused at the read"
    ragged = formats.RaggedRows(fail=False, quarantine_dir=tempfile.mkdtemp(dir=file.parents[2]))
    table = formats.read_columns(source, str(file), columns, ragged)
    try:
        kept = validate.drop_bad_rows(table, validate.RowRules.from_spec(spec), fail=False,
                                      quarantine_dir=ragged.quarantine_dir)
        normalise(kept, Normaliser.from_spec(spec))
    except DataError as exc:  # a value the normaliser cannot use (a sequence item that is not an integer)
        assert str(file) in str(exc) or "column" in str(exc), exc
        return "refused at the read"
    set_aside = table.num_rows - kept.num_rows + ragged.skipped
    if source.format == "parquet":
        assert table.num_rows == ROWS  # a Parquet file that reads at all reads whole: the footer counts rows
    return "quarantined" if set_aside else "read"


def test_the_fuzz_saw_every_kind_of_outcome():
    """Runs after the fuzz (file order): a fuzz whose corruptions never reached the read proves little."""
    for fmt, seen in OUTCOMES.items():
        if sum(seen.values()):
            assert seen["refused up front"] and seen["refused at the read"] + seen["quarantined"] + seen["read"], \
                f"{fmt}: {dict(seen)}"


@pytest.mark.ray
def test_a_corrupt_data_page_behind_a_sound_footer_stops_the_label_stage_naming_the_file(ray_cluster, tmp_path):
    """The file checks read footers only: the label stage's read is the first to meet a bad page. Its error
    comes from a Ray task; the stage names the file instead of showing Ray's traceback."""
    from pipeline.stages.label import label_days
    from tests.test_faults import _save_teacher

    file = _write_day(tmp_path, "parquet")
    spec = _spec(tmp_path, "parquet")
    metadata = pq.ParquetFile(file).metadata
    chunk = metadata.row_group(1).column(metadata.schema.names.index(spec.features.label))
    data = bytearray(file.read_bytes())
    start = chunk.data_page_offset
    for at in range(start + 8, start + chunk.total_compressed_size):  # the page body, not its header
        data[at] ^= 0xFF
    file.write_bytes(bytes(data))
    check_inputs(spec)  # the footer is sound: nothing to see before the read
    teacher = _save_teacher(spec, tmp_path / "teacher.pt")
    with pytest.raises(DataError, match=f"{file}.* is not a readable Parquet file, truncated or corrupt"):
        label_days(spec, teacher, str(tmp_path / "shards"), [DAY])
