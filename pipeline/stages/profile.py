"""Click-log profile: one streaming pass over the training window, and `hash_buckets: auto` sized from it.

The pass measures, per categorical column, its approximate number of distinct ids and, per input column,
its null rate; it writes `<run_dir>/profile.json` and is reused while the window's partitions are the
same. `resolve_hash_buckets` then turns `auto` and the per-field form into the concrete per-field
counts the models are built with, and the run records them in the same file.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import clicklogs
from pipeline.data.normalise import Normaliser, normalise, sequence_ids
from pipeline.data.split import RowSplit, evaluation_mask
from pipeline.stages.click_logs import log_source
from pipeline.errors import SpecError
from pipeline.models import ModelConfig
from pipeline.spec import JobSpec
from pipeline.spec.models import AUTO, MIN_BUCKETS, OTHER_FIELDS, check_bucket_fields
from pipeline.stages.training import teacher_role

PROFILE_FILE = "profile.json"
# HyperLogLog (Apache DataSketches) rather than exact sets: a sketch is 2**LG_K registers whatever the
# cardinality (a 100M-id column costs what a 10-id one does), blocks merge by union, and the library is
# the one Druid and Spark users trust. 2**14 registers: about 0.8% relative standard error, and below a
# few thousand ids the sketch is (near) exact.
LG_K = 14
# Teacher tables at <= 1/2 load (the next power of two: between 1/4 and 1/2), so a rare id mostly keeps a
# row of its own; student tables at <= 2 (a quarter of the teacher's): the student is the compressed model
# and the soft labels make up for shared rows. A small field (hour, device, position) gets 64 rows an id up
# to 4,096, for either role: it costs nothing next to an id field, and `hash_ids` collides small consecutive
# ids 3-7x more often than a random hash would (24 hours in 256 rows: 6 collisions against ~1 expected;
# 50 ids in 4,096 rows: none). Powers of two keep the sizes stable while a window's cardinality drifts
# (a nightly champion stays warm-startable). The cap: 2**20 rows x dim 16 fp32 is 64 MiB a field (x3 with
# AdamW's moments); a larger table is a deliberate per-field number.
LOAD = {"teacher": 0.5, "student": 2.0}
SMALL_FIELD_ROWS, ROWS_PER_SMALL_FIELD_ID = 4096, 64
MAX_BUCKETS = 2**20


@dataclass(frozen=True)
class ColumnProfile:
    kind: str  # categorical, dense or sequence
    nulls: int
    null_rate: float
    distinct: int | None = None  # categorical and sequence (the sequence: its ids other than 0, padding)


@dataclass(frozen=True)
class ClickLogProfile:
    """What `profile.json` holds (less the resolved `hash_buckets`, which the run adds)."""

    rows: int
    days: list[str]
    columns: dict[str, ColumnProfile]
    tables: dict[str, int]  # categorical field -> distinct ids its table serves (a shared sequence adds its own)
    inputs: dict  # the partitions measured: what a rerun compares to reuse this profile
    seconds: float
    hash_buckets: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> field -> rows, once resolved

    @classmethod
    def from_dict(cls, raw: dict) -> ClickLogProfile:
        columns = {name: ColumnProfile(**column) for name, column in raw["columns"].items()}
        return cls(**{**raw, "columns": columns})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_aware_spec(spec: JobSpec) -> JobSpec:
    """The spec with concrete hash buckets: profiles the click logs (or reuses `profile.json`) when a model
    section asks for `auto`, and records the resolved counts there. Needs Ray (the pass is Ray Data)."""
    profile = profile_click_logs(spec) if needs_profile(spec) else None
    resolved = resolve_hash_buckets(spec, profile)
    if profile is not None:
        buckets = {role: section.hash_buckets for role, section in _sections(resolved)}
        if buckets != profile.hash_buckets:
            profile = dataclasses.replace(profile, hash_buckets=buckets)
            storage.atomic_write_json(storage.join(spec.run_dir, PROFILE_FILE), profile.to_dict())
        for role, sizes in buckets.items():
            print(f"{role}: hash_buckets {sizes}", flush=True)
    return resolved


def needs_profile(spec: JobSpec) -> bool:
    """Whether any model section sizes a table from the data (`auto`, whole or for some field)."""
    for _, section in _sections(spec):
        buckets = section.hash_buckets
        if buckets == AUTO or (isinstance(buckets, dict) and AUTO in buckets.values()):
            return True
    return False  # fields a per-field form does not name, without `default: auto`, take ModelConfig's default


def resolve_hash_buckets(spec: JobSpec, profile: ClickLogProfile | None) -> JobSpec:
    """A copy of `spec` whose teacher and student `hash_buckets` are concrete: a plain number stays as it
    is (the same model, the same fingerprints); `auto` and the per-field form become {field: rows}.

    Raises:
        SpecError: the per-field form names a field that is not categorical.
    """
    updated = {}
    for role, section in _sections(spec):
        # a teacher's fields include its teacher-only ones
        features = spec.features if role == "student" else spec.teacher_features(section)
        categorical = list(features.categorical)
        try:
            check_bucket_fields(_section_path(spec, role), section.hash_buckets, categorical)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        kind = "student" if role == "student" else "teacher"
        updated[role] = section.model_copy(update={"hash_buckets": _field_buckets(section.hash_buckets, kind,
                                                                                  categorical, profile)})
    teachers = [updated[role] for role, _ in _sections(spec) if role != "student"]
    return spec.model_copy(update={"teacher": teachers, "student": updated["student"]})


def auto_buckets(distinct: int, kind: str) -> int:
    """Embedding rows for a field with `distinct` ids: the rule written above `LOAD`. `kind`: teacher, student."""
    rows = max(distinct / LOAD[kind], min(ROWS_PER_SMALL_FIELD_ID * distinct, SMALL_FIELD_ROWS))
    power = 1 << max(0, math.ceil(rows) - 1).bit_length()  # the next power of two >= rows
    return min(MAX_BUCKETS, max(MIN_BUCKETS, power))


def _field_buckets(buckets, kind: str, categorical: list[str], profile: ClickLogProfile | None):
    if isinstance(buckets, int):
        return buckets
    named = {} if buckets == AUTO else dict(buckets)
    fallback = AUTO if buckets == AUTO else named.pop(OTHER_FIELDS, ModelConfig.hash_buckets)
    wanted = {name: named.get(name, fallback) for name in categorical}
    if AUTO in wanted.values() and profile is None:
        raise ValueError("hash_buckets: auto needs the click-log profile; call profile_click_logs first")
    return {name: auto_buckets(profile.tables[name], kind) if value == AUTO else value
            for name, value in wanted.items()}


def _sections(spec: JobSpec) -> list[tuple[str, object]]:
    """(role, model section): the roles name `models/<role>.pt`."""
    teachers = [(teacher_role(spec, t), t) for t in spec.teacher]
    return [*teachers, ("student", spec.student)]


def _section_path(spec: JobSpec, role: str) -> str:
    if role == "student" or len(spec.teacher) == 1:
        return role
    names = [t.name for t in spec.teacher]
    return f"teacher[{names.index(role.removeprefix('teacher_'))}]"


def profile_click_logs(spec: JobSpec) -> ClickLogProfile:
    """The training window's profile: `<run_dir>/profile.json` when it was made from the same partitions
    (file names, sizes, versions, row counts), columns and evaluation split, else measured now in one pass and
    written. Rows held out for evaluation (`data.evaluation`) are not measured."""
    days = spec.data.train_days.days()
    source = log_source(spec)
    paths = clicklogs.day_inputs(source, days)
    inputs = {"partitions": {d.isoformat(): clicklogs.partition_fingerprint(source, p) for d, p in paths.items()},
              "columns": _columns(spec), "lg_k": LG_K}
    if spec.evaluation_key:  # the rows measured depend on the split (older profiles have no such key)
        inputs["evaluation_rows"] = {"by": spec.evaluation_key, "fraction": spec.data.evaluation.fraction}
    path = storage.join(spec.run_dir, PROFILE_FILE)
    if storage.exists(path):
        stored = ClickLogProfile.from_dict(storage.read_json(path))
        if stored.inputs == inputs:
            print(f"click-log profile: reusing {path} (same partitions)", flush=True)
            return stored
    started = time.perf_counter()
    rows, columns, tables = _measure(spec, days)
    profile = ClickLogProfile(rows=rows, days=[d.isoformat() for d in days], columns=columns, tables=tables,
                              inputs=inputs, seconds=round(time.perf_counter() - started, 2))
    storage.atomic_write_json(path, profile.to_dict())
    print(f"click-log profile: {rows:,} rows over {len(days)} day(s) in {profile.seconds:.1f}s -> {path}",
          flush=True)
    return profile


def _columns(spec: JobSpec) -> dict[str, list[str]]:
    features = spec.log_features  # teacher-only columns get tables too
    return {"categorical": list(features.categorical), "dense": list(features.dense),
            "sequence": [features.sequence.column] if features.sequence else []}


def _measure(spec: JobSpec, days) -> tuple[int, dict[str, ColumnProfile], dict[str, int]]:
    """One Ray Data pass: a sketch table per block (read tasks, in parallel), merged here one block at a
    time, so the driver holds one HLL union per column whatever the log's size."""
    import datasketches

    kinds = _columns(spec)
    names = [name for group in kinds.values() for name in group]
    held_out = spec.evaluation_key  # evaluation rows held out of the training days: sized on nothing of theirs
    read = list(dict.fromkeys([*names, *([held_out] if held_out else [])]))
    dataset = clicklogs.read_click_logs(log_source(spec), days, read)  # raw values: nulls not yet filled
    if held_out:
        dataset = dataset.map_batches(without_evaluation_rows, batch_size=None, batch_format="pyarrow",
                                      zero_copy_batch=True, fn_kwargs={"split": RowSplit.from_spec(spec),
                                                 "normaliser": Normaliser.from_spec(spec)})
    sketches = dataset.map_batches(sketch_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                                   fn_kwargs={"kinds": kinds, "delimiter": spec.log_features.sequence.delimiter
                                              if spec.log_features.sequence else None})
    counted = [*kinds["categorical"], *kinds["sequence"]]
    unions = {name: datasketches.hll_union(LG_K) for name in counted}
    nulls, rows = dict.fromkeys(names, 0), 0
    for block in sketches.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += pc.sum(block["rows"]).as_py() or 0
        for name in names:
            nulls[name] += pc.sum(block[f"{name}/nulls"]).as_py() or 0
        for name in counted:
            for blob in block[f"{name}/hll"].to_pylist():
                unions[name].update(datasketches.hll_sketch.deserialize(blob))
    kind_of = {name: kind for kind, group in kinds.items() for name in group}
    columns = {name: ColumnProfile(kind=kind_of[name], nulls=nulls[name], null_rate=nulls[name] / max(rows, 1),
                                   distinct=_estimate(unions[name]) if name in unions else None)
               for name in names}
    return rows, columns, _tables(spec, unions)


def _tables(spec: JobSpec, unions: dict) -> dict[str, int]:
    """Distinct ids per embedding table: a sequence shares its `embedding_of` field's table, so adds its ids."""
    import datasketches

    features = spec.log_features
    tables = {name: _estimate(unions[name]) for name in features.categorical}
    sequence = features.sequence
    if sequence:
        shared = datasketches.hll_union(LG_K)
        shared.update(unions[sequence.embedding_of].get_result())
        shared.update(unions[sequence.column].get_result())
        tables[sequence.embedding_of] = _estimate(shared)
    return tables


def _estimate(union) -> int:
    return round(union.get_result().get_estimate())


def without_evaluation_rows(block: pa.Table, split: RowSplit, normaliser: Normaliser) -> pa.Table:
    """The block's raw values less its evaluation rows, decided as every other read decides them: on the key's
    normalised values (a text key hashed to its int64 id)."""
    key = split.evaluation_key
    keys = normalise(block.select([key]), normaliser).column(key)
    return block.filter(pa.array(~evaluation_mask(keys, split.evaluation_fraction)))


def sketch_block(block: pa.Table, kinds: dict[str, list[str]], delimiter: str | None = None) -> pa.Table:
    """One row for a block: its row count, each column's nulls, and an HLL sketch of each id column."""
    import datasketches

    out = {"rows": [block.num_rows]}
    for name in (n for group in kinds.values() for n in group):
        out[f"{name}/nulls"] = [block[name].null_count]
    for kind in ("categorical", "sequence"):
        for name in kinds[kind]:
            values = block[name]
            if kind == "sequence":  # the ids of the lists (text ones hashed), less 0 (padding)
                values = pc.list_flatten(sequence_ids(values, delimiter, text_items=True, name=name))
                values = pc.filter(values, pc.not_equal(values, 0))
            sketch = datasketches.hll_sketch(LG_K)
            for value in pc.unique(values.drop_null()).to_pylist():  # distinct ones only: far fewer updates
                sketch.update(value)
            out[f"{name}/hll"] = [sketch.serialize_compact()]
    return pa.table(out)
