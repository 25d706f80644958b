"""Data that ships with a package: scikit-learn's handwritten digits (no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def digits(classes: tuple[int, ...] = tuple(range(10)), size: int = 32) -> tuple[Tensor, Tensor]:
    """The 1797 8x8 digit images of scikit-learn for the given classes, upsampled.

    Returns images (N, 1, size, size) in [0, 1] (bilinear upsampling of the 0..16 grey levels)
    and labels (N,) renumbered 0..len(classes)-1 in the order ``classes`` lists them.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target)
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    return images, remap[labels]


def split(images: Tensor, labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A seeded random train/test split: (train_x, train_y, test_x, test_y)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]
