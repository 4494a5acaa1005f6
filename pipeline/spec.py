"""Job spec: YAML -> typed, validated `JobSpec`, checked once before any work starts.

Every error names the field path, what was expected, and how to fix it; the CLI turns a
`SpecError` into exit code 2. Pure logic: no Ray import.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import typing
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import SpecError

TEACHER_MODELS = ("dcn_v2", "deepfm", "bst", "custom")
STUDENT_MODELS = ("mlp", "fm", "dcn_v2", "custom")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_CREDENTIAL = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def _known_model(name: str, known: tuple[str, ...], role: str) -> str:
    if name not in known:
        raise ValueError(f"unknown {role} model {name!r}; choose one of {list(known)}")
    return name


class Section(BaseModel):
    """Base for spec sections: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class DayRange(Section):
    """Inclusive range of `date=YYYY-MM-DD` partitions."""

    start: dt.date
    end: dt.date

    @model_validator(mode="after")
    def _ordered(self) -> DayRange:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}; swap them")
        return self

    def days(self) -> list[dt.date]:
        count = (self.end - self.start).days + 1
        return [self.start + dt.timedelta(days=i) for i in range(count)]


class SyntheticSpec(Section):
    """Size and seed of the built-in synthetic click log."""

    rows_per_day: int = Field(20_000, ge=100)
    users: int = Field(5_000, ge=10)
    items: int = Field(20_000, ge=10)
    categories: int = Field(50, ge=2)
    seq_len: int = Field(10, ge=1, le=200)
    seed: int = 0
    drift: float = Field(0.0, ge=0, le=1, description="radians a day by which user tastes rotate")


class DataSpec(Section):
    source: Literal["synthetic", "parquet"] = "synthetic"
    path: str | None = Field(None, min_length=1, description="root holding date=YYYY-MM-DD partitions (local or s3://)")
    partitions: dict[dt.date, str] | None = Field(
        None, description="logs not laid out as date= partitions: {day: Parquet file or directory}")
    train_days: DayRange
    eval_days: DayRange
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    on_bad_rows: Literal["fail", "quarantine"] = Field(
        "fail", description="fail: stop at the first bad row, naming file, row group and column; "
                            "quarantine: set bad rows aside under <run>/quarantine/ with a reason and go on")
    max_id: int = Field(2**53, ge=1, description="ids above this (or below 0) are bad rows: corrupt, not real ids")

    @property
    def location(self) -> str | dict[dt.date, str]:
        """What `clicklogs` reads: the partition root, or the explicit {day: path} map."""
        return self.partitions if self.partitions is not None else self.path

    @model_validator(mode="after")
    def _where(self) -> DataSpec:
        if (self.path is None) == (self.partitions is None):
            raise ValueError("give data.path (a root of date=YYYY-MM-DD partitions) or data.partitions "
                             "({day: file or directory}), not both or neither")
        if self.partitions is not None and self.source == "synthetic":
            raise ValueError("data.partitions names existing files: use it with data.source: parquet")
        return self

    @model_validator(mode="after")
    def _disjoint(self) -> DataSpec:
        overlap = set(self.train_days.days()) & set(self.eval_days.days())
        if overlap:
            first = min(overlap).isoformat()
            raise ValueError(
                f"eval_days overlap train_days (e.g. {first}); evaluate on held-out days after the training window"
            )
        return self

    def all_days(self) -> list[dt.date]:
        return sorted(set(self.train_days.days()) | set(self.eval_days.days()))


class SequenceSpec(Section):
    column: str
    length: int = Field(10, ge=1, le=200)
    embedding_of: str = Field(description="categorical column whose embedding table the sequence shares")


class FeaturesSpec(Section):
    task: Literal["binary", "multiclass"] = "binary"
    num_classes: int | None = Field(None, ge=2, description="multiclass only: labels are 0..num_classes-1")
    label: str = "clicked"
    id: str | None = Field("event_id", description="unique row id carried into the shards (null: none)")
    group: str | None = "user_id"
    categorical: list[str] = Field(min_length=1)
    dense: list[str] = []
    sequence: SequenceSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FeaturesSpec:
        names = self.categorical + self.dense + ([self.sequence.column] if self.sequence else [])
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"columns listed twice: {dupes}; each column has one role")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also a feature; remove it from the feature lists")
        if (self.task == "multiclass") != (self.num_classes is not None):
            raise ValueError("task: multiclass needs num_classes (labels 0..num_classes-1); task: binary takes none")
        if self.sequence and self.sequence.embedding_of not in self.categorical:
            raise ValueError(
                f"sequence.embedding_of {self.sequence.embedding_of!r} is not a categorical column; "
                f"use one of {self.categorical}"
            )
        return self

    def input_columns(self) -> list[str]:
        """Columns a model reads (never the label, never `true_ctr`)."""
        return self.categorical + self.dense + ([self.sequence.column] if self.sequence else [])


class ModelSpec(Section):
    """A CTR model: family by short name plus its size. Embeddings dominate CTR model size, so
    `embedding_dim` and `hash_buckets` are the first knobs of compression."""

    model: str
    factory: str | None = Field(None, description="model: custom only; 'package.module:function' building it")
    factory_args: dict[str, Any] = Field({}, description="keyword arguments for the factory")
    embedding_dim: int = Field(8, ge=1, le=1024)
    hash_buckets: int = Field(10_000, ge=16, description="embedding rows per categorical field")
    hidden: list[int] = Field([64, 32], min_length=1)
    cross_layers: int = Field(0, ge=0, le=8, description="DCN-v2 cross layers (dcn_v2 only)")
    sequence_pooling: Literal["attention", "mean"] = "mean"
    attention_heads: int = Field(2, ge=1, le=16, description="bst only: heads of the sequence transformer")
    transformer_layers: int = Field(1, ge=1, le=8, description="bst only: transformer blocks")
    dropout: float = Field(0.0, ge=0, lt=1)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, hidden: list[int]) -> list[int]:
        if any(h < 1 for h in hidden):
            raise ValueError(f"every hidden layer width must be >= 1, got {hidden}")
        return hidden

    @field_validator("factory")
    @classmethod
    def _factory_format(cls, factory: str | None) -> str | None:
        if factory is not None and not _FACTORY.match(factory):
            raise ValueError(f"{factory!r} is not 'package.module:function'; write an importable module, a colon "
                             "and a function name, e.g. 'my_models.ctr:build_student'")
        return factory

    @model_validator(mode="after")
    def _plugin(self) -> ModelSpec:
        if self.model != "custom":
            if self.factory is not None:
                raise ValueError(f"factory is only read with model: custom (model is {self.model!r}); remove it "
                                 "or set model: custom")
            return self
        if self.factory is None:
            raise ValueError("model: custom needs factory: 'package.module:function' (a function building the model)")
        from pipeline.models.plugin import resolve_factory  # the one documented way user code enters a spec

        resolve_factory(self.factory)
        return self

    @model_validator(mode="after")
    def _heads(self) -> ModelSpec:
        if self.model == "bst" and self.embedding_dim % self.attention_heads:
            raise ValueError(f"bst: embedding_dim {self.embedding_dim} must be divisible by attention_heads "
                             f"{self.attention_heads}")
        return self


class TeacherSpec(ModelSpec):
    model: str = "dcn_v2"
    name: str = Field("teacher", pattern=r"^[A-Za-z0-9_]+$", description="names this teacher in an ensemble")
    weight: float = Field(1.0, gt=0, description="ensemble weight (distill.ensemble: weighted)")
    checkpoint: str | None = Field(None, description="model.pt of a trained teacher; trained by the job if absent")
    epochs: int | None = Field(None, ge=1, description="teacher training epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0)

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        return _known_model(name, TEACHER_MODELS, "teacher")


class StudentSpec(ModelSpec):
    model: str = "mlp"

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        return _known_model(name, STUDENT_MODELS, "student")


class DistillSpec(Section):
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label loss; 1 - alpha goes to the teacher")
    soft_loss: Literal["kd", "mse"] = Field("kd", description="kd: tempered BCE/KL; mse: logit matching")
    hint_weight: float = Field(0.0, ge=0, description="weight of the hint loss (needs label.store_hidden)")
    listwise_weight: float = Field(0.0, ge=0, description="weight of listwise ranking KD over features.group")
    ensemble: Literal["mean", "weighted"] = Field("mean", description="how several teachers' logits combine")


class LabelSpec(Section):
    batch_size: int = Field(4096, ge=1)
    actors: tuple[int, int] = (1, 1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    logit_dtype: Literal["float32", "float16"] = "float32"
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="teacher inference autocast (GPU)")
    shard_rows: int = Field(250_000, ge=1, description="target rows per soft-label shard file")
    store_hidden: bool = Field(False, description="store the teacher's last hidden layer for hint losses")
    top_k: int | None = Field(None, ge=1, description="multiclass: keep only the top-k teacher logits per row")

    @field_validator("actors")
    @classmethod
    def _pool(cls, actors: tuple[int, int]) -> tuple[int, int]:
        low, high = actors
        if low < 1 or high < low:
            raise ValueError(f"expected [min, max] with 1 <= min <= max, got {list(actors)}")
        return actors


class LRScheduleSpec(Section):
    """Learning rate per optimizer step: constant, or warmup then cosine / linear decay, or step decay."""

    kind: Literal["constant", "warmup_cosine", "warmup_linear", "step"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear floor as a fraction of lr")
    step_size: int = Field(1000, ge=1, description="step: multiply lr by gamma every step_size steps")
    gamma: float = Field(0.5, gt=0, le=1)


class TrainSpec(Section):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(1024, ge=1, description="micro-batch per worker")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    shuffle_buffer_rows: int = Field(0, ge=0, description="local shuffle buffer; 0 disables")
    # 0: one Ray Data thread still prepares the next batch during each step. More adds a prefetch thread
    # and a format pool that take the GIL from a CPU training loop (16% more CPU in its thread, measured); raise
    # it when blocks come from other nodes or a GPU step outpaces the batch preparation.
    prefetch_batches: int = Field(0, ge=0, description="batches Ray Data prepares ahead beyond the next one")
    lr_schedule: LRScheduleSpec = Field(default_factory=LRScheduleSpec)
    max_failures: int = Field(0, ge=0, description="worker failures Ray Train survives, resuming from a checkpoint")
    seed: int = 0


class EvalSpec(Section):
    batch_size: int = Field(8192, ge=1)
    slice_by: str | None = Field(None, description="categorical column to break metrics down by, e.g. device")
    max_slices: int = Field(20, ge=1, description="the largest slices by rows are reported")
    calibration_bins: int = Field(10, ge=2)
    latency_runs: int = Field(200, ge=10, description="batch-1 forward passes timed per model")


class OutputSpec(Section):
    root: str = "runs"
    run_name: str | None = None


class StorageSpec(Section):
    """Where `s3://` paths live. Credentials never go here: the spec is logged and hashed into manifests."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. MinIO (default: AWS)")
    region: str | None = Field(None, description="S3 region (default: the AWS environment's)")
    profile: str | None = Field(None, description="AWS profile from ~/.aws (default: AWS_PROFILE)")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        secret = sorted(k for k in raw if _CREDENTIAL.search(str(k))) if isinstance(raw, dict) else []
        if secret:  # name the keys only: the values are secrets
            raise ValueError(
                f"{secret} look like credentials, which never belong in a spec; export AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or name a profile (storage.profile or AWS_PROFILE), or use an IAM role"
            )
        return raw


class RaySpec(Section):
    address: str | None = Field(None, description="Ray address to join; a local Ray is started when absent")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all cores)")
    object_store_memory_mb: int | None = Field(None, ge=64, description="object store of a local Ray")
    data_memory_limit_mb: int | None = Field(None, ge=16, description="cap on the object store Ray Data may "
                                             "fill with in-flight blocks (streaming back-pressure)")


class GateSpec(Section):
    metric: Literal["auc", "gauc", "log_loss"] = "auc"
    max_regression: float = Field(0.0, ge=0, description="how much worse than the champion a challenger may be")


class ScheduleSpec(Section):
    """Nightly re-distillation: when cycles fire, what they train on, and what may be promoted."""

    cron: str = "30 2 * * *"
    timezone: str = "UTC"
    window_days: int = Field(3, ge=1, description="train on this many days before the evaluated day")
    registry: str = Field(min_length=1, description="model registry root (local path or s3://)")
    model_name: str | None = Field(None, description="name in the registry (default: the job name)")
    gate: GateSpec = Field(default_factory=GateSpec)
    warm_start: bool = True
    keep_versions: int = Field(10, ge=1)
    keep_shard_days: int = Field(14, ge=1)
    max_catch_up: int = Field(3, ge=0)
    lock_ttl_minutes: int = Field(360, ge=1, description="a crashed cycle's lock expires after this")

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a cron expression; expected 5 fields, e.g. '30 2 * * *'")
        return cron

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
        return name


class JobSpec(Section):
    name: str = Field(min_length=1, description="names the run directory and the registry entry")
    data: DataSpec
    features: FeaturesSpec
    teacher: list[TeacherSpec] = Field(default_factory=lambda: [TeacherSpec()],
                                       description="one teacher, or a list (an ensemble)")
    student: StudentSpec = Field(default_factory=StudentSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    label: LabelSpec = Field(default_factory=LabelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    schedule: ScheduleSpec | None = None
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            raise ValueError(f"{name!r} is not a job name: use letters, digits, '_', '.', '-', starting with a "
                             "letter or digit (it names directories)")
        return name

    @field_validator("teacher", mode="before")
    @classmethod
    def _one_or_many(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            return [raw]
        if isinstance(raw, list) and not raw:
            raise ValueError("the teacher list is empty; give one teacher or several")
        return raw

    @model_validator(mode="after")
    def _cross_section(self) -> JobSpec:
        names = [t.name for t in self.teacher]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names {names} repeat; give each teacher of an ensemble its own name")
        if self.distill.hint_weight > 0 and not self.label.store_hidden:
            raise ValueError("distill.hint_weight > 0 needs the teacher's hidden vectors: set label.store_hidden: true")
        if self.distill.hint_weight > 0 and len(self.teacher) > 1:
            raise ValueError("distill.hint_weight > 0 works with one teacher (hidden layers of an ensemble differ)")
        if self.distill.listwise_weight > 0 and not self.features.group:
            raise ValueError("distill.listwise_weight > 0 ranks items within features.group; set features.group")
        if self.label.top_k is not None and self.features.task != "multiclass":
            raise ValueError("label.top_k applies to task: multiclass only; remove it or set features.task")
        if self.label.top_k is not None and self.label.top_k >= (self.features.num_classes or 0):
            raise ValueError(f"label.top_k {self.label.top_k} must be below features.num_classes "
                             f"{self.features.num_classes}; remove top_k to keep every logit")
        if self.eval.slice_by and self.eval.slice_by not in self.features.categorical:
            raise ValueError(f"eval.slice_by {self.eval.slice_by!r} is not a categorical feature; use one of "
                             f"{self.features.categorical}")
        if self.label.gpus_per_actor > 0 and not self.train.use_gpu:
            raise ValueError(
                "label.gpus_per_actor > 0 but train.use_gpu is false; set train.use_gpu: true on a GPU cluster "
                "or label.gpus_per_actor: 0"
            )
        if self.schedule is not None and len(self.teacher) > 1:
            raise ValueError("schedule (nightly) runs take one teacher; distil the ensemble in a `distill run` job, "
                             "or list a single teacher")
        if self.label.precision == "fp16" and self.label.gpus_per_actor == 0:
            raise ValueError("label.precision fp16 needs GPU actors (label.gpus_per_actor > 0); on CPU use fp32 or bf16")
        if self.train.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("train.precision fp16 needs train.use_gpu: true; on CPU use fp32 or bf16")
        return self

    @property
    def run_dir(self) -> str:
        return f"{self.output.root.rstrip('/')}/{self.output.run_name or self.name}"

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the given sections (all when none): what a manifest compares on rerun."""
        dumped = self.model_dump(mode="json")
        chosen = {k: dumped[k] for k in sections} if sections else dumped
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Reads a YAML job spec, applies `key.path=value` overrides, and validates it.

    Raises:
        SpecError: the file is missing or malformed, or a field is invalid.
    """
    raw = _read_yaml(Path(path))
    for override in overrides or []:
        _apply_override(raw, override)
    return parse_spec(raw, source=str(path))


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping of sections, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: invalid job spec\n" + _describe(exc, raw)) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} not found; pass the path of a YAML job spec (see jobs/)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise SpecError(f"{path}: YAML tag refused at line {mark.line + 1}, column {mark.column + 1} ({exc.problem}): "
                        "a spec is plain data; code enters only through model: custom with "
                        "factory: 'package.module:function'") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}") from None


def _apply_override(raw: Any, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. train.epochs=1")
    if not isinstance(raw, dict):
        raise SpecError("overrides need a spec that is a YAML mapping")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"override {override!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise SpecError(f"override {override!r}: the value is not valid YAML") from None


def _describe(exc: ValidationError, raw: dict) -> str:
    return "\n".join(_describe_one(err, raw) for err in exc.errors())


def _describe_one(err: dict, raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    if loc[:1] == ["teacher"] and isinstance(raw.get("teacher"), dict) and loc[1:2] == ["0"]:
        loc = ["teacher"] + loc[2:]  # one teacher written as a mapping: no list index in its paths
    if not loc:  # a rule across sections: its message names the fields
        return f"  - {err['msg'].removeprefix('Value error, ')}"
    path = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        return f"  - {path}: unknown key; {suggestion}allowed keys: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"  - {path}: required field is missing; add it to the spec"
    message = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"].startswith("value_error") else f" (got {err.get('input')!r})"
    return f"  - {path}: {message}{got}"


def _allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the section at `loc`, for 'did you mean' hints."""
    model: type[BaseModel] = JobSpec
    for part in (p for p in loc if not p.isdigit()):  # list indices (an ensemble's teachers) select no section
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = typing.get_args(annotation) or (annotation,)  # `X | None` sections too
        found = [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)
