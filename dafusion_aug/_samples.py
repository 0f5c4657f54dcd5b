"""What a sample is: where its images are, where its label is, and what a label means.

One place for the rules that :class:`~dafusion_aug.DiffusionAugment`, :func:`~dafusion_aug.precompute` and
:func:`~dafusion_aug.fit_tokens` share, so that a sample the transform augments is one precompute can fill
and a label means the same class everywhere:

- the label is found like ``v2.MixUp``'s ``labels_getter`` (second element of a tuple, a dict's
  ``"labels"``/``"label"`` key, or a callable);
- the images are the PIL images and ``tv_tensors.Image`` leaves of the sample, or, when it holds none, its
  first plain 3-D or 4-D tensor that is not the label (torchvision's rule);
- a label is ``None``, an int class index or a class name (ints of any type, one-element tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from ._images import is_image_leaf

__all__ = [
    "LabelsGetter",
    "default_labels_getter",
    "check_labels_getter",
    "check_class_names",
    "label_index",
    "labels_per_sample",
    "image_leaf_indices",
    "check_no_image",
    "first_image",
]

LabelsGetter = Callable[[Any], Any]


def default_labels_getter(sample: Any) -> Any:
    """torchvision's contract: ``(image, label, ...)`` sequences, or a dict's ``"labels"``/``"label"`` key."""
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[1]
    if isinstance(sample, Mapping):
        for key in sample:
            if isinstance(key, str) and key.lower() in ("labels", "label"):
                return sample[key]
    return None


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


def labels_per_sample(labels: Any, n: int, class_names: Sequence[str] | None) -> list[int | None]:
    """One class index (or ``None``) for each of the ``n`` pictures of a sample.

    Raises:
        ValueError: the number of labels does not match ``n``, or a label is invalid (see :func:`label_index`).
    """
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        labels = [labels.item()] if int(np.prod(labels.shape)) == 1 else labels.tolist()
    if n == 1:
        if isinstance(labels, (list, tuple)):
            if len(labels) != 1:
                raise ValueError(f"one image needs one label, got {labels!r}")
            labels = labels[0]
        return [label_index(labels, class_names)]
    if labels is None:
        return [None] * n
    if not isinstance(labels, (list, tuple)) or len(labels) != n:
        raise ValueError(f"a batch of {n} images needs {n} labels, got {labels!r}")
    return [label_index(x, class_names, f"label[{i}]") for i, x in enumerate(labels)]


def image_leaf_indices(flat: list[Any], labels: Any) -> list[int]:
    """Positions of the images among a flattened sample's leaves (torchvision's rule, see the module)."""
    idx = [i for i, x in enumerate(flat) if is_image_leaf(x)]
    if idx:
        return idx
    for i, x in enumerate(flat):
        if type(x) is torch.Tensor and x is not labels and x.ndim in (3, 4):
            return [i]
    return []


def check_no_image(flat: list[Any], labels: Any) -> None:
    """Refuse an array that looks like a picture but is no image leaf: it would silently never be augmented.

    Raises:
        ValueError: a plain tensor with two or more dimensions (its shape named).
        TypeError: a numpy array with two or more dimensions (its shape named, and how to convert it).
    """
    for x in flat:
        if x is labels:
            continue
        if type(x) is torch.Tensor and x.ndim >= 2:
            raise ValueError(f"image must be a PIL image, a tv_tensors.Image or a (C, H, W) / (B, C, H, W) tensor, "
                             f"got a tensor of shape {tuple(x.shape)}")
        if isinstance(x, np.ndarray) and x.ndim >= 2:
            raise TypeError(f"image must be a PIL image, a tv_tensors.Image or a (C, H, W) / (B, C, H, W) tensor, got a "
                            f"numpy array of shape {x.shape}; use Image.fromarray(a) or torch.from_numpy(a).permute(2, 0, 1)")


def first_image(sample: Any, labels_getter: LabelsGetter | None) -> tuple[Any, Any]:
    """The first image of ``sample`` and its labels, found as the transform finds them.

    Raises:
        ValueError, TypeError: the sample holds no image (an array that is no image leaf is named).
    """
    labels = labels_getter(sample) if labels_getter is not None else None
    flat, _ = tree_flatten(sample)
    idx = image_leaf_indices(flat, labels)
    if not idx:
        check_no_image(flat, labels)
        raise ValueError(f"dataset items must hold an image (PIL or tensor), got {type(sample).__name__}")
    return flat[idx[0]], labels
