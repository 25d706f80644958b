"""Data: scikit-learn's handwritten digits (ship with a package, no download) and ImageFolder
directories, checked so that a bad file or a one-class folder is an error naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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


def image_folder(path: str | Path, size: int, check: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """An ImageFolder directory (one sub-directory per class, named by it) as tensors.

    Returns images (N, C, size, size) in [0, 1] (resized, ``ToTensor``), labels (N,) in
    0..K-1 following the sorted class names, and the K class names. Raises ValueError naming
    the directory when it is missing, has fewer than two classes (a one-class classifier is
    always right and learns nothing) or holds no images, and naming the file when an image
    cannot be decoded or is a decompression bomb (more pixels than PIL's ``MAX_IMAGE_PIXELS``
    allows). ``check(number of images)`` runs before any image is decoded (a size check).
    """
    from PIL import Image
    from torchvision import datasets, transforms

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"data '{path}' is a file, not a directory; give 'digits' or an ImageFolder directory (one sub-directory of images per class)")
    if not path.is_dir():
        raise ValueError(f"data directory '{path}' does not exist (use 'digits' or an ImageFolder directory)")
    try:
        folder = datasets.ImageFolder(str(path), transform=transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()]))
    except FileNotFoundError as error:  # no class sub-directory, or a class without images
        raise ValueError(f"data directory '{path}': {error}") from None
    if len(folder.classes) < 2:
        raise ValueError(
            f"data directory '{path}' has {len(folder.classes)} class ({', '.join(folder.classes)}); "
            "a classifier needs at least two class sub-directories"
        )
    if len(folder) == 0:
        raise ValueError(f"data directory '{path}' holds no images")
    if check is not None:
        check(len(folder))
    images = []
    for i, (file, _) in enumerate(folder.samples):
        try:
            images.append(folder[i][0])
        except Image.DecompressionBombError as error:
            raise ValueError(f"image file '{file}' refused: {error}") from None
        except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated files
            raise ValueError(f"image file '{file}' cannot be read ({type(error).__name__}: {error})") from None
    return torch.stack(images), torch.tensor(folder.targets), list(folder.classes)
