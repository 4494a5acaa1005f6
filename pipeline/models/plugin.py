"""`custom` models: a user function named 'package.module:function' builds the nn.Module.

This is the only way code enters a spec. The contract (see docs/MODELS.md):
`factory(layout=FeatureLayout, out_dim=int, **factory_args) -> nn.Module` whose forward maps the
inputs dict to logits (B,) when out_dim is 1, else (B, out_dim). `forward_with_hidden` and
`hidden_dim` are optional (only the hint loss needs them).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

from pipeline.features import FeatureLayout


def resolve_factory(path: str) -> Callable[..., Any]:
    """Imports `package.module:function`; ValueError says what is missing and how to fix it."""
    module_name, sep, function = path.partition(":")
    if not sep or not module_name or not function:
        raise ValueError(f"factory {path!r} is not 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"factory {path!r}: cannot import module {module_name!r} ({exc}); install the package "
                         "or put it on PYTHONPATH (on every Ray worker too)") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"factory {path!r}: module {module_name!r} has no function {function!r}")
    return factory


def build_custom(path: str | None, factory_args: dict[str, Any], layout: FeatureLayout, out_dim: int) -> nn.Module:
    """Calls the factory and checks its model on a 2-row dummy batch before any real work starts."""
    if not path:
        raise ValueError("model: custom needs factory: 'package.module:function' (a function building the model)")
    try:
        model = resolve_factory(path)(layout=layout, out_dim=out_dim, **factory_args)
    except TypeError as exc:  # usually a factory_args key the function does not take
        raise ValueError(f"factory {path!r} called as (layout=..., out_dim={out_dim}, **{factory_args}) failed: "
                         f"{exc}; check factory_args against the function's signature") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {path!r} returned {type(model).__name__}, expected a torch.nn.Module")
    expected = (2,) if out_dim == 1 else (2, out_dim)
    try:
        shape = tuple(_dummy_logits(model, layout).shape)
    except Exception as exc:  # any failure here is the plug-in's: report it under the factory's name
        raise ValueError(f"factory {path!r}: the model fails on a 2-row dummy batch "
                         f"({type(exc).__name__}: {exc}); expected logits of shape {expected}") from exc
    if shape != expected:
        raise ValueError(f"factory {path!r}: the model maps a 2-row batch to logits of shape {shape}, expected "
                         f"{expected} ((B,) for out_dim 1, (B, out_dim) otherwise)")
    return model


def _dummy_logits(model: nn.Module, layout: FeatureLayout) -> torch.Tensor:
    inputs = {"categorical": torch.ones(2, len(layout.categorical), dtype=torch.int64),  # (2, F)
              "dense": torch.zeros(2, len(layout.dense))}  # (2, D)
    if layout.sequence:
        inputs["sequence"] = torch.ones(2, max(layout.sequence_length, 1), dtype=torch.int64)  # (2, L)
    training = model.training
    try:
        with torch.no_grad():
            return model.eval()(inputs)  # eval: a dummy batch must not move BatchNorm statistics
    finally:
        model.train(training)
