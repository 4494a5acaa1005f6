"""CTR model families, chosen by short name in the spec (`teacher.model`, `student.model`)."""

from pipeline.models.registry import build_model, count_parameters, load_model, save_model

__all__ = ["build_model", "count_parameters", "load_model", "save_model"]
