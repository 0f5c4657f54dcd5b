"""Inter-class edits with soft labels (Diff-Mix, Wang et al., CVPR 2024).

``DiffusionAugment(..., target="other-class")`` makes variant ``v`` of a class-``i`` image with class ``j``'s
prompt (``j != i``, drawn per variant from a stable hash, like the variant's strength and seed) at the
variant's strength ``s``, and labels the result softly, as ``torchvision.transforms.v2.MixUp`` returns its
labels::

    y = (1 - s ** gamma) * one_hot(i) + s ** gamma * one_hot(j)        # gamma = 0.8, Diff-Mix's README

A sample that keeps its real image (probability ``1 - p``, a cache miss with ``on_miss="real"``, a variant
that came out black) gets ``one_hot(i)``, so every sample of a batch has the same label type: a float
vector of ``num_classes`` entries that sums to 1, which ``default_collate`` stacks into ``(B, num_classes)``
and ``nn.functional.cross_entropy`` takes as class probabilities.

What is cached: the pixels, under a key whose generation fingerprint holds the target mode. ``j`` and ``s``
are functions of the variant's plan (``seed``, image digest, label, ``v``), so a reader of the cache (a
DataLoader worker with ``on_miss="real"``, another machine) recomputes them exactly and the cache holds
no second copy that could disagree; ``gamma`` changes only the label, not the pixels, and is not in the key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .hashing import stable_hash

__all__ = ["OtherClass", "TARGETS", "check_target", "mix_labels", "one_hot", "target_class", "soft_labels_like"]

#: The values ``DiffusionAugment(target=...)`` takes as strings.
TARGETS = ("same-class", "other-class")


@dataclass(frozen=True)
class OtherClass:
    """Diff-Mix's inter-class target: variants of class ``i`` drawn with another class's prompt.

    Args:
        label_gamma: the exponent ``g`` of the soft label ``(1 - s^g) e_i + s^g e_j`` (Diff-Mix's README uses
            0.8); larger values give the target class less weight at the same strength.

    Example:
        >>> aug = DiffusionAugment("pocket", tokens=tokens, target=OtherClass(label_gamma=0.5))  # doctest: +SKIP
    """

    label_gamma: float = 0.8

    def __post_init__(self) -> None:
        g = self.label_gamma
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not math.isfinite(float(g)) or float(g) <= 0:
            raise ValueError(f"label_gamma must be a finite number > 0, got {g!r}")
        object.__setattr__(self, "label_gamma", float(g))

    def fingerprint(self) -> tuple[str, str]:
        """What of the target decides the pixels (the mode; ``label_gamma`` decides only the label)."""
        return ("target", "other-class")


def check_target(target: Any, class_names: Sequence[str] | None) -> OtherClass | None:
    """``target`` as the transform holds it: ``None`` for ``"same-class"``, an :class:`OtherClass` otherwise.

    Raises:
        TypeError: ``target`` is neither one of :data:`TARGETS` nor an :class:`OtherClass`.
        ValueError: an unknown string, or an inter-class target without at least two classes.
    """
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)} or an OtherClass, got {target!r}")
        target = None if target == "same-class" else OtherClass()
    elif not isinstance(target, OtherClass):
        raise TypeError(f"target must be one of {list(TARGETS)} or an OtherClass, got {type(target).__name__}")
    if target is not None and (class_names is None or len(class_names) < 2):
        found = "no class names" if class_names is None else f"{len(class_names)} class ({list(class_names)})"
        raise ValueError(f"target='other-class' edits an image towards another class and needs at least 2 classes "
                         f"(class_names or tokens), got {found}")
    return target


def target_class(seed: int, digest: str, label: int, v: int, num_classes: int) -> int:
    """Variant ``v``'s target class: uniform over the classes other than ``label``, from a stable hash."""
    r = stable_hash(seed, digest, label, v, "target") % (num_classes - 1)
    return r if r < label else r + 1


def one_hot(label: int, num_classes: int) -> torch.Tensor:
    """``float32`` one-hot vector of ``label``."""
    out = torch.zeros(num_classes, dtype=torch.float32)
    out[label] = 1.0
    return out


def mix_labels(label: int, target: int, strength: float, num_classes: int, gamma: float = 0.8) -> torch.Tensor:
    """Diff-Mix's soft label ``(1 - s^g) one_hot(label) + s^g one_hot(target)`` as a ``float32`` vector.

    Raises:
        ValueError: a class outside ``[0, num_classes)`` or a strength outside ``[0, 1]``.
    """
    for name, c in (("label", label), ("target", target)):
        if not 0 <= c < num_classes:
            raise ValueError(f"{name} must be in [0, {num_classes}), got {c}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    w = float(strength) ** float(gamma)
    out = torch.zeros(num_classes, dtype=torch.float32)
    out[label] += 1.0 - w
    out[target] += w
    return out


def soft_labels_like(labels: Any, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """The soft labels that replace a sample's label leaf: one row per picture, shaped as the leaf was.

    An unbatched label (an int, a class name, a 0-d tensor or array) becomes a ``(num_classes,)`` vector, a
    batch's ``(B,)`` labels a ``(B, num_classes)`` tensor, on the label tensor's device.
    """
    out = torch.stack(list(rows))
    batched = isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim >= 1
    if isinstance(labels, torch.Tensor):
        out = out.to(labels.device)
    return out.reshape(*labels.shape, -1) if batched else out[0]
