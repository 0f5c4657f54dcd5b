"""The pocket data: scikit-learn's bundled handwritten digits at 32x32, split in two fixed halves.

``sklearn.datasets.load_digits()`` ships 1,797 grey 8x8 digits (values 0..16) inside scikit-learn, so
nothing is downloaded. We scale the values to 0..255 (``round(v * 255 / 16)``), upscale each image to
32x32 with PIL's **bicubic** filter, and return RGB images with a **white digit on a black background**
(the data set's own polarity: ink is bright).

The split is stratified and fixed: for each class, the indices of that class (in the data set's order)
are permuted with ``numpy.random.default_rng(SPLIT_SEED)`` (one generator, classes visited 0..9) and the
first ``ceil(n / 2)`` go to part A, the rest to part B. Part A (901 images) trains the pocket model and
its judge; part B (896 images) is never seen by either and is kept for few-shot experiments.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["CLASS_NAMES", "SPLIT_SEED", "DigitsDataset", "digits", "split_indices", "random_affine"]

#: Class names, index = label.
CLASS_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

#: Seed of the fixed A/B split.
SPLIT_SEED = 0

#: Side of the images the pocket data set returns.
IMAGE_SIZE = 32

_INSTALL_HINT = 'the pocket data needs scikit-learn: pip install "dafusion-aug[pocket]"'


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 32, 32), targets int64 (N,))`` for the whole data set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    bunch = load_digits()
    small = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
            for im in small
        ]
    )
    big.setflags(write=False)
    targets = bunch.target.astype(np.int64)
    targets.setflags(write=False)
    return big, targets


def split_indices(
    targets: Sequence[int] | np.ndarray, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into two stratified halves, deterministically.

    Args:
        targets: the label of every item.
        seed: seed of the permutation generator.

    Returns:
        ``(part_a, part_b)``: sorted index arrays; per class, part A gets ``ceil(n / 2)`` items.
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    part_a: list[np.ndarray] = []
    part_b: list[np.ndarray] = []
    for label in np.unique(targets):
        idx = np.flatnonzero(targets == label)
        idx = idx[rng.permutation(len(idx))]
        half = math.ceil(len(idx) / 2)
        part_a.append(idx[:half])
        part_b.append(idx[half:])
    return np.sort(np.concatenate(part_a)), np.sort(np.concatenate(part_b))


class DigitsDataset(torch.utils.data.Dataset):
    """A map-style data set of ``(PIL RGB 32x32 image, int label)`` pairs.

    Attributes:
        class_names: ``["zero", ..., "nine"]``, index = label.
        targets: the label of every item, as a list of ints.
        indices: the position of every item in ``sklearn.datasets.load_digits()``.
        part: ``"A"`` or ``"B"``.
    """

    def __init__(self, part: str = "A") -> None:
        part = part.upper()
        if part not in ("A", "B"):
            raise ValueError(f"part must be 'A' or 'B', got {part!r}")
        images, targets = _raw()
        part_a, part_b = split_indices(targets)
        self.part = part
        self.indices: list[int] = (part_a if part == "A" else part_b).tolist()
        self.class_names: list[str] = list(CLASS_NAMES)
        self.targets: list[int] = [int(targets[i]) for i in self.indices]
        self._images = images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        array = self._images[self.indices[index]]
        return Image.fromarray(array, mode="L").convert("RGB"), self.targets[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return all items at once.

        Returns:
            ``(images, labels)``: float32 ``(N, 3, 32, 32)`` in [0, 1] and int64 ``(N,)``.
        """
        grey = torch.from_numpy(np.ascontiguousarray(self._images[self.indices])).float().div_(255.0)
        return grey[:, None].expand(-1, 3, -1, -1).contiguous(), torch.tensor(self.targets, dtype=torch.long)

    def __repr__(self) -> str:
        return f"DigitsDataset(part={self.part!r}, n={len(self)})"


def digits(part: str = "A") -> DigitsDataset:
    """Return one half of the pocket digits data set.

    Args:
        part: ``"A"`` (trains the pocket model and the judge) or ``"B"`` (never seen by either).

    Returns:
        A :class:`DigitsDataset` of ``(PIL RGB 32x32 image, int label)``.

    Raises:
        ImportError: when scikit-learn is not installed.
    """
    return DigitsDataset(part)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    shift: float = 0.1,
) -> torch.Tensor:
    """Apply a mild random rotation, scaling and shift to each image of a batch (training augmentation).

    Args:
        images: float ``(B, C, H, W)``; the background must be 0 (it fills the borders).
        generator: the random generator (CPU).
        degrees: the largest rotation, either way.
        scale: the range of the zoom factor.
        shift: the largest shift, as a fraction of the half-width (0.1 is 1.6 pixels at 32x32).

    Returns:
        The transformed batch, same shape and dtype.
    """
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) * (hi - lo) + lo

    angle = uniform(-degrees, degrees) * math.pi / 180.0
    zoom = uniform(*scale)
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
