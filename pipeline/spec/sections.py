"""Spec sections of the data, the stages and the runtime: one pydantic model per YAML section.

Every section forbids unknown keys and checks its own fields; rules that span sections live on
`JobSpec` (pipeline/spec/job.py), the model sections in pipeline/spec/models.py.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.spec.base import Section, time_zone
from pipeline.spec.validation import DistillSearchSpec, EarlyStoppingSpec, EvaluationSpec, ValidationSpec

_CREDENTIAL = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


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
    privileged: bool = Field(False, description="adds affinity_hint: a noisy view (noise std 0.6, correlation "
                             "~0.89) of the hidden user-item affinity behind 0.55 x affinity in the click logit; a "
                             "log column serving would not have, for a teacher's extra_features (privileged-feature "
                             "distillation)")

    @model_validator(mode="after")
    def _an_item_per_category(self) -> SyntheticSpec:
        if self.items < self.categories:  # else the generator stops with a traceback after the spec passed
            raise ValueError(f"items ({self.items}) must be >= categories ({self.categories}) so every category "
                             "has an item; raise items or lower categories")
        return self


class CsvSpec(Section):
    """How CSV/TSV click logs are parsed (pyarrow's CSV reader; `.gz` files are decompressed)."""

    delimiter: str = Field(",", min_length=1, max_length=1, description="field separator; \\t for TSV")
    header: bool = Field(True, description="the first line names the columns")
    column_names: list[str] | None = Field(None, min_length=1, description="names for a headerless file")
    null_values: list[str] | None = Field(None, description="strings read as null (default: pyarrow's: '', "
                                          "NULL, NA, N/A, NaN, null, ...)")

    @model_validator(mode="after")
    def _names(self) -> CsvSpec:
        if not self.header and not self.column_names:
            raise ValueError("csv.header is false: give csv.column_names, the columns in file order")
        return self


class DataSpec(Section):
    source: Literal["synthetic", "parquet", "csv"] = Field(
        "synthetic", description="synthetic: the built-in log; parquet or csv: the files under data.path")
    path: str | None = Field(None, min_length=1, description="root of day partitions (date=, dt=, ds=, day=, pt=), "
                             "or with data.time_column a file or folder of files (local or s3://)")
    partitions: dict[dt.date, str] | None = Field(
        None, description="logs not laid out as day partitions: {day: file or directory}")
    partition_key: str | None = Field(None, min_length=1, description="the partition folders' key, e.g. dt for "
                                      "dt=20261128 (default: whichever of date, dt, ds, day, pt is there)")
    time_column: str | None = Field(None, min_length=1, description="flat logs: the column the days come from "
                                    "(unix seconds or ms, an Arrow timestamp or ISO-8601 text)")
    time_unit: Literal["auto", "s", "ms"] = Field("auto", description="unit of an integer time_column "
                                                  "(auto: ms when values pass 10^11)")
    timezone: str = Field("UTC", description="IANA zone whose midnight starts a day, e.g. Asia/Shanghai")
    csv: CsvSpec = Field(default_factory=CsvSpec)
    train_days: DayRange
    eval_days: DayRange
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    on_bad_rows: Literal["fail", "quarantine"] = Field(
        "fail", description="fail: stop at the first bad row, naming file, row group and column; "
                            "quarantine: set bad rows aside under <run>/quarantine/ with a reason and go on")
    max_id: int = Field(2**53, ge=1, description="ids above this (or below 0) are bad rows: corrupt, not real ids")
    validation: ValidationSpec | None = Field(None, description="rows held out of training to choose models on")
    evaluation: EvaluationSpec | None = Field(None, description="rows held out of training and choice, by a hash: "
                                              "the only rows of the eval days scored; eval_days may then overlap "
                                              "train_days")

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
            raise ValueError("data.partitions names existing files: use it with data.source: parquet or csv")
        if self.time_column and (self.partitions is not None or self.partition_key or self.source == "synthetic"):
            raise ValueError("data.time_column derives the days of a flat log under data.path: remove "
                             "data.partitions / data.partition_key, or the time_column")
        if self.csv != CsvSpec() and self.source != "csv":
            raise ValueError("data.csv configures CSV parsing: set data.source: csv, or remove data.csv")
        return self

    @field_validator("timezone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        return time_zone(zone)

    @model_validator(mode="after")
    def _disjoint(self) -> DataSpec:
        overlap = set(self.train_days.days()) & set(self.eval_days.days())
        if overlap and self.evaluation is None:  # with it, the evaluation rows are held out on every day
            first = min(overlap).isoformat()
            raise ValueError(
                f"eval_days overlap train_days (e.g. {first}); evaluate on held-out days after the training window, "
                "or hold out evaluation rows inside the training days with data.evaluation: {fraction: 0.2}"
            )
        return self

    def all_days(self) -> list[dt.date]:
        return sorted(set(self.train_days.days()) | set(self.eval_days.days()))

    @property
    def held_out_fraction(self) -> float:
        """The share of the fit days' rows that rows splits hold out of training: validation (a fraction; a
        days split holds out days) and evaluation rows, two independent hash sides."""
        validation = self.validation.fraction if self.validation else 0.0
        evaluation = self.evaluation.fraction if self.evaluation else 0.0
        return 1 - (1 - validation) * (1 - evaluation)

    def fit_days(self) -> list[dt.date]:
        """The training days models fit on: all of them, less the last `validation.days`."""
        held_out = self.validation.days if self.validation else 0
        return self.train_days.days()[: len(self.train_days.days()) - held_out]

    def validation_days(self) -> list[dt.date]:
        """The days validation rows come from: the held-out last days, or every training day (a fraction)."""
        if self.validation is None:
            return []
        return self.train_days.days()[-self.validation.days:] if self.validation.days else self.train_days.days()


class SequenceSpec(Section):
    column: str
    length: int = Field(10, ge=1, le=200)
    embedding_of: str = Field(description="categorical column whose embedding table the sequence shares")
    delimiter: str | None = Field(None, min_length=1, description="a text column of ids joined by this, "
                                  "e.g. ^ for 1^2^3 (a list column needs none)")


class FeaturesSpec(Section):
    task: Literal["binary", "multiclass"] = "binary"
    num_classes: int | None = Field(None, ge=2, description="multiclass only: labels are 0..num_classes-1")
    label: str = "clicked"
    id: str | None = Field("event_id", description="unique row id carried into the shards (null: none)")
    group: str | None = "user_id"
    categorical: list[str] = Field(min_length=1)
    dense: list[str] = []
    sequence: SequenceSpec | None = None
    label_threshold: float | None = Field(None, description="label is 1 where the label column >= this "
                                          "(e.g. 4 for rating >= 4), else 0")
    dense_fill: float = Field(0.0, description="what a null or NaN dense value becomes")
    dense_missing_indicators: bool = Field(False, description="also flag each missing dense value in one more 0/1 "
                                           "input per dense column (the model fills and flags it, in its exported "
                                           "graph too): missing is then a signal of its own, not only dense_fill")

    @model_validator(mode="after")
    def _consistent(self) -> FeaturesSpec:
        names = self.input_columns()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"columns listed twice: {dupes}; each column has one role")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also a feature; remove it from the feature lists")
        if (self.task == "multiclass") != (self.num_classes is not None):
            raise ValueError("task: multiclass needs num_classes (labels 0..num_classes-1); task: binary takes none")
        if self.label_threshold is not None and self.task == "multiclass":
            raise ValueError("label_threshold makes a 0/1 label: use it with task: binary")
        if self.sequence and self.sequence.embedding_of not in self.categorical:
            raise ValueError(
                f"sequence.embedding_of {self.sequence.embedding_of!r} is not a categorical column; "
                f"use one of {self.categorical}"
            )
        return self

    def input_columns(self) -> list[str]:
        """Columns a model reads (never the label, never `true_ctr`)."""
        return self.categorical + self.dense + ([self.sequence.column] if self.sequence else [])

    @property
    def out_dim(self) -> int:
        """Logits per row: 1 (binary), or num_classes."""
        return self.num_classes or 1


class DistillSpec(Section):
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label loss; 1 - alpha goes to the teacher")
    soft_loss: Literal["kd", "mse"] = Field("kd", description="kd: tempered BCE/KL; mse: logit matching")
    hint_weight: float = Field(0.0, ge=0, description="weight of the hint loss (needs label.store_hidden)")
    listwise_weight: float = Field(0.0, ge=0, description="weight of listwise ranking KD over features.group")
    ensemble: Literal["mean", "weighted"] = Field("mean", description="how several teachers' logits combine")
    min_teacher_lift: float = Field(0.002, ge=0, description="the teacher must beat the hard-label student on "
                                    "validation by this much (AUC; accuracy for multiclass) before it labels")
    on_weak_teacher: Literal["fail", "warn"] = Field("fail", description="fail: stop the run (exit 1); warn: go on "
                                                     "and say so in the report")
    search: DistillSearchSpec | None = Field(None, description="candidates over soft_loss, alpha and temperature, "
                                             "chosen on validation (true: the default grid)")

    @field_validator("search", mode="before")
    @classmethod
    def _default_grid(cls, search: Any) -> Any:
        return {} if search is True else None if search is False else search


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
    runtime: Literal["torch", "onnxruntime"] = Field(
        "torch", description="onnxruntime: the actors run the teacher exported to ONNX (parity-checked first)")

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
    # Defaults chosen by measurement (bench/regularisation.py, four click logs): for sparse-id models lr 0.01
    # ranked best of 0.001-0.03 (0.001 ranked last on three of four); AdamW's decoupled weight decay up to 1
    # moved validation AUC by less than its noise, and at lr 0.03 it hurt, so it stays off.
    lr: float = Field(0.01, gt=0, description="AdamW learning rate (the teacher's too unless teacher.lr)")
    weight_decay: float = Field(0.0, ge=0)
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    shuffle_buffer_rows: int = Field(0, ge=0, description="local shuffle buffer; 0 disables")
    # 0: one Ray Data thread still prepares the next batch during each step. More adds a prefetch thread
    # and a format pool that take the GIL from a CPU training loop (docs/SCALING.md); raise
    # it when blocks come from other nodes or a GPU step outpaces the batch preparation.
    prefetch_batches: int = Field(0, ge=0, description="batches Ray Data prepares ahead beyond the next one")
    lr_schedule: LRScheduleSpec = Field(default_factory=LRScheduleSpec)
    early_stopping: EarlyStoppingSpec | None = Field(None, description="needs data.validation; epochs is the maximum")
    max_failures: int = Field(0, ge=0, description="worker failures Ray Train survives, resuming from a checkpoint")
    seed: int = 0


class EvalSpec(Section):
    batch_size: int = Field(8192, ge=1)
    slice_by: str | None = Field(None, description="categorical column to break metrics down by, e.g. device")
    max_slices: int = Field(20, ge=1, description="the largest slices by rows are reported")
    calibration_bins: int = Field(10, ge=2, description="reliability bins, equal-width and equal-mass (quantile)")
    calibration: Literal["none", "platt", "isotonic", "temperature"] = Field(
        "none", description="post-hoc calibration of each binary model's logit, fitted on the validation split "
        "(data.validation) and folded into the exported student: platt (a x logit + b), temperature "
        "(logit / T) or isotonic (monotone, piecewise linear)")
    latency_runs: int = Field(200, ge=10, description="batch-1 forward passes timed per model")
    bootstrap: int = Field(200, ge=0, description="paired bootstrap resamples of the eval rows for the 95% "
                           "intervals of each model's AUC and of their differences; 0 disables")
    min_slice_positives: int = Field(50, ge=0, description="slices with fewer clicks are listed, not scored")


class ExportSpec(Section):
    """The serving artifacts `run` makes of the recommended student (pipeline/export.py), checked for parity
    with the evaluated model, and the serving-speed table of the report."""

    formats: list[Literal["onnx", "torchscript"]] = Field(["onnx", "torchscript"],
                                                          description="export formats; [] exports nothing")
    quantize: list[Literal["int8", "fp16"]] = Field([], description="also export with weight-only INT8 (ONNX "
                                                    "Runtime's quantiser) or FP16 embedding tables, each kept if "
                                                    "its AUC loss is small enough")
    max_quantized_auc_loss: float = Field(0.0005, ge=0, description="AUC a quantised export may lose on the "
                                          "parity rows against the fp32 export")
    parity_rows: int = Field(10_000, ge=100, description="evaluation rows the exported and eager logits are "
                             "compared on")
    threads: int = Field(1, ge=1, description="intra-op threads of ONNX Runtime and torch when serving is timed")
    serving_batches: list[int] = Field([1, 64, 512, 4096], description="batch sizes of the serving-speed table; "
                                       "[] skips it")
    serving_runs: int = Field(200, ge=10, description="timed calls per batch size at batch 64 or less (fewer "
                              "at larger batches)")

    @field_validator("serving_batches")
    @classmethod
    def _positive(cls, batches: list[int]) -> list[int]:
        if any(b < 1 for b in batches):
            raise ValueError(f"batch sizes must be at least 1, got {batches}")
        return batches


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
        return refuse_credentials(raw, "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a profile "
                                       "(storage.profile or AWS_PROFILE), or use an IAM role")


def refuse_credentials(raw: Any, instead: str) -> Any:
    """A section's raw keys, refused when one looks like a credential (the spec is logged and hashed)."""
    secret = sorted(k for k in raw if _CREDENTIAL.search(str(k))) if isinstance(raw, dict) else []
    if secret:  # name the keys only: the values are secrets
        raise ValueError(f"{secret} look like credentials, which never belong in a spec; {instead}")
    return raw


class TrackingSpec(Section):
    """MLflow tracking (pipeline/tracking.py). Credentials never go here: MLflow reads its own environment
    variables (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN)."""

    enabled: bool = Field(True, description="log each run (and nightly cycle) to MLflow")
    uri: str | None = Field(None, min_length=1, description="an MLflow tracking server, e.g. http://mlflow:5000 "
                            "(default: a SQLite store, <output.root>/mlflow.db)")
    experiment: str | None = Field(None, min_length=1, description="default: the job name (nightly: the registry "
                                   "model name)")
    required: bool = Field(False, description="an unreachable tracking.uri stops the run, instead of a warning "
                           "and the local store")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        return refuse_credentials(raw, "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                       "MLFLOW_TRACKING_TOKEN)")

    @field_validator("uri")
    @classmethod
    def _no_userinfo(cls, uri: str | None) -> str | None:
        if uri and re.match(r"^[a-z+]+://[^/@]+@", uri):
            raise ValueError("the URI holds a user name or password, which never belong in a spec; give "
                             "http://host:port and export MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        return uri


class RaySpec(Section):
    address: str | None = Field(None, description="Ray address to join; a local Ray is started when absent")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all cores)")
    object_store_memory_mb: int | None = Field(None, ge=64, description="object store of a local Ray")
    data_memory_limit_mb: int | None = Field(None, ge=16, description="cap on the object store Ray Data may "
                                             "fill with in-flight blocks (streaming back-pressure)")
