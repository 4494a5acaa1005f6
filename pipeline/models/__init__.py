"""CTR model families, chosen by short name in the spec (`teacher.model`, `student.model`).

Teachers: dcn_v2, deepfm, bst. Students: mlp, fm, dcn_v2. Either role: custom (a plug-in factory).
See docs/MODELS.md.
"""

from pipeline.models.registry import (
    MODEL_DEFAULTS,
    build_model,
    complete_config,
    count_parameters,
    load_model,
    model_bytes,
    save_model,
)

__all__ = ["MODEL_DEFAULTS", "build_model", "complete_config", "count_parameters", "load_model", "model_bytes",
           "save_model"]
