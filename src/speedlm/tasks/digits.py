"""Handwritten digits (scikit-learn's bundled copy of the UCI optical digits test set: 1,797
8x8 images of 16 grey levels, ten classes; no download). Each image is cut into 2x2 patches in
raster order: 16 tokens of 4 features, grey levels scaled to [0, 1] (a ViT on a very small
image). 20% of the images, chosen by a seeded permutation, are the test set."""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError
from speedlm.tasks.base import TaskData, split

PATCH = 2


def patches(images: torch.Tensor, size: int = PATCH) -> torch.Tensor:
    """(N, H, W) -> (N, (H / size) * (W / size), size * size): non-overlapping patches in raster
    order, each flattened row by row."""
    n, h, w = images.shape
    x = images.view(n, h // size, size, w // size, size).permute(0, 1, 3, 2, 4)
    return x.reshape(n, (h // size) * (w // size), size * size)


def load_digits_task(seed: int = 0, test_fraction: float = 0.2, **_) -> TaskData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SpeedlmError("the digits task needs scikit-learn (its bundled digits): pip install 'speedlm[tasks]'") from None
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(d.target, dtype=torch.long)
    x = patches(images)
    train, test = split(len(labels), test_fraction, seed)
    return TaskData("digits", "8x8 handwritten digits as 16 patches of 2x2 (scikit-learn's copy of UCI optdigits)",
                    x[train], labels[train], x[test], labels[test], 10)
