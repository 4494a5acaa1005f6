"""Job spec: YAML -> typed, validated `JobSpec`, checked once before any work starts.

Every error names the field path, what was expected, and how to fix it; the CLI turns a
`SpecError` into exit code 2. Pure logic: no Ray import.

`sections` holds the data, stage and runtime sections, `models` the teacher and student,
`schedule` the nightly section, `job` the `JobSpec` with its cross-section rules, and `loading`
the YAML reading, overrides and error descriptions.
"""

from pipeline.spec.job import JobSpec
from pipeline.spec.loading import apply_override, load_spec, parse_spec
from pipeline.spec.models import STUDENT_MODELS, TEACHER_MODELS, ModelSpec, StudentSpec, TeacherSpec
from pipeline.spec.schedule import GateSpec, ScheduleSpec
from pipeline.spec.validation import EarlyStoppingSpec, EvaluationSpec, ValidationSpec
from pipeline.spec.sections import (
    DataSpec,
    DayRange,
    DistillSpec,
    EvalSpec,
    ExportSpec,
    FeaturesSpec,
    LabelSpec,
    LRScheduleSpec,
    OutputSpec,
    RaySpec,
    Section,
    SequenceSpec,
    StorageSpec,
    SyntheticSpec,
    TrainSpec,
)

__all__ = [
    "STUDENT_MODELS", "TEACHER_MODELS", "DataSpec", "DayRange", "DistillSpec", "EvalSpec", "ExportSpec", "FeaturesSpec",
    "GateSpec", "JobSpec", "LRScheduleSpec", "LabelSpec", "ModelSpec", "OutputSpec", "RaySpec", "ScheduleSpec",
    "Section", "SequenceSpec", "StorageSpec", "StudentSpec", "SyntheticSpec", "TeacherSpec", "TrainSpec",
    "EarlyStoppingSpec", "EvaluationSpec", "ValidationSpec", "apply_override", "load_spec", "parse_spec",
]
