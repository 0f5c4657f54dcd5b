"""The scene judge: a small colour CNN that reads what a scene picture shows besides its digit.

The digit judge (:mod:`dafusion_aug.pocket.judge`) reads the digit and ignores colour on purpose. To
measure whether pocket v3's scene words draw what they say ("a pink digit", "a striped background", "a
small yellow disc"), this network reads the rest of the picture from its pixels:

* ``glyph``: the glyph's colour, one of :data:`~dafusion_aug.pocket.scenes.GLYPH_COLOURS` (softmax);
* ``background``: the background's family, one of :data:`~dafusion_aug.pocket.scenes.BACKGROUNDS` (softmax);
* ``colours``: which :data:`~dafusion_aug.pocket.scenes.BACKGROUND_COLOURS` the background uses (sigmoids);
* ``shapes``: which :data:`~dafusion_aug.pocket.scenes.CLUTTER_SHAPES` are present (sigmoids);
* ``clutter_colours``: which colours the clutter uses (sigmoids).

It is trained on freshly drawn scenes around part-A glyphs only (the renderer gives every label exactly),
with a flip, a blur and a little noise so that it also reads slightly soft generated pictures, and checked
on part B's own scenes (:func:`scene_judge_accuracy`). It is an instrument of the evaluation
(`benchmarks/scene_words.py`), never part of the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import split_indices
from .judge import _block, fit_classifier, read_judge_file, save_judge
from .scenes import (
    BACKGROUND_COLOURS,
    BACKGROUNDS,
    CLUTTER_SHAPES,
    GLYPH_COLOURS,
    Scene,
    _glyphs,
    draw_scene,
    render,
)

__all__ = [
    "HEADS",
    "SceneJudgeNet",
    "scene_targets",
    "render_training_scenes",
    "train_scene_judge",
    "scene_judge_accuracy",
    "read_scenes",
    "save_scene_judge",
    "load_scene_judge",
]

#: Every head: its names, and whether it is one choice (softmax) or a set (sigmoids).
HEADS: dict[str, tuple[tuple[str, ...], bool]] = {
    "glyph": (tuple(GLYPH_COLOURS), True),
    "background": (BACKGROUNDS, True),
    "colours": (tuple(BACKGROUND_COLOURS), False),
    "shapes": (CLUTTER_SHAPES, False),
    "clutter_colours": (tuple(GLYPH_COLOURS), False),
}

#: Seed of the training scenes (mixed with the picture's number; part B's own scenes are never drawn from it).
TRAIN_SEED = 11


def _slices() -> dict[str, slice]:
    out, start = {}, 0
    for name, (names, _) in HEADS.items():
        out[name] = slice(start, start + len(names))
        start += len(names)
    return out


class SceneJudgeNet(nn.Module):
    """A VGG-style CNN on colour: ``(B, 3, 32, 32)`` floats in [0, 1] -> ``(B, sum of head sizes)`` logits.

    Args:
        width: channels of the first block (the next blocks use 2x and 4x).
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        outputs = sum(len(names) for names, _ in HEADS.values())
        self.features = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width * 16, outputs))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return every head's logits, concatenated in the order of :data:`HEADS`."""
        return self.head(self.features(images.float() * 2.0 - 1.0))


def scene_targets(scene: Scene) -> dict[str, np.ndarray]:
    """What the scene judge should read off a picture of ``scene``: an index for a softmax head, a 0/1
    vector for a sigmoid head."""
    colours = scene.colours[:1] if scene.background == "plain" else scene.colours
    return {
        "glyph": np.asarray(HEADS["glyph"][0].index(scene.glyph_colour)),
        "background": np.asarray(BACKGROUNDS.index(scene.background)),
        "colours": np.asarray([float(n in colours) for n in HEADS["colours"][0]]),
        "shapes": np.asarray([float(any(c.shape == s for c in scene.clutter)) for s in CLUTTER_SHAPES]),
        "clutter_colours": np.asarray([float(any(c.colour == n for c in scene.clutter)) for n in HEADS["clutter_colours"][0]]),
    }


def _stack_targets(scene_list: list[Scene]) -> dict[str, torch.Tensor]:
    per = [scene_targets(s) for s in scene_list]
    out = {}
    for name, (_, single) in HEADS.items():
        values = np.stack([p[name] for p in per])
        out[name] = torch.from_numpy(values).long() if single else torch.from_numpy(values).float()
    return out


def render_training_scenes(count: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` part-A glyphs (cycled) in freshly drawn scenes, and their targets.

    Returns:
        ``(images float (count, 3, 32, 32) in [0, 1], {head: targets})``.
    """
    glyphs, targets = _glyphs()
    part_a, _ = split_indices(targets)
    drawn = [draw_scene(np.random.default_rng([TRAIN_SEED, seed, i])) for i in range(count)]
    arrays = np.stack([render(glyphs[part_a[i % len(part_a)]], s) for i, s in enumerate(drawn)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0), _stack_targets(drawn)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A horizontal flip, a random blur and a little noise (nothing that changes a colour or a family)."""
    flip = torch.rand(len(images), 1, 1, 1, generator=generator) < 0.5
    x = torch.where(flip, images.flip(-1), images)
    soft = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    amount = torch.rand(len(x), 1, 1, 1, generator=generator) * 0.7
    x = (1.0 - amount) * x + amount * soft
    x = x + 0.04 * torch.rand(len(x), 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0)


def _loss(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    total = logits.new_zeros(())
    for name, part in _slices().items():
        single = HEADS[name][1]
        if single:
            total = total + nn.functional.cross_entropy(logits[:, part], targets[name])
        else:
            total = total + nn.functional.binary_cross_entropy_with_logits(logits[:, part], targets[name])
    return total


def train_scene_judge(
    count: int = 12_000, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
    progress: bool = True,
) -> SceneJudgeNet:
    """Train a :class:`SceneJudgeNet` on ``count`` freshly drawn part-A scenes.

    Args:
        count: training pictures (rendered once).
        steps: optimizer steps (AdamW, one-cycle schedule).
        batch_size: pictures per step, drawn with replacement.
        lr: the peak learning rate.
        seed: seeds the scenes, the weights and the sampling.
        progress: show a tqdm bar.

    Returns:
        The trained network, in eval mode.
    """
    images, targets = render_training_scenes(count, seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = SceneJudgeNet()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, count, (batch_size,), generator=gen)
        return _loss(net(_augment(images[idx], gen)), {k: v[idx] for k, v in targets.items()})

    return fit_classifier(net, batch_loss, steps, lr, desc="scene judge", progress=progress)


@torch.no_grad()
def read_scenes(net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """What the scene judge reads off ``images`` (float ``(B, 3, 32, 32)`` in [0, 1]).

    Returns:
        ``{head: ...}``: an index ``(B,)`` for a softmax head, a boolean ``(B, names)`` (probability > 0.5)
        for a sigmoid head.
    """
    was_training = net.training
    net.eval()
    logits = torch.cat([net(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)])
    net.train(was_training)
    out = {}
    for name, part in _slices().items():
        out[name] = logits[:, part].argmax(1) if HEADS[name][1] else logits[:, part] > 0.0
    return out


def scene_judge_accuracy(net: nn.Module, images: torch.Tensor, scene_list: list[Scene]) -> dict[str, float]:
    """Per head, how often the scene judge reads ``images`` as their scenes say (a set head: every entry right)."""
    read = read_scenes(net, images)
    want = _stack_targets(scene_list)
    out = {}
    for name, (_, single) in HEADS.items():
        hit = read[name] == want[name] if single else (read[name] == want[name].bool()).all(1)
        out[name] = round(float(hit.float().mean()), 4)
    return out


def _head_names() -> dict[str, list[str]]:
    return {k: list(v[0]) for k, v in HEADS.items()}


def save_scene_judge(net: SceneJudgeNet, path: str | os.PathLike, metadata: dict[str, object] | None = None) -> Path:
    """Write the scene judge as float16 safetensors, atomically (the heads' names in the metadata)."""
    return save_judge(net, path, {"heads": _head_names(), **(metadata or {})})


def load_scene_judge(path: str | os.PathLike) -> SceneJudgeNet:
    """Load a scene judge written by :func:`save_scene_judge`.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: its heads are not this version's (the scene world changed since it was trained).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene judge not found at {path}; train one with `python benchmarks/scene_words.py` (it writes one where it finds none)")
    meta, state = read_judge_file(path)
    if json.loads(meta.get("heads", "null")) != _head_names():
        raise ValueError(f"the scene judge at {path} reads other heads than this version's scene world; train it again")
    net = SceneJudgeNet(width=int(meta.get("width", 24)))
    net.load_state_dict(state)
    return net.eval()
