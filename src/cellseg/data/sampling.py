"""Which training images an epoch visits: uniformly, or with rare classes repeated (LVIS' repeat factors).

A rare class (CoNSeP's "other": 2% of nuclei, in 22% of tiles) gives the box classifier few examples, and its AP
stays near zero. Repeat-factor sampling (Gupta et al., LVIS, 2019) draws an image more often when it holds a
rare class: with ``f_c`` the fraction of training images holding class ``c`` and a threshold ``t``, class ``c``
has ``r_c = max(1, sqrt(t / f_c))`` and an image has the largest ``r_c`` of its classes. Here an epoch keeps its
length (``len(dataset)`` draws, with replacement, in proportion to ``r``), so a run's time stays the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from cellseg.data.io import DataFormatError, load_npz


def classes_present(files: list[Path], num_classes: int) -> np.ndarray:
    """``(n_images, num_classes)`` bool: which classes each prepared sample holds (a sample prepared with
    another number of classes is an error)."""
    present = np.zeros((len(files), num_classes), bool)
    for i, path in enumerate(files):
        labels = load_npz(path)["labels"]
        check_label_rows(path, labels, num_classes)
        present[i] = labels.reshape(len(labels), -1).any(axis=1)
    return present


def check_label_rows(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """A prepared sample's labels must have one row per class: prepared with other ``classes``, it is stale."""
    if labels.ndim != 3 or labels.shape[0] != num_classes:
        raise DataFormatError(
            f"{path}: labels of shape {labels.shape}, but the model learns {num_classes} classes (`classes`); "
            "rerun the prepare stage with the same `classes`"
        )


def repeat_factors(present: np.ndarray, threshold: float) -> np.ndarray:
    """Each image's repeat factor ``max(1, max over its classes of sqrt(threshold / f_c))``."""
    frequency = present.mean(axis=0)
    per_class = np.maximum(1.0, np.sqrt(threshold / np.maximum(frequency, 1e-12)))
    return np.where(present, per_class, 1.0).max(axis=1, initial=1.0)


class RepeatFactorSampler(Sampler[int]):
    """``len(weights)`` draws per epoch in proportion to ``weights``, split between ranks; a function of
    ``(seed, epoch)`` alone, so a resumed run sees the same images."""

    def __init__(self, weights: np.ndarray, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.world_size, self.rank, self.seed, self.epoch = world_size, rank, seed, 0
        self.per_rank = -(-len(self.weights) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draws = torch.multinomial(
            self.weights, self.per_rank * self.world_size, replacement=True, generator=generator
        )
        return iter(draws[self.rank :: self.world_size].tolist())
