"""What a sample is: where its images are, where its label is, and what a label means.

One place for the rules that :class:`~dafusion_aug.DiffusionAugment`, :func:`~dafusion_aug.precompute` and
:func:`~dafusion_aug.fit_tokens` share, so that a sample the transform augments is one precompute can fill
and a label means the same class everywhere:

- the label is found by torchvision's default ``labels_getter`` (``_find_labels_default_heuristic`` of
  ``v2.MixUp``, ``v2.CutMix`` and ``v2.SanitizeBoundingBoxes``): a dict's label-like key (``"labels"`` in
  any case, else the first key containing ``label``), or, in a tuple or list, item ``[1]``: a tensor is the
  label, a target dict (``(image, {"boxes": ..., "labels": ...})``) gives its label-like key. Where
  torchvision finds no label and raises, there is none (``None``), with two additions: a bare class at
  item ``[1]`` (an int or a class name, what a ``Dataset`` returns before batching) is the label, and the
  ``Mask`` / ``BoundingBoxes`` / ``KeyPoints`` right after the image are skipped (``(image, Mask, label)``).
  Another image, a video or a PIL image at item ``[1]`` means no label: nothing further down is guessed;
- the images are the PIL images and ``tv_tensors.Image`` leaves of the sample, or, when it holds none, its
  first plain tensor of three or more dimensions that is not the label (torchvision's rule); every leading
  dimension of a tensor is a batch dimension, and picture ``j`` of every image leaf is sample ``j``;
- an image's object mask is the union of the sample's ``tv_tensors.Mask`` leaves, or, when it has none,
  of its ``BoundingBoxes`` (a box mask) (:func:`object_masks`; used by region edits);
- a label is ``None``, an int class index or a class name (ints of any type, one-element tensors); an
  image with several labels (a detection target's object labels) has a tuple of class indices, which only
  prompts that do not need the image's class accept (:func:`check_one_class`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors

from ._images import is_image_leaf, picture_count
from .regions import boxes_mask, mask_pictures

__all__ = [
    "Label",
    "LabelsGetter",
    "default_labels_getter",
    "check_labels_getter",
    "check_class_names",
    "label_index",
    "labels_per_sample",
    "check_one_class",
    "image_leaf_indices",
    "check_no_image",
    "first_image",
    "object_masks",
]

LabelsGetter = Callable[[Any], Any]
#: What one picture's label becomes: a class index, ``None`` (no label), or the class indices of an image
#: with several labels (a detection target's objects).
Label = int | tuple[int, ...] | None


def _label_key(mapping: Mapping) -> Any:
    """torchvision's label-like key: ``"labels"`` (any case), else the first key containing ``label`` (any
    case); ``None`` when there is none."""
    keys = [k for k in mapping if isinstance(k, str)]
    return next((k for k in keys if k.lower() == "labels"), next((k for k in keys if "label" in k.lower()), None))


#: What a segmentation or detection sample puts between the image and its label: skipped at item [1].
_ANNOTATIONS = tuple(getattr(tv_tensors, name) for name in ("Mask", "BoundingBoxes", "KeyPoints") if hasattr(tv_tensors, name))


def default_labels_getter(sample: Any) -> Any:
    """The labels of a sample, found the way torchvision's default ``labels_getter`` finds them.

    Args:
        sample: a dict (its label-like key), or a tuple or list whose first item is the image: item ``[1]``
            is the label (a tensor, an int, a class name), or, when it is a dict (a detection target), that
            dict's label-like key. ``Mask``, ``BoundingBoxes`` and ``KeyPoints`` right after the image are
            skipped, so ``(image, Mask, label)`` works too.

    Returns:
        The labels as found (not yet checked), or ``None`` where torchvision finds none: no label-like key,
        or another image, a video or a PIL image at item ``[1]`` (torchvision's big sample as a list).

    Example:
        >>> default_labels_getter((image, {"boxes": boxes, "labels": labels})) is labels  # doctest: +SKIP
        True
    """
    if isinstance(sample, Mapping):
        key = _label_key(sample)
        return sample[key] if key is not None else None
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        return None
    item = next((x for x in sample[1:] if not isinstance(x, _ANNOTATIONS)), None)
    if isinstance(item, Mapping):
        key = _label_key(item)
        return item[key] if key is not None else None
    # another image or a video: torchvision finds no label either, and nothing further down is guessed
    return None if isinstance(item, (Image.Image, tv_tensors.TVTensor)) else item


def check_labels_getter(labels_getter: str | LabelsGetter | None) -> LabelsGetter | None:
    """``"default"`` -> :func:`default_labels_getter`; a callable or ``None`` as given.

    Raises:
        ValueError: anything else.
    """
    if labels_getter == "default":
        return default_labels_getter
    if labels_getter is None or callable(labels_getter):
        return labels_getter
    raise ValueError(f"labels_getter must be 'default', a callable or None, got {labels_getter!r}")


def check_class_names(names: Any, where: str = "class_names", *, error: type[ValueError] = ValueError) -> list[str]:
    """Class names as a list, index = label: a non-empty sequence of distinct, non-empty str.

    Args:
        names: what the user passed.
        where: how messages name the argument.
        error: the exception for empty, blank or repeated names (a ``ValueError`` subclass).

    Returns:
        The names as a new list.

    Raises:
        TypeError: a single str (which would be read as one class per character), something without an
            order (a set, a dict) or not iterable, or a name that is not a str.
        ValueError: ``error``, for no names, an empty name, or a name given twice (a label naming it would
            always mean its first index).
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{where} must be a list of class names, got the {type(names).__name__} {names!r}; "
                        f"for one class pass [{names!r}]")
    if isinstance(names, (Mapping, set, frozenset)) or not hasattr(names, "__iter__"):
        raise TypeError(f"{where} must be a list of class names (index = label), got {type(names).__name__}")
    out = list(names)
    if not out:
        raise error(f"{where} must name at least one class, got []")
    bad = [n for n in out if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{where} must hold str class names, got {type(bad[0]).__name__} {bad[0]!r} in {out!r}"[:300])
    if not all(out):
        raise error(f"{where} must hold non-empty class names, got {out!r}"[:300])
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise error(f"{where} must be unique, got {repeated} more than once; a label naming such a class would "
                    "always mean its first index")
    return out


def label_index(label: Any, class_names: Sequence[str] | None, where: str = "label", *,
                error: type[ValueError] = ValueError) -> int | None:
    """The class index a label names: ``None`` stays ``None``; ints of any type and class names become an int.

    Args:
        label: ``None``, an int (Python, numpy or a one-element tensor) or a class name.
        class_names: the classes, index = label; ``None`` when only indices are known.
        where: how messages name the label (``"label[3]"``, ``"the label of 'cat/1.png'"``).
        error: the exception for a value outside the classes (a ``ValueError`` subclass).

    Returns:
        The index, or ``None``.

    Raises:
        TypeError: the label is not an int or a str.
        ValueError: ``error``, for a tensor of several values, an unknown name or an index out of range.
    """
    if label is None:
        return None
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise error(f"{where} must be a single class index, got a tensor of shape {tuple(label.shape)}")
        label = label.item()
    if isinstance(label, np.generic):
        label = label.item()
    if isinstance(label, str):
        if class_names is None or label not in class_names:
            raise error(f"{where} {label!r} is not one of the class names {None if class_names is None else list(class_names)}")
        return list(class_names).index(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise TypeError(f"{where} must be an int class index or a class name, got {type(label).__name__}: {label!r}")
    if class_names is not None and not 0 <= label < len(class_names):
        raise error(f"{where} must be in [0, {len(class_names)}), got {label}")
    if label < 0:
        raise error(f"{where} must be >= 0, got {label}")
    return label


def labels_per_sample(labels: Any, n: int, class_names: Sequence[str] | None) -> list[Label]:
    """One label for each of the ``n`` pictures of a sample (a class index, ``None``, or a tuple of them).

    Args:
        labels: what the labels getter found: ``None``, one label, or a sequence / tensor of labels.
        n: the number of pictures (1 for an unbatched sample).
        class_names: the classes, index = label, or ``None``.

    Returns:
        ``n`` labels. One picture with no label (``None`` or an empty sequence, a detection target without
        objects) gets ``None``; one picture with several (a detection target's ``labels``) gets their tuple.

    Raises:
        ValueError: the number of labels of a batch does not match ``n``, or a label is invalid (see
            :func:`label_index`).
        TypeError: a label is not an int or a class name.
    """
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        labels = labels.item() if labels.ndim == 0 else labels.reshape(-1).tolist()
    if n == 1:
        if isinstance(labels, (list, tuple)):
            if len(labels) > 1:
                return [tuple(label_index(x, class_names, f"label[{i}]") for i, x in enumerate(labels))]
            labels = labels[0] if labels else None
        return [label_index(labels, class_names)]
    if labels is None:
        return [None] * n
    if not isinstance(labels, (list, tuple)) or len(labels) != n:
        found = repr(labels)[:200]
        raise ValueError(f"a batch of {n} images needs {n} labels, got {found}; if that is not the sample's label, pass "
                         "labels_getter=None (no labels) or a callable sample -> labels")
    return [label_index(x, class_names, f"label[{i}]") for i, x in enumerate(labels)]


def check_one_class(labels: Sequence[Label], needs: str) -> None:
    """Refuse an image with several labels when something needs the image's one class.

    Args:
        labels: one label per picture (:func:`labels_per_sample`).
        needs: what needs the class, for the message (``"prompt='a photo of a {name}'"``, ``"class_erasures"``).

    Raises:
        ValueError: a picture has several labels; the message says how to choose the image's class.
    """
    for label in labels:
        if isinstance(label, tuple):
            raise ValueError(
                f"one image needs one label, got {list(label)} (the object labels of a detection target?), and "
                f"{needs} needs the image's class. Choose it with labels_getter= (a callable sample -> the image's "
                "class, e.g. labels_getter=lambda s: s[1]['labels'][0]), or use a prompt callable, which receives "
                "all of an image's labels: prompt=lambda names, labels: ... gets tuples for such an image"
            )


def image_leaf_indices(flat: list[Any], labels: Any) -> list[int]:
    """Positions of the images among a flattened sample's leaves (torchvision's rule, see the module)."""
    idx = [i for i, x in enumerate(flat) if is_image_leaf(x)]
    if idx:
        return idx
    for i, x in enumerate(flat):
        if type(x) is torch.Tensor and x is not labels and x.ndim >= 3:
            return [i]
    return []


def check_no_image(flat: list[Any], labels: Any) -> None:
    """Refuse an array that looks like a picture but is no image leaf: it would silently never be augmented.

    Raises:
        ValueError: a plain tensor with two dimensions (its shape named).
        TypeError: a numpy array with two or more dimensions (its shape named, and how to convert it).
    """
    for x in flat:
        if x is labels:
            continue
        if type(x) is torch.Tensor and x.ndim >= 2:
            raise ValueError(f"image must be a PIL image, a tv_tensors.Image or a (C, H, W) / (..., C, H, W) tensor, "
                             f"got a tensor of shape {tuple(x.shape)}")
        if isinstance(x, np.ndarray) and x.ndim >= 2:
            raise TypeError(f"image must be a PIL image, a tv_tensors.Image or a (C, H, W) / (..., C, H, W) tensor, got a "
                            f"numpy array of shape {x.shape}; use Image.fromarray(a) or torch.from_numpy(a).permute(2, 0, 1)")


def first_image(sample: Any, labels_getter: LabelsGetter | None) -> tuple[Any, Any, int]:
    """The first image of ``sample``, its labels, and the sample's number of pictures, found as the transform
    finds them.

    Returns:
        ``(image, labels, n)``: ``n`` is the largest picture count of the sample's image leaves (the batch
        size); the first image's pictures are samples ``0 .. picture_count(image) - 1``.

    Raises:
        ValueError, TypeError: the sample holds no image (an array that is no image leaf is named).
    """
    labels = labels_getter(sample) if labels_getter is not None else None
    flat, _ = tree_flatten(sample)
    idx = image_leaf_indices(flat, labels)
    if not idx:
        check_no_image(flat, labels)
        raise ValueError(f"dataset items must hold an image (PIL or tensor), got {type(sample).__name__}")
    return flat[idx[0]], labels, max(picture_count(flat[i]) for i in idx)


def _image_size(image: Any) -> tuple[int, int]:
    return (image.height, image.width) if hasattr(image, "height") and not isinstance(image, torch.Tensor) else tuple(image.shape[-2:])


def object_masks(sample: Any, image: Any) -> list[np.ndarray] | None:
    """One bool ``(H, W)`` object mask per picture of ``image``, from the sample's masks or boxes.

    Args:
        sample: the whole sample (any structure); its ``tv_tensors.Mask`` leaves are used (their union), or,
            when it has none, its ``tv_tensors.BoundingBoxes`` leaves (the union of their boxes; for one
            picture only).
        image: the image leaf the masks go with (a PIL image or a ``(..., C, H, W)`` tensor).

    Returns:
        ``picture_count(image)`` masks, or ``None`` when the sample holds neither masks nor boxes.

    Raises:
        ValueError: a mask or boxes of another size than the image, a mask that is not binary, or boxes for a
            batch of images (which pictures they belong to is unknown).
    """
    flat, _ = tree_flatten(sample)
    n, size = picture_count(image), _image_size(image)
    masks = [x for x in flat if isinstance(x, tv_tensors.Mask)]
    if masks:
        per = [mask_pictures(m, n, size, f"mask[{i}]" if len(masks) > 1 else "mask") for i, m in enumerate(masks)]
        return [np.logical_or.reduce([p[j] for p in per]) for j in range(n)]
    boxes = [x for x in flat if isinstance(x, tv_tensors.BoundingBoxes)]
    if not boxes:
        return None
    if n != 1:
        raise ValueError(f"boxes go with one image, got a batch of {n}; pass a (n, H, W) tv_tensors.Mask instead")
    return [np.logical_or.reduce([boxes_mask(b, size) for b in boxes])]
