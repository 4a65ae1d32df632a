"""The built-in ``digits-cnn`` recipe: a small CNN on scikit-learn's bundled 8x8 digits.

The split (60% train, 20% validation, 20% holdout, stratified) and the initial weights
are fixed by ``SEED``. The CNN is wide enough that int8 kernels pay off on a CPU (a
narrower one is too small for quantization to beat fp32 at batch 1).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._recipes import Recipe

__all__ = ["DigitsCNN", "digits_cnn", "digits_data"]

SEED = 0
WIDTH = 64
HIDDEN = 256
BATCH_SIZE = 64


class DigitsCNN(nn.Module):
    def __init__(self, width: int = WIDTH, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def digits_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed split: ``train``, ``val`` and ``holdout`` as (images N x 1 x 8 x 8, labels)."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=SEED, stratify=y
    )
    x_val, x_hold, y_val, y_hold = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=SEED, stratify=y_rest
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "holdout": (x_hold, y_hold)}


def _loader(x: np.ndarray, y: np.ndarray, shuffle: bool) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(SEED)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=shuffle, generator=generator)


def digits_cnn() -> Recipe:
    data = digits_data()
    torch.manual_seed(SEED)
    model = DigitsCNN()
    digest = hashlib.sha256()
    for split in ("train", "val", "holdout"):
        digest.update(data[split][0].tobytes())
        digest.update(data[split][1].tobytes())
    x_hold, y_hold = data["holdout"]
    return Recipe(
        model=model,
        train_loader=_loader(*data["train"], shuffle=True),
        val_loader=_loader(*data["val"], shuffle=False),
        example_input=torch.from_numpy(x_hold[:2].copy()),
        holdout_inputs=x_hold,
        holdout_labels=y_hold,
        labels=[str(i) for i in range(10)],
        learning_rate=2e-3,
        config={
            "dataset": "sklearn.load_digits",
            "width": WIDTH,
            "hidden": HIDDEN,
            "batch_size": BATCH_SIZE,
            "seed": SEED,
            "split": "60/20/20 stratified",
        },
        data_hash=digest.hexdigest(),
    )
