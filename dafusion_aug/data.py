"""Datasets around the transform: ``AugmentedDataset``, folder readers and few-shot splits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["AugmentedDataset", "ImageList", "image_folder", "few_shot_indices"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class AugmentedDataset:
    """Wrap a map-style dataset of ``(image, label)`` so each item passes through ``augment``.

    ``torchvision.datasets.ImageFolder(transform=...)`` hands the transform the image alone; this wrapper
    hands it the whole ``(image, label)`` sample, which is what :class:`~dafusion_aug.DiffusionAugment`
    needs to build the class's prompt.

    Args:
        dataset: any map-style dataset (``__len__`` and ``__getitem__``).
        augment: a callable taking and returning a sample, e.g. a ``v2.Compose`` holding ``DiffusionAugment``.
        transform: optional callable applied to the image after ``augment`` (e.g. ``ToTensor`` / normalize).

    Example:
        >>> ds = AugmentedDataset(ImageFolder("train/"), aug)  # doctest: +SKIP
        >>> image, label = ds[0]  # doctest: +SKIP
    """

    def __init__(self, dataset: Any, augment: Any, transform: Any = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be map-style (__getitem__ and __len__), got {type(dataset).__name__}")
        if not callable(augment):
            raise TypeError(f"augment must be callable, got {type(augment).__name__}")
        self.dataset = dataset
        self.augment = augment
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample = self.augment(self.dataset[index])
        if self.transform is not None:
            image, *rest = sample
            sample = (self.transform(image), *rest)
        return sample


class ImageList:
    """A map-style dataset over ``(path or PIL image, label)`` pairs; files are opened lazily as RGB.

    A file that cannot be decoded raises an ``OSError`` that names it.
    """

    def __init__(self, items: Sequence[tuple[Any, int]], class_names: Sequence[str] | None = None) -> None:
        self.items = list(items)
        self.class_names = list(class_names) if class_names is not None else None
        self.targets = [int(label) for _, label in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        src, label = self.items[index]
        if isinstance(src, Image.Image):
            return src, int(label)
        try:
            with Image.open(src) as im:
                return im.convert("RGB"), int(label)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise OSError(f"cannot read image {os.fspath(src)!r}: {e}") from e


def image_folder(root: str | os.PathLike) -> ImageList:
    """Read a folder with one sub-folder per class (sorted names = labels), like ``ImageFolder``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {str(root)!r}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {str(root)!r} has no class sub-folders")
    items = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, label))
    return ImageList(items, classes)


def few_shot_indices(targets: Sequence[int], k: int, seed: int, num_classes: int | None = None) -> list[int]:
    """Draw ``k`` indices per class (without replacement), reproducibly from ``seed``.

    Raises:
        ValueError: a class has fewer than ``k`` examples.
    """
    targets = np.asarray(list(targets))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    classes = range(num_classes) if num_classes is not None else sorted(set(targets.tolist()))
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in classes:
        pool = np.flatnonzero(targets == c)
        if len(pool) < k:
            raise ValueError(f"class {c} has {len(pool)} examples, fewer than k={k}")
        out.extend(sorted(rng.choice(pool, size=k, replace=False).tolist()))
    return out
