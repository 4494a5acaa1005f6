"""CTR model families, chosen by short name in the spec (`teacher.model`, `student.model`).

Teachers: dcn_v2, deepfm, bst. Students: mlp, fm, dcn_v2. Either role: custom (a plug-in factory).
See docs/MODELS.md. `ModelConfig` (pure) loads at once; the torch parts load on first use, so that the
spec, which takes its defaults from `ModelConfig`, validates without importing torch.
"""

from __future__ import annotations

import importlib

from pipeline.models.config import ModelConfig

_BUILD = ("build_model", "count_parameters", "load_model", "model_bytes", "save_model")
__all__ = ["ModelConfig", *_BUILD]


def __getattr__(name: str):
    if name in _BUILD:
        return getattr(importlib.import_module("pipeline.models.build"), name)
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
