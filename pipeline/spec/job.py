"""`JobSpec`: the whole job, its sections, the rules that span them, and the paths derived from them."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.spec.models import StudentSpec, TeacherSpec
from pipeline.spec.schedule import ScheduleSpec
from pipeline.spec.sections import (
    DataSpec,
    DistillSpec,
    EvalSpec,
    ExportSpec,
    FeaturesSpec,
    LabelSpec,
    OutputSpec,
    RaySpec,
    Section,
    StorageSpec,
    TrackingSpec,
    TrainSpec,
)


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
    export: ExportSpec = Field(default_factory=ExportSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    schedule: ScheduleSpec | None = None
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    def _onnxruntime_labelling(self) -> None:
        """label.runtime onnxruntime runs the exported teacher's logits on CPU: nothing else of the teacher."""
        label = self.label
        if label.store_hidden:
            raise ValueError("label.runtime onnxruntime exports the teacher's logits only; label.store_hidden "
                             "needs its hidden layer: use label.runtime torch")
        if label.gpus_per_actor > 0 or label.precision != "fp32":
            raise ValueError("label.runtime onnxruntime runs the teacher on CPU in fp32 (the pinned onnxruntime "
                             "has no GPU provider); set label.gpus_per_actor 0 and label.precision fp32, or use "
                             "label.runtime torch for GPU labelling")

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
        if self.distill.search and self.data.validation is None:
            raise ValueError("distill.search chooses its candidates on validation: set data.validation "
                             "(e.g. {fraction: 0.1}) or remove distill.search")
        if self.distill.listwise_weight > 0 and not self.features.group:
            raise ValueError("distill.listwise_weight > 0 ranks items within features.group; set features.group")
        if self.label.runtime == "onnxruntime":
            self._onnxruntime_labelling()
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
        custom = [m.model for m in (*self.teacher, self.student) if m.model == "custom"]
        if self.features.dense_missing_indicators and custom:
            raise ValueError("features.dense_missing_indicators is built into the model families' input encoder; a "
                             "custom model would get NaN for each missing dense value: turn the indicators off, or "
                             "train a built-in family (mlp, fm, dcn_v2, deepfm, bst)")
        if self.schedule is not None and self.data.evaluation is not None:
            raise ValueError("data.evaluation holds out rows of the eval days, but a nightly cycle (schedule) "
                             "evaluates on the new day, held out whole: remove data.evaluation from the nightly "
                             "spec (keep it in a `distill run` job)")
        if self.schedule is not None and len(self.teacher) > 1:
            raise ValueError("schedule (nightly) runs take one teacher; distil the ensemble in a `distill run` job, "
                             "or list a single teacher")
        if self.label.precision == "fp16" and self.label.gpus_per_actor == 0:
            raise ValueError("label.precision fp16 needs GPU actors (label.gpus_per_actor > 0); on CPU use fp32 or bf16")
        if self.train.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("train.precision fp16 needs train.use_gpu: true; on CPU use fp32 or bf16")
        return self

    @model_validator(mode="after")
    def _validation_rules(self) -> JobSpec:
        validation, stopping = self.data.validation, self.train.early_stopping
        if validation and validation.days >= len(self.data.train_days.days()):
            raise ValueError(f"data.validation.days {validation.days} would leave no training data: train_days has "
                             f"{len(self.data.train_days.days())} day(s); hold out fewer days or use a fraction")
        if validation and validation.fraction and not self.validation_key:
            raise ValueError("data.validation.fraction hashes a row key: set data.validation.by, features.id "
                             "or features.group")
        self._evaluation_rules()
        if stopping and not validation:
            raise ValueError("train.early_stopping stops on the validation split: add data.validation")
        if self.eval.calibration != "none" and not validation:
            raise ValueError(f"eval.calibration {self.eval.calibration} is fitted on the validation split, never on "
                             "the evaluation days: add data.validation (e.g. {fraction: 0.1}) or set "
                             "eval.calibration: none")
        if self.eval.calibration != "none" and self.features.task != "binary":
            raise ValueError(f"eval.calibration {self.eval.calibration} calibrates a click probability: it applies "
                             "to task: binary only (platt, isotonic, temperature); set eval.calibration: none for "
                             "task: multiclass")
        if stopping and stopping.metric != "log_loss" and stopping.metric != self.selection_metric:
            raise ValueError(f"train.early_stopping.metric {stopping.metric!r} does not exist for task "
                             f"{self.features.task!r}; use {self.selection_metric!r} or 'log_loss'")
        return self

    def _evaluation_rules(self) -> None:
        """The evaluation rows (data.evaluation): a key to hash, and training rows left beside them."""
        evaluation, validation = self.data.evaluation, self.data.validation
        if evaluation is None:
            return
        if not self.evaluation_key:
            raise ValueError("data.evaluation hashes a row key: set data.evaluation.by (e.g. the row id column), "
                             "features.id or features.group")
        if self.evaluation_key == self.features.label:
            raise ValueError(f"data.evaluation.by {self.evaluation_key!r} is the label: the clicks would all fall on "
                             "one side; hash a row id or a user column")
        if self.features.sequence and self.evaluation_key == self.features.sequence.column:
            raise ValueError(f"data.evaluation.by {self.evaluation_key!r} is the behaviour sequence (a list); hash "
                             "a row id or a user column")
        if validation and validation.fraction + evaluation.fraction >= 1:
            raise ValueError(f"data.validation.fraction {validation.fraction:g} + data.evaluation.fraction "
                             f"{evaluation.fraction:g} hold out most rows: about {1 - self.data.held_out_fraction:.0%} "
                             "would be left to train on; keep their sum well below 1 (e.g. 0.1 and 0.2)")

    @model_validator(mode="after")
    def _teacher_only_rules(self) -> JobSpec:
        """Teacher-only (privileged) columns are never the student's, nor the label; the log is read with one
        role per column and one sequence."""
        f = self.features
        student = {c: f"features.{kind}" for kind, columns in (("categorical", f.categorical), ("dense", f.dense),
                   ("sequence", [f.sequence.column] if f.sequence else [])) for c in columns}
        roles = {}  # column -> (kind, where it was listed first), across every teacher
        for index, teacher in enumerate(self.teacher):
            where = "teacher" if len(self.teacher) == 1 else f"teacher[{index}]"
            extra = teacher.extra_features
            kinds = {"categorical": extra.categorical, "dense": extra.dense,
                     "sequence": [extra.sequence.column] if extra.sequence else []}
            for kind, columns in kinds.items():
                for column in columns:
                    field = f"{where}.extra_features.{kind}"
                    if column in student:
                        raise ValueError(f"{field}: {column!r} is a student feature ({student[column]}); a teacher-"
                                         "only column is one the student never reads: remove it from one of the two")
                    if column == self.features.label:
                        raise ValueError(f"{field}: {column!r} is the label (features.label); a teacher reading it "
                                         "would copy the clicks: remove it")
                    seen = roles.setdefault(column, (kind, field))
                    if columns.count(column) > 1:
                        raise ValueError(f"{field}: {column!r} is listed twice; list each column once")
                    if seen[0] != kind:
                        raise ValueError(f"{field}: {column!r} is also listed in {seen[1]}; give each column one role")
            self._teacher_sequence(where, teacher)
            if teacher.model == "bst" and self.teacher_features(teacher).sequence is None:  # else it fails on Ray
                raise ValueError(f"{where}.model: bst reads a behaviour sequence, but this teacher has none; add "
                                 "features.sequence (column, length, embedding_of) or choose dcn_v2 or deepfm")
        return self

    def _teacher_sequence(self, where: str, teacher: TeacherSpec) -> None:
        sequence = teacher.extra_features.sequence
        if sequence is None:
            return
        if self.features.sequence is not None:
            raise ValueError(f"{where}.extra_features.sequence: features.sequence is set and a model reads one "
                             "sequence; remove one of them")
        categorical = self.features.categorical + teacher.extra_features.categorical
        if sequence.embedding_of not in categorical:
            raise ValueError(f"{where}.extra_features.sequence.embedding_of {sequence.embedding_of!r} is not a "
                             f"categorical column of this teacher; use one of {categorical}")
        others = {t.extra_features.sequence.column for t in self.teacher if t.extra_features.sequence}
        if len(others) > 1:
            raise ValueError(f"{where}.extra_features.sequence: the teachers name different sequences "
                             f"{sorted(others)}; the log is read with one sequence column")

    def teacher_features(self, teacher: TeacherSpec) -> FeaturesSpec:
        """`features` as `teacher` reads it: the student's columns, then its teacher-only ones (appended, so
        the student's fields keep their places)."""
        return _with_extra(self.features, [teacher.extra_features])

    @property
    def log_features(self) -> FeaturesSpec:
        """`features` plus every teacher's teacher-only columns: what reading the click logs checks (bad rows)
        and normalises (ids hashed, nulls filled), whichever model the read is for."""
        return _with_extra(self.features, [t.extra_features for t in self.teacher])

    @property
    def teacher_only_columns(self) -> list[str]:
        """Every teacher's teacher-only columns (none when no teacher has extra features)."""
        return list(dict.fromkeys(c for t in self.teacher for c in t.extra_features.columns))

    @property
    def selection_metric(self) -> str:
        """What models are compared on: AUC (binary) or accuracy (multiclass), higher is better."""
        return "accuracy" if self.features.task == "multiclass" else "auc"

    @property
    def validation_key(self) -> str | None:
        """The column a row (fraction) split hashes; None for a days split or none (nothing to hash)."""
        validation = self.data.validation
        if validation is None or not validation.fraction:
            return None
        return validation.by or self.features.id or self.features.group

    @property
    def evaluation_key(self) -> str | None:
        """The column the evaluation rows' split hashes; None when the eval days are held out whole."""
        evaluation = self.data.evaluation
        if evaluation is None:
            return None
        return evaluation.by or self.features.id or self.features.group

    @property
    def split_keys(self) -> list[str]:
        """The distinct columns the row splits hash (validation, evaluation): every read that splits carries them."""
        return list(dict.fromkeys(k for k in (self.validation_key, self.evaluation_key) if k))

    @property
    def run_dir(self) -> str:
        """The run's directory: `output.root/output.run_name` (default: the job name)."""
        return f"{self.output.root.rstrip('/')}/{self.output.run_name or self.name}"

    @property
    def nightly_dir(self) -> str:
        """`<run_dir>/nightly`: the nightly cycles' records, runs, soft-label shards, teacher and lock."""
        return f"{self.run_dir}/nightly"

    @property
    def registry_model_name(self) -> str:
        """The model's name in the registry: `schedule.model_name`, else the job name."""
        if self.schedule is None:
            return self.name
        return self.schedule.model_name or self.name

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the given sections (all when none): what a manifest compares on rerun."""
        dumped = self.model_dump(mode="json")
        chosen = {k: dumped[k] for k in sections} if sections else dumped
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def _with_extra(features: FeaturesSpec, extras: list) -> FeaturesSpec:
    """`features` with the teacher-only columns of `extras` (`TeacherFeaturesSpec`s) appended."""
    if not any(extra.columns for extra in extras):
        return features

    def merged(kind: str) -> list[str]:
        return list(dict.fromkeys([*getattr(features, kind), *(c for e in extras for c in getattr(e, kind))]))

    sequence = features.sequence or next((e.sequence for e in extras if e.sequence), None)
    return features.model_copy(update={"categorical": merged("categorical"), "dense": merged("dense"),
                                       "sequence": sequence})
