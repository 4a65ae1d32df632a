"""``fogline train RECIPE``: train on Ray, export, quantize, gate and register."""

from __future__ import annotations

from typing import Annotated

import typer

from .._pipeline import BATCHES, run_pipeline
from ._common import (
    AsJson,
    ConfigFile,
    DataDir,
    NoProgress,
    cli_errors,
    emit_json,
    settings_from,
    stderr,
    stdout,
)
from ._render import print_pipeline_result

__all__ = ["train"]


def train(
    recipe: Annotated[
        str, typer.Argument(help="Built-in recipe (digits-cnn) or package.module:function")
    ],
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = 5,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray Train workers.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    name: Annotated[
        str | None, typer.Option("--name", help="Model name \\[default: the recipe name]")
    ] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    no_progress: NoProgress = False,
    as_json: AsJson = False,
) -> None:
    """Train a recipe on Ray and register a gated, quantized model version."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir)
        result = run_pipeline(
            recipe,
            epochs=epochs,
            workers=workers,
            seed=seed,
            name=name,
            settings=settings,
            progress=not (no_progress or as_json),
            console=stderr,
        )
    if as_json:
        emit_json(result.record.summary())
        return
    print_pipeline_result(stdout, result, BATCHES)
