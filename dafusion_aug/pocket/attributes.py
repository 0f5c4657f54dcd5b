"""Visible attributes of a digit picture, measured on its pixels, and the words that name them.

The pocket model v2 is trained on captions that describe what is visible, so that its text encoder and
UNet know words shared by all digits ("bold", "right-leaning", "with a loop"), the way Stable Diffusion
knows thousands of visual words beside its class names. Erasing "six" then leaves "loop", "bold" and
"tall" intact for a learned token to compose.

Every attribute is a deterministic function of a grey 32x32 picture (white ink on black, values in
[0, 1]); ``measure`` computes all of them for a batch. Ink is every pixel above :data:`INK_THRESHOLD`.

======== =========================================================== ==================================
name     measurement                                                 words (low / middle / high)
======== =========================================================== ==================================
weight   stroke thickness ``2 * ink area / ink boundary length``     thin / regular / bold
slant    shear of the ink from its second moments, ``-cov(x, y) /    left-leaning / upright /
         var(y)`` (y grows downwards, so "/" is positive)            right-leaning
width    width of the ink's bounding box, in pixels                  narrow / - / wide
balance  height of the ink's centre of mass (intensity-weighted),     top-heavy / - / bottom-heavy
         in pixels from the top
loop     closed loops: background regions not reachable from the     open / with a loop /
         border through 4-connected background                       with two loops
======== =========================================================== ==================================

The thresholds between low, middle and high are the terciles of part A (:data:`THRESHOLDS`, measured by
``python -m dafusion_aug.pocket.attributes`` and written here), global over all digits: a "thin" one and
a "thin" eight have strokes of the same thickness. The loop count is exact, not a tercile.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "INK_THRESHOLD",
    "ATTRIBUTES",
    "WORDS",
    "THRESHOLDS",
    "measure",
    "levels",
    "describe",
    "attribute_words",
]

#: A pixel is ink when its grey value is above this.
INK_THRESHOLD = 0.35

#: Attribute names, in the order captions list them.
ATTRIBUTES: tuple[str, ...] = ("weight", "slant", "width", "balance", "loop")

#: Per attribute, the words for levels 0 / 1 / 2 (``None``: that level has no word).
WORDS: dict[str, tuple[str | None, str | None, str | None]] = {
    "weight": ("thin", "regular", "bold"),
    "slant": ("left-leaning", "upright", "right-leaning"),
    "width": ("narrow", None, "wide"),
    "balance": ("top-heavy", None, "bottom-heavy"),
    "loop": ("open", "with a loop", "with two loops"),
}

#: Tercile thresholds ``(low/middle, middle/high)`` over part A for the continuous attributes.
THRESHOLDS: dict[str, tuple[float, float]] = {
    "weight": (7.131, 7.889),
    "slant": (-0.09, 0.011),
    "width": (20.5, 22.5),
    "balance": (14.739, 16.097),
}


def _as_grey(images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float32)
    if array.ndim == 4:  # (B, C, H, W): the channel mean
        array = array.mean(axis=1)
    if array.ndim != 3:
        raise ValueError(f"images must be (B, H, W) or (B, C, H, W), got shape {tuple(array.shape)}")
    return array


def _loops(ink: np.ndarray) -> np.ndarray:
    """Per picture, the background regions (4-connected) that do not touch the border: ``(B,)``."""
    from scipy import ndimage  # scipy comes with scikit-learn, which the pocket data needs

    out = np.zeros(len(ink))
    for i, mask in enumerate(ink):
        regions, count = ndimage.label(~mask)  # the default structure is 4-connectivity
        border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
        out[i] = count - np.count_nonzero(border)
    return out


def measure(images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Measure every attribute of a batch of pictures.

    Args:
        images: grey ``(B, H, W)`` or ``(B, C, H, W)`` (channels averaged), white ink on black, in [0, 1].

    Returns:
        ``{name: float64 array (B,)}`` for each of :data:`ATTRIBUTES`, plus ``"ink"`` (the ink area in
        pixels); a picture with no ink has NaN for weight, slant and balance and 0 for width and loop.

    Example:
        >>> from dafusion_aug.pocket import digits
        >>> images, labels = digits("A").tensors()
        >>> measure(images[:2])["loop"]
        array([1., 0.])
    """
    grey = _as_grey(images)
    ink = grey > INK_THRESHOLD
    b, h, w = ink.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    out = {name: np.full(b, np.nan) for name in ATTRIBUTES + ("ink",)}
    for i in range(b):
        mask = ink[i]
        area = float(mask.sum())
        out["ink"][i] = area
        if area == 0:
            out["width"][i] = out["loop"][i] = 0.0
            continue
        padded = np.pad(mask, 1)
        inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        boundary = float((mask & ~inside).sum())
        out["weight"][i] = 2.0 * area / max(boundary, 1.0)
        weights = grey[i] * mask
        total = float(weights.sum())
        mx, my = float((weights * xs).sum()) / total, float((weights * ys).sum()) / total
        cov = float((weights * (xs - mx) * (ys - my)).sum()) / total
        var_y = float((weights * (ys - my) ** 2).sum()) / total
        out["slant"][i] = -cov / max(var_y, 1e-6)
        cols = np.flatnonzero(mask.any(axis=0))
        out["width"][i] = float(cols[-1] - cols[0] + 1)
        out["balance"][i] = my
    out["loop"] = np.where(out["ink"] > 0, _loops(ink), 0.0)
    return out


def levels(measured: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn measurements into levels 0 (low) / 1 (middle) / 2 (high) with :data:`THRESHOLDS`.

    Loops: 0, 1, or 2 for two or more. A picture with no ink gets level -1 everywhere.

    Args:
        measured: the output of :func:`measure`.

    Returns:
        ``{name: int64 array (B,)}``.
    """
    out: dict[str, np.ndarray] = {}
    empty = measured["ink"] == 0
    for name in ATTRIBUTES:
        values = measured[name]
        if name == "loop":
            level = np.minimum(values, 2).astype(np.int64)
        else:
            lo, hi = THRESHOLDS[name]
            level = (values > lo).astype(np.int64) + (values > hi).astype(np.int64)
        level[empty] = -1
        out[name] = level
    return out


def attribute_words() -> list[str]:
    """Every attribute phrase, in :data:`ATTRIBUTES` order (low, middle, high)."""
    return [word for name in ATTRIBUTES for word in WORDS[name] if word is not None]


def describe(level: dict[str, int], rng: random.Random, keep: float = 0.5) -> tuple[list[str], str]:
    """Pick words for one picture's levels: each attribute with a word is kept with probability ``keep``.

    Args:
        level: ``{name: level}`` of one picture (from :func:`levels`).
        rng: the random source.
        keep: the probability of naming each attribute.

    Returns:
        ``(adjectives, suffix)``: the words that go before the noun ("bold", "right-leaning") and the
        loop phrase that goes after it ("with a loop", or ``""``).
    """
    adjectives: list[str] = []
    suffix = ""
    for name in ATTRIBUTES:
        value = int(level[name])
        word = WORDS[name][value] if value >= 0 else None
        if word is None or rng.random() >= keep:
            continue
        if name == "loop":
            suffix = word if word.startswith("with") else ""
            if word == "open":
                adjectives.append(word)
        else:
            adjectives.append(word)
    return adjectives, suffix


def agreement(measured: dict[str, np.ndarray], name: str, level: int) -> float:
    """The share of pictures whose ``name`` attribute is at ``level`` (the attribute check's score)."""
    return float(np.mean(levels(measured)[name] == level))


def _terciles(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [1 / 3, 2 / 3])
    return round(float(lo), 3), round(float(hi), 3)


def main() -> int:
    """Print part A's terciles and per-digit level shares (to set and document :data:`THRESHOLDS`)."""
    from .data import CLASS_NAMES, digits

    images, labels = digits("A").tensors()
    measured = measure(images)
    for name in ATTRIBUTES[:-1]:
        print(f"{name}: terciles {_terciles(measured[name])}")
    lv = levels(measured)
    for name in ATTRIBUTES:
        rows = []
        for d in range(10):
            sel = lv[name][labels.numpy() == d]
            rows.append(f"{CLASS_NAMES[d]}:" + "/".join(f"{np.mean(sel == k):.2f}" for k in range(3)))
        print(name, " ".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
