"""Train a recipe with Ray Train's ``TorchTrainer`` (CPU), streaming per-epoch metrics.

Workers report each epoch through ``ray.train.report``; rank 0 also pushes the metrics
onto a Ray queue so the driver can draw a live progress bar while ``fit()`` runs.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_data_loader, prepare_model
from ray.util.queue import Empty, Queue
from rich.console import Console

from fogline.protocol import TrainingError

from .._progress import make_progress
from .._ray_backend import task_cpus
from ._recipes import Recipe, load_recipe

__all__ = ["TrainResult", "train_on_ray"]

log = logging.getLogger("fogline.cloud.training")
_WEIGHTS = "model.pt"


@dataclass
class TrainResult:
    recipe: Recipe
    entry_point: str
    history: list[dict[str, float]] = field(default_factory=list)


def _evaluate(model: torch.nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(dim=1)
            correct += int((pred == y).sum())
            total += int(y.numel())
    model.train()
    return 100.0 * correct / max(total, 1)


def _train_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    torch.manual_seed(config["seed"])
    torch.set_num_threads(1)
    recipe = load_recipe(config["entry_point"])
    model = prepare_model(recipe.model)
    train = prepare_data_loader(recipe.train_loader)
    val = prepare_data_loader(recipe.val_loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    context = ray.train.get_context()
    queue: Queue | None = config.get("queue")
    epochs = int(config["epochs"])
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, batches = 0.0, 0
        for x, y in train:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            loss_sum += float(loss.detach())
            batches += 1
        metrics = {
            "epoch": float(epoch),
            "train_loss": loss_sum / max(batches, 1),
            "val_accuracy": _evaluate(model, val),
        }
        rank0 = context.get_world_rank() == 0
        if rank0 and queue is not None:
            queue.put(metrics)
        if epoch == epochs and rank0:
            with tempfile.TemporaryDirectory() as tmp:
                module = getattr(model, "module", model)
                torch.save(module.state_dict(), Path(tmp) / _WEIGHTS)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def train_on_ray(
    entry_point: str,
    *,
    epochs: int,
    workers: int = 1,
    seed: int = 0,
    storage_dir: Path,
    progress: bool = True,
    console: Console | None = None,
) -> TrainResult:
    """Train on the Ray that is running (see ``ray_runtime``) and return the recipe
    with trained weights loaded into its model."""
    if epochs < 1 or workers < 1:
        raise TrainingError(f"epochs and workers must be at least 1 (got {epochs}, {workers})")
    recipe = load_recipe(entry_point)  # fail fast in the driver on a bad recipe
    queue = Queue()
    storage_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "entry_point": entry_point,
            "epochs": epochs,
            "seed": seed,
            "queue": queue,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=False, resources_per_worker={"CPU": task_cpus(1)}
        ),
        run_config=RunConfig(
            name=f"fogline-{uuid.uuid4().hex[:8]}", storage_path=str(storage_dir.resolve())
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:  # surfaced in the driver thread below
            outcome["error"] = exc

    history: list[dict[str, float]] = []
    thread = threading.Thread(target=fit, name="fogline-train", daemon=True)
    with make_progress(progress, console) as bar:
        task = bar.add_task("train", total=epochs, info="starting workers")
        thread.start()
        while thread.is_alive() or not queue.empty():
            try:
                metrics = queue.get(timeout=0.5)
            except Empty:
                continue
            history.append(metrics)
            bar.update(
                task,
                completed=int(metrics["epoch"]),
                info=f"loss {metrics['train_loss']:.3f}  val acc {metrics['val_accuracy']:.1f}%",
            )
            log.info("epoch %d: %s", int(metrics["epoch"]), metrics)
        thread.join()
    ray.kill(queue.actor)  # type: ignore[arg-type]
    if "error" in outcome:
        exc = outcome["error"]
        raise TrainingError(f"training failed: {type(exc).__name__}: {exc}") from None
    result = outcome["result"]
    if getattr(result, "error", None) is not None or result.checkpoint is None:
        raise TrainingError(f"training produced no checkpoint: {getattr(result, 'error', None)}")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / _WEIGHTS, weights_only=True)
    recipe.model.load_state_dict(state)
    recipe.model.eval()
    return TrainResult(recipe=recipe, entry_point=entry_point, history=history)
