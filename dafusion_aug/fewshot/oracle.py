"""``oracle-scene``: an upper bound of the few-shot protocol that reads the scene renderer.

The scene world (:mod:`dafusion_aug.pocket.scenes`) knows how each picture was made, so it can do what no
model can: put the very same glyph, at the very same place, in a freshly drawn scene. That is the best
an erased model with an object token could hope to give (every nuisance new, the object untouched), so
the share of this oracle's gain that a method takes says how much of the reachable gain it reaches.

It is **not a method a user can run on real data**: it reads the renderer. Reports label it as an upper
bound.
"""

from __future__ import annotations

from typing import Any

import torch

from .._images import to_canonical
from ..hashing import image_digest, stable_hash

__all__ = ["UPPER_BOUNDS", "SceneOracle"]

#: The protocol's upper bounds: methods that read how the data was made (never a user's method).
UPPER_BOUNDS = ("oracle-scene",)


class SceneOracle:
    """Swaps a training sample, with probability ``p``, for one of ``num_variants`` redraws of its scene.

    Decisions come from the global torch RNG (as :class:`~dafusion_aug.DiffusionAugment`'s do); redraw v
    of item i is seeded by ``stable_hash("oracle-scene", seed, i, v)``, so it is the same picture in every run.

    Args:
        dataset: the training pool; it must have ``redraw(index, seed) -> PIL image`` (a
            :class:`~dafusion_aug.pocket.scenes.SceneDataset`).
        num_variants: redraws per picture (M).
        p: probability of a swap.
        seed: mixed into every redraw's seed.

    Raises:
        TypeError: ``dataset`` cannot redraw its scenes.
        ValueError: ``num_variants`` < 1 or ``p`` outside [0, 1].
    """

    def __init__(self, dataset: Any, num_variants: int = 10, p: float = 0.5, seed: int = 0) -> None:
        if not callable(getattr(dataset, "redraw", None)):
            raise TypeError(
                "method 'oracle-scene' needs a training pool that can redraw its scenes "
                f"(dafusion_aug.pocket.scenes.scenes('B')), got {type(dataset).__name__}"
            )
        if isinstance(num_variants, bool) or not isinstance(num_variants, int) or num_variants < 1:
            raise ValueError(f"num_variants must be an int >= 1, got {num_variants!r}")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.dataset, self.num_variants, self.p, self.seed = dataset, num_variants, float(p), int(seed)
        self._where: dict[str, int] | None = None

    def _index_of(self, image: Any) -> int:
        if self._where is None:  # once: every picture of the pool by its pixels
            self._where = {image_digest(to_canonical(self.dataset[i][0])[0][0]): i for i in range(len(self.dataset))}
        digest = image_digest(to_canonical(image)[0][0])
        if digest not in self._where:
            raise ValueError("oracle-scene was given an image that is not in its training pool; it can only redraw the pool's own scenes")
        return self._where[digest]

    def __call__(self, sample: tuple[Any, int]) -> tuple[Any, int]:
        image, label = sample
        if float(torch.rand(())) >= self.p:
            return sample
        v = int(torch.randint(self.num_variants, ()))
        i = self._index_of(image)
        return self.dataset.redraw(i, stable_hash("oracle-scene", self.seed, i, v)), label

    def __repr__(self) -> str:
        return f"SceneOracle(num_variants={self.num_variants}, p={self.p}, upper bound: reads the renderer)"
