"""What pocket v3 is trained on: part A's digits in many scenes, some in the grey world, and their captions.

Each part-A digit appears ``copies`` times: in its own scene (:func:`~dafusion_aug.pocket.scenes.scenes`),
in ``copies - grey_copies - 1`` redraws of it (the glyph kept, everything else drawn anew), and in
``grey_copies`` grey-world pictures (white on black, as :func:`~dafusion_aug.pocket.digits`; the first as
is, the others with the mild random affine), so the v3 model can still draw v2's world for the side-by-side
comparison. Every picture keeps its scene (``None`` for a grey one), and :meth:`SceneBank.caption` draws a
caption of it by the v3 rule (:func:`~dafusion_aug.pocket.scenes.sample_caption`).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from .data import digits, random_affine
from .scenes import Scene, sample_caption, scenes

__all__ = ["SceneBank", "scene_bank"]


@dataclasses.dataclass
class SceneBank:
    """Training pictures with their labels and scenes.

    Attributes:
        images: float ``(N, 3, 32, 32)`` in [0, 1].
        labels: int64 ``(N,)``.
        scenes: per picture, its :class:`~dafusion_aug.pocket.scenes.Scene`, or ``None`` for a grey-world one.
        alphas: float ``(N, 1, 32, 32)`` in [0, 1], where each picture's glyph is (the renderer's opacity; a
            grey-world picture's own brightness), for the training's glyph-weighted loss.
    """

    images: torch.Tensor
    labels: torch.Tensor
    scenes: list[Scene | None]
    alphas: torch.Tensor

    def __len__(self) -> int:
        return len(self.scenes)

    def caption(self, index: int, rng: random.Random) -> str:
        """A training caption of picture ``index`` (the v3 rule)."""
        return sample_caption(self.scenes[index], int(self.labels[index]), rng)

    def grey_share(self) -> float:
        """The share of grey-world pictures."""
        return sum(s is None for s in self.scenes) / max(1, len(self.scenes))


def scene_bank(copies: int = 16, grey_copies: int = 3, seed: int = 0, part: str = "A") -> SceneBank:
    """Part ``part``'s digits, each in ``copies`` pictures (see the module's docstring).

    Args:
        copies: pictures per digit (at least 1).
        grey_copies: how many of them are grey-world pictures (0 .. ``copies - 1``).
        seed: seeds the redraws and the grey pictures' affine.
        part: ``"A"`` (training) or ``"B"``.

    Returns:
        A :class:`SceneBank`, copies in order: the own scene, the redraws, then the grey pictures.

    Raises:
        ValueError: ``copies`` < 1 or ``grey_copies`` outside ``[0, copies - 1]``.
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    if isinstance(grey_copies, bool) or not isinstance(grey_copies, int) or not 0 <= grey_copies < copies:
        raise ValueError(f"grey_copies must be an int in [0, copies - 1] = [0, {copies - 1}], got {grey_copies!r}")
    world = scenes(part)
    n = len(world)
    arrays: list[np.ndarray] = []
    kept: list[Scene | None] = []
    alpha = torch.from_numpy(np.stack([world.alpha(i) for i in range(n)])).float().unsqueeze(1)
    for c in range(copies - grey_copies):
        for i in range(n):
            scene = world.scene(i) if c == 0 else world.redrawn_scene(i, seed * 1000 + c)
            arrays.append(world.array(i, scene))
            kept.append(scene)
    images = [torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)]
    alphas = [alpha] * (copies - grey_copies)  # a redraw keeps the glyph's side and place
    grey, _ = digits(part).tensors()
    gen = torch.Generator().manual_seed(seed + 7)
    for c in range(grey_copies):
        images.append(grey if c == 0 else random_affine(grey, gen))
        alphas.append(images[-1].mean(1, keepdim=True))
        kept += [None] * n
    labels = torch.tensor(world.targets, dtype=torch.long).repeat(copies)
    return SceneBank(torch.cat(images), labels, kept, torch.cat(alphas))
