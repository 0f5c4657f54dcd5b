"""Datasets around the transform: ``AugmentedDataset``, folder readers, few-shot splits, and how the library
reads any labelled image data it is given (a folder, a list of pairs, a map-style dataset)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._checks import check_int
from ._images import image_array
from ._samples import check_class_names, default_labels_getter, image_leaf_indices, label_index
from .hashing import image_digest, stable_digest

__all__ = [
    "AugmentedDataset",
    "ImageList",
    "image_folder",
    "few_shot_indices",
    "as_dataset",
    "class_names_of",
    "source_of",
    "LabelledImages",
    "read_labelled_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class AugmentedDataset:
    """Wrap a map-style dataset of ``(image, label)`` so each item passes through ``augment``.

    ``torchvision.datasets.ImageFolder(transform=...)`` hands the transform the image alone; this wrapper
    hands it the whole ``(image, label)`` sample, which is what :class:`~dafusion_aug.DiffusionAugment`
    needs to build the class's prompt.

    Args:
        dataset: any map-style dataset (``__len__`` and ``__getitem__``).
        augment: a callable taking and returning a sample, e.g. a ``v2.Compose`` holding ``DiffusionAugment``.
        transform: optional callable applied to the image after ``augment`` (e.g. ``ToTensor`` / normalize):
            the first element of a tuple or list sample, the image of a dict sample (found as the transform
            finds it: its first PIL image or ``tv_tensors.Image``, else its first 3-D/4-D tensor that is not
            the label), or the sample itself when it is not a container. The sample keeps its type.

    Raises:
        TypeError: ``dataset`` is not map-style or ``augment`` is not callable; when reading, a dict sample
            in which ``transform`` finds no image.

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
        return sample if self.transform is None else self._transform_image(sample)

    def _transform_image(self, sample: Any) -> Any:
        """``sample`` with ``transform`` applied to its image (see the class docstring)."""
        if isinstance(sample, (tuple, list)) and sample:
            out = [self.transform(sample[0]), *sample[1:]]
            return type(sample)(out) if type(sample) in (tuple, list) else type(sample)(*out)  # namedtuples too
        if isinstance(sample, Mapping):  # before, unpacking a dict gave its keys and the sample was lost
            flat, spec = tree_flatten(sample)
            where = image_leaf_indices(flat, default_labels_getter(sample))
            if not where:
                raise TypeError(f"transform needs an image in the sample, but the dict sample with keys {list(sample)} has none")
            flat[where[0]] = self.transform(flat[where[0]])
            return tree_unflatten(flat, spec)
        return self.transform(sample)


class ImageList:
    """A map-style dataset over ``(path or PIL image, label)`` pairs; files are opened lazily as RGB.

    With ``masks`` (one mask file per item, e.g. from :func:`image_folder`'s ``masks=``), items are
    ``(image, tv_tensors.Mask, label)``: a mask file's non-zero pixels are the object (for region edits).

    A file that cannot be decoded raises an ``OSError`` that names it.
    """

    def __init__(self, items: Sequence[tuple[Any, int]], class_names: Sequence[str] | None = None,
                 masks: Sequence[str | os.PathLike] | None = None) -> None:
        self.items = list(items)
        self.class_names = check_class_names(class_names) if class_names is not None else None
        self.targets = [int(label) for _, label in self.items]
        if masks is not None and len(masks) != len(self.items):
            raise ValueError(f"masks must have one file per item ({len(self.items)}), got {len(masks)}")
        self.masks = None if masks is None else list(masks)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        src, label = self.items[index]
        image = src if isinstance(src, Image.Image) else _read(src, "RGB", "image")
        if self.masks is None:
            return image, int(label)
        from torchvision import tv_tensors

        mask = np.asarray(_read(self.masks[index], "L", "mask")) > 0
        return image, tv_tensors.Mask(torch.from_numpy(mask)), int(label)


#: Folder names that are data splits, not classes: ``my_data`` given for ``my_data/train``.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval"})


def _read(src: str | os.PathLike, mode: str, what: str) -> Image.Image:
    try:
        with Image.open(src) as im:
            return im.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read {what} {os.fspath(src)!r}: {e}") from e


def image_folder(root: str | os.PathLike, masks: str | os.PathLike | None = None) -> ImageList:
    """Read a folder with one sub-folder per class (sorted names = labels), like ``ImageFolder``.

    Args:
        root: the folder; each sub-folder is a class and holds its images (at any depth).
        masks: a folder of object masks laid out like ``root``: the mask of ``root/cat/a.jpg`` is
            ``masks/cat/a.png`` (any image extension, same stem); items are then ``(image, Mask, label)``.

    Returns:
        An :class:`ImageList` of ``(path, label)`` with ``class_names``.

    Raises:
        FileNotFoundError: ``root`` (or ``masks``) is missing, or an image has no mask file (the first is named).
        NotADirectoryError: ``root`` is a file.
        ValueError: ``root`` has no sub-folder.

    Warns:
        UserWarning: one class only, or classes named like data splits (``train``, ``val``, ...): usually
            the parent of the class folders was given; the message names the sub-folders found.

    Example:
        >>> data = image_folder("my_data/train")  # doctest: +SKIP
        >>> data.class_names  # doctest: +SKIP
        ['cat', 'dog']
    """
    root = Path(root)
    if root.is_file():
        raise NotADirectoryError(f"data must be a folder with one sub-folder of images per class, but {str(root)!r} is a file")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {str(root)!r}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {str(root)!r} has no class sub-folders")
    _warn_if_not_classes(root, classes)
    items = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, label))
    return ImageList(items, classes, masks=None if masks is None else _mask_files(root, Path(masks), [f for f, _ in items]))


def _mask_files(root: Path, masks: Path, images: list[Path]) -> list[Path]:
    if not masks.is_dir():
        raise FileNotFoundError(f"masks folder not found: {str(masks)!r}")
    out = []
    for f in images:
        rel = f.relative_to(root)
        found = [m for m in sorted((masks / rel.parent).glob(rel.stem + ".*")) if m.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise FileNotFoundError(f"no mask for image {str(f)!r} in {str(masks / rel.parent)!r} (expected {rel.stem}.png)")
        out.append(found[0])
    return out


def _warn_if_not_classes(root: Path, classes: list[str]) -> None:
    """Warn when ``root``'s sub-folders look like splits or a single folder, not classes (see :func:`image_folder`)."""
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if len(classes) > 1 and not splits:
        return
    inner = sorted(d.name for d in (root / classes[0]).iterdir() if d.is_dir() and not d.name.startswith("."))
    hint = (f"; {str(root / classes[0])!r} has the sub-folders {inner[:10]}: if those are the classes, pass that folder"
            if inner else "")
    if len(classes) > 1:
        warnings.warn(f"data folder {str(root)!r} has the sub-folders {classes}, read as classes, but {splits} are names "
                      f"of data splits: pass the folder of one split (its sub-folders are the classes){hint}", stacklevel=3)
    else:
        warnings.warn(f"data folder {str(root)!r} has one sub-folder, {classes[0]!r}, so every image is of one class "
                      f"{classes[0]!r}{hint}", stacklevel=3)


def few_shot_indices(targets: Sequence[int], k: int, seed: int, num_classes: int | None = None) -> list[int]:
    """Draw ``k`` indices per class (without replacement), reproducibly from ``seed``.

    Args:
        targets: the label of every item.
        k: images per class (an int of any type, numpy's included).
        seed: the draw's seed.
        num_classes: draw from classes ``0 .. num_classes - 1``; default the labels present.

    Returns:
        The drawn indices, sorted within each class, classes in order.

    Raises:
        TypeError: ``k``, ``seed`` or ``num_classes`` is not an int (``k=1.5``).
        ValueError: ``k < 1``, or a class has fewer than ``k`` examples.
    """
    for name, value in (("k", k), ("seed", seed), ("num_classes", num_classes)):
        if value is not None:
            check_int(value, name)
    targets = np.asarray(list(targets))
    k = int(k)
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


def as_dataset(data: Any) -> Any:
    """A map-style dataset of ``(image, label)`` from a folder path, a list of pairs, or a dataset.

    Args:
        data: a folder with one sub-folder per class (read with :func:`image_folder`), a list or tuple of
            ``(path or PIL image, label)`` pairs (returned as a list; labels may be ints or class names),
            or anything with ``__getitem__`` and ``__len__`` (returned as it is).

    Raises:
        TypeError: a list item that is not a pair, or another type of ``data``.
    """
    if isinstance(data, (str, os.PathLike)):
        return image_folder(data)
    if isinstance(data, (list, tuple)):
        for i, item in enumerate(data):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise TypeError(f"data[{i}] must be a (path or PIL image, label) pair, got {item!r}"[:300])
        return list(data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return data
    raise TypeError(
        "data must be a folder path, a list of (path or PIL image, label) pairs, or a map-style dataset of "
        f"(image, label), got {type(data).__name__}"
    )


def class_names_of(dataset: Any) -> list[str] | None:
    """A dataset's class names (index = label): its ``.class_names`` or torchvision's ``.classes``, else ``None``."""
    names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    return list(names) if names is not None else None


def source_of(dataset: Any, index: int) -> str | None:
    """The file item ``index`` of a dataset comes from (``ImageList``, ``ImageFolder``, a list of pairs), or ``None``."""
    items = dataset if isinstance(dataset, list) else getattr(dataset, "items", None) or getattr(dataset, "samples", None)
    try:
        src = items[index][0] if items is not None else None
    except (IndexError, TypeError, KeyError):
        src = None
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else None


class LabelledImages:
    """What :func:`read_labelled_images` kept: labels, class names and a digest of every image's pixels and label."""

    def __init__(self, labels: list[int], class_names: list[str], digest: str) -> None:
        self.labels = labels
        self.class_names = class_names
        self.digest = digest


def read_labelled_images(ds: Any, names: list[str], consume: Callable[[np.ndarray], None], *,
                         error: type[ValueError] = ValueError) -> LabelledImages:
    """Decode every image of a dataset of ``(image, label)`` once, in order, handing each to ``consume``.

    Labels are checked against ``names`` on the way, and every class must have an image. Only labels and
    digests are kept, so memory does not grow with the images' size.

    Args:
        ds: a map-style dataset (see :func:`as_dataset`).
        names: the class names, index = label.
        consume: called with each image as an RGB uint8 ``(H, W, 3)`` array.
        error: the exception for bad data (a ``ValueError`` subclass such as ``FitError``).

    Returns:
        :class:`LabelledImages`.

    Raises:
        TypeError: an item that is not an ``(image, label)`` sample, or an image or label of the wrong type.
        ValueError: ``error``, for an unreadable image (its file named), a label outside ``names``, or a class
            without images.
    """
    labels: list[int] = []
    digests: list[str] = []
    for i in range(len(ds)):
        src = source_of(ds, i)
        where = repr(src) if src is not None else f"data[{i}]"
        try:
            sample = ds[i]
            if not isinstance(sample, (tuple, list)) or len(sample) < 2:
                raise TypeError(f"{where} must be an (image, label) sample, got {type(sample).__name__}")
            arr = image_array(sample[0], where)
        except (TypeError, error):
            raise
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, ...: name the file in any case
            raise error(f"cannot read the training image {where}: {e}") from e
        labels.append(label_index(sample[1], names, f"the label of {where}", error=error))
        digests.append(image_digest(arr))
        consume(arr)
    counts = np.bincount(np.asarray(labels), minlength=len(names))
    empty = [f"{names[k]!r} (label {k})" for k in range(len(names)) if counts[k] == 0]
    if empty:
        raise error(f"class {', '.join(empty)} has no images in data; every class in class_names needs at least one")
    return LabelledImages(labels, names, stable_digest("fit-data", names, list(zip(digests, labels))))
