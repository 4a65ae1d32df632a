"""Training recipes: what to train and on which data.

A recipe is a function, named by an entry point ``package.module:function``, that takes
no arguments and returns a :class:`Recipe`. It is called once in every training worker
(to build the model and data loaders there) and once in the driver (for export and the
holdout data), so it must be deterministic: seed everything it randomises.

Built-in recipes have short names (``digits-cnn``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fogline.protocol import ConfigError, TrainingError

__all__ = ["BUILTIN_RECIPES", "Recipe", "load_recipe", "resolve_recipe"]

BUILTIN_RECIPES: dict[str, str] = {
    "digits-cnn": "fogline.cloud.training._digits:digits_cnn",
}
_ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass
class Recipe:
    """What a recipe returns.

    - ``model``: an untrained ``torch.nn.Module`` mapping a float batch to class logits;
    - ``train_loader`` / ``val_loader``: ``(inputs, labels)`` batches;
    - ``example_input``: a batch (any size ≥ 2 keeps the exported batch axis dynamic);
    - ``holdout_inputs`` / ``holdout_labels``: data never trained on, used for the
      parity check, quantization calibration and the accuracy gate;
    - ``labels``: class names, shipped in the release manifest;
    - ``config``: what the recipe was built with (recorded as lineage);
    - ``data_hash``: identifies the data (recorded as lineage).
    """

    model: torch.nn.Module
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    example_input: torch.Tensor
    holdout_inputs: np.ndarray
    holdout_labels: np.ndarray | None
    labels: list[str] | None = None
    learning_rate: float = 1e-3
    config: dict[str, Any] = field(default_factory=dict)
    data_hash: str = ""
    input_name: str = "input"
    output_name: str = "logits"


def resolve_recipe(name: str) -> str:
    """The entry point of a built-in recipe name, or ``name`` itself if it is one."""
    if name in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name]
    if _ENTRY_POINT.fullmatch(name):
        return name
    known = ", ".join(sorted(BUILTIN_RECIPES))
    raise ConfigError(f"unknown recipe {name!r}: use one of {known} or package.module:function")


def load_recipe(entry_point: str) -> Recipe:
    """Import and call a recipe entry point."""
    module_name, _, func_name = resolve_recipe(entry_point).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"recipe {entry_point!r}: cannot import {module_name}: {exc}") from None
    func: Callable[[], Any] | None = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"recipe {entry_point!r}: {module_name} has no function {func_name}")
    try:
        recipe = func()
    except Exception as exc:
        raise TrainingError(f"recipe {entry_point!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(recipe, Recipe):
        raise TrainingError(
            f"recipe {entry_point!r} returned {type(recipe).__name__}, not a fogline Recipe"
        )
    return recipe
