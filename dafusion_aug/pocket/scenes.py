"""The scene world (pocket v3): each digit drawn as a coloured glyph over a background, with clutter.

In the grey world (:func:`~dafusion_aug.pocket.digits`) almost everything that varies between two
pictures of a digit is the digit itself, so a model with the digit erased has nothing to add that a
random affine does not (docs/results.md, v2). Photographs are not like that: most of what differs between
two pictures of a class (background, colour, texture, clutter) is not the class. The scene world puts that
kind of variety, drawn independently of the digit, into the pocket pictures, their captions, and the
few-shot train and test images.

A scene is drawn from a seed, deterministically (:func:`draw_scene`), and rendered over one of
scikit-learn's 8x8 digits (:func:`render`):

* the **glyph**: the digit upscaled (bicubic) to a side of 18..24 px, at a random place in the 32x32
  picture, its ink (the grey value as opacity) painted in one bright colour of :data:`GLYPH_COLOURS`;
* the **background**: one family of :data:`BACKGROUNDS` (plain, striped at any angle, checkered, dotted,
  shaded, blotchy, speckled) in two different colours of :data:`BACKGROUND_COLOURS`, dimmed to
  30..50 % so the glyph stays the brightest thing in the picture; a plain background has one colour;
* the **clutter**: 0..2 small shapes of :data:`CLUTTER_SHAPES` (disc, square, bar) in colours of
  :data:`GLYPH_COLOURS` at 55..75 %, under the glyph.

Every parameter is drawn independently of the digit; the glyph's colour is never one of its background's
colours, nor the clutter's. :func:`caption` names a scene with words no digit owns ("a pink seven on a green and blue striped
background with a small yellow disc"); docs/pocket.md states the caption rule.

Part A and part B are the grey world's halves (:func:`~dafusion_aug.pocket.split_indices`), each picture
in a scene drawn from ``(SCENE_SEED, part, index)``: :func:`scenes` returns them as a data set whose
:meth:`SceneDataset.redraw` puts the same glyph, at the same place, in a freshly drawn scene (what the
``oracle-scene`` upper bound of the few-shot protocol reads).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .data import _INSTALL_HINT, CLASS_NAMES, split_indices

__all__ = [
    "SCENE_SEED",
    "GLYPH_COLOURS",
    "BACKGROUND_COLOURS",
    "BACKGROUNDS",
    "CLUTTER_SHAPES",
    "Clutter",
    "Scene",
    "draw_scene",
    "glyph_alpha",
    "render",
    "caption",
    "scene_words",
    "sample_caption",
    "GREY_WORDS",
    "vocabulary",
    "SceneDataset",
    "scenes",
]

#: Seed of every scene of part A and part B (mixed with the part and the picture's index).
SCENE_SEED = 3

#: Side of a scene picture.
SIZE = 32

#: Bright colours of glyphs and clutter (RGB, 0..255).
GLYPH_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45),
    "orange": (250, 145, 25),
    "yellow": (245, 225, 40),
    "green": (50, 205, 70),
    "cyan": (40, 210, 220),
    "blue": (60, 110, 250),
    "purple": (165, 75, 235),
    "pink": (250, 120, 200),
    "white": (245, 245, 245),
}

#: Background colours (RGB before dimming): the glyph colours with grey in place of white.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    **{k: v for k, v in GLYPH_COLOURS.items() if k != "white"},
    "grey": (200, 200, 200),
}

#: Background families, by the adjective captions use.
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "shaded", "blotchy", "speckled")

#: Clutter shapes.
CLUTTER_SHAPES: tuple[str, ...] = ("disc", "square", "bar")

#: Range of the patterns' period, in pixels (stripes: one dark and one light band; checks: two cells; dots:
#: the gap between dots). No texture is finer than 4 px, the side of one cell of the 8x8 latent grid.
PERIODS = (8.0, 12.0)
#: Side of a speckled background's cells, in pixels.
SPECKLE = 4
#: Range of the glyph's side, in pixels.
GLYPH_SIDES = (18, 24)
#: Range of the backgrounds' brightness (a factor on their colours).
BACKGROUND_DIM = (0.3, 0.5)
#: A background colour's luma is at most this share of the glyph's (ITU-R 601 luma).
CONTRAST = 0.6
#: Range of the clutter's brightness.
CLUTTER_DIM = (0.55, 0.75)

_PARTS = {"A": 0, "B": 1}


@dataclasses.dataclass(frozen=True)
class Clutter:
    """One small shape: ``shape`` of :data:`CLUTTER_SHAPES`, its colour's name, centre, size, orientation."""

    shape: str
    colour: str
    x: float
    y: float
    size: float
    vertical: bool = False
    dim: float = 0.65


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything about a picture but its digit's shape.

    Attributes:
        glyph_colour: a name of :data:`GLYPH_COLOURS`.
        side, x, y: the glyph's side and its top-left corner, in pixels.
        background: a name of :data:`BACKGROUNDS`.
        colours: the background's two colour names (the first is its main colour; a plain one uses it alone).
        dims: their brightness factors.
        angle, period, phase: the pattern's orientation (radians), scale (pixels) and offset (0..1).
        field_seed: seeds a blotchy or speckled background's random field.
        clutter: the small shapes, drawn in order under the glyph.
    """

    glyph_colour: str
    side: int
    x: int
    y: int
    background: str
    colours: tuple[str, str]
    dims: tuple[float, float]
    angle: float
    period: float
    phase: float
    field_seed: int
    clutter: tuple[Clutter, ...] = ()


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([SCENE_SEED, *key])


def draw_scene(rng: np.random.Generator, side: int | None = None, x: int | None = None, y: int | None = None) -> Scene:
    """Draw a scene; ``side``, ``x`` and ``y`` keep a glyph's size and place (for a redraw).

    Args:
        rng: the random source (``numpy.random.default_rng``).
        side, x, y: the glyph's side and corner to keep, or None to draw them.

    Returns:
        The :class:`Scene`.
    """
    glyph = str(rng.choice(list(GLYPH_COLOURS)))
    drawn_side = int(rng.integers(GLYPH_SIDES[0], GLYPH_SIDES[1] + 1))
    side = drawn_side if side is None else int(side)
    drawn_x, drawn_y = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
    x, y = (drawn_x if x is None else int(x)), (drawn_y if y is None else int(y))
    background = str(rng.choice(BACKGROUNDS))
    names = [n for n in BACKGROUND_COLOURS if n != glyph and not (glyph == "white" and n == "grey")]
    first = str(rng.choice(names))
    second = str(rng.choice([n for n in names if n != first]))
    # each background colour at most CONTRAST of the glyph's luma, so the glyph stays visible in grey too
    top = [CONTRAST * _luma(GLYPH_COLOURS[glyph]) / _luma(BACKGROUND_COLOURS[n]) for n in (first, second)]
    dims = tuple(float(min(d, t)) for d, t in zip(rng.uniform(*BACKGROUND_DIM, size=2), top))
    angle, period, phase = float(rng.uniform(0, np.pi)), float(rng.uniform(*PERIODS)), float(rng.uniform())
    field_seed = int(rng.integers(2**31))
    clutter = []
    for _ in range(int(rng.choice(3, p=[0.4, 0.35, 0.25]))):
        shape = str(rng.choice(CLUTTER_SHAPES))
        colour = str(rng.choice([n for n in GLYPH_COLOURS if n not in (first, glyph)]))
        cx, cy = (float(v) for v in rng.uniform(3.0, SIZE - 3.0, size=2))
        clutter.append(Clutter(shape, colour, cx, cy, float(rng.uniform(2.0, 3.5)), bool(rng.integers(2)),
                               float(rng.uniform(*CLUTTER_DIM))))
    return Scene(glyph, side, x, y, background, (first, second), dims, angle, period, phase, field_seed, tuple(clutter))  # type: ignore[arg-type]


def _pattern(scene: Scene) -> np.ndarray:
    """The share of the second colour at every pixel, float ``(32, 32)`` in [0, 1]."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    along = xs * np.cos(scene.angle) + ys * np.sin(scene.angle)
    kind = scene.background
    if kind == "plain":
        return np.zeros((SIZE, SIZE))
    if kind == "striped":
        return (np.sin(2 * np.pi * (along / scene.period + scene.phase)) > 0).astype(np.float64)
    if kind == "checkered":
        cell = scene.period / 2.0
        offset = scene.phase * cell
        return (((xs + offset) // cell + (ys + offset) // cell) % 2).astype(np.float64)
    if kind == "dotted":
        gap = scene.period
        dx = (xs + scene.phase * gap) % gap - gap / 2
        dy = (ys + scene.phase * gap) % gap - gap / 2
        return (dx * dx + dy * dy <= (gap / 4.0) ** 2).astype(np.float64)
    if kind == "shaded":
        return (along - along.min()) / (along.max() - along.min())
    field = np.random.default_rng(scene.field_seed)
    if kind == "blotchy":
        coarse = field.uniform(size=(5, 5)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-(smooth - np.median(smooth)) * 12.0))
    if kind == "speckled":
        cells = SIZE // SPECKLE
        return np.kron(field.uniform(size=(cells, cells)) < 0.5, np.ones((SPECKLE, SPECKLE))).astype(np.float64)
    raise ValueError(f"scene.background must be one of {list(BACKGROUNDS)}, got {kind!r}")


def _shape_mask(item: Clutter) -> np.ndarray:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    dx, dy = xs - item.x, ys - item.y
    if item.shape == "disc":
        return (dx * dx + dy * dy <= item.size**2).astype(np.float64)
    if item.shape == "square":
        return ((np.abs(dx) <= item.size) & (np.abs(dy) <= item.size)).astype(np.float64)
    if item.shape == "bar":
        long, short = (dy, dx) if item.vertical else (dx, dy)
        return ((np.abs(long) <= item.size * 2.0) & (np.abs(short) <= 1.0)).astype(np.float64)
    raise ValueError(f"clutter shape must be one of {list(CLUTTER_SHAPES)}, got {item.shape!r}")


def _colour(table: dict[str, tuple[int, int, int]], name: str, dim: float = 1.0) -> np.ndarray:
    return np.asarray(table[name], dtype=np.float64) / 255.0 * dim


def glyph_alpha(glyph: np.ndarray, scene: Scene) -> np.ndarray:
    """The glyph's opacity at every pixel of the picture, float ``(32, 32)`` in [0, 1].

    Args:
        glyph: the digit, grey ``(h, w)`` in [0, 1] (ink bright), resized (bicubic) to ``scene.side``.
        scene: where the glyph goes.
    """
    grey = Image.fromarray(np.asarray(np.clip(glyph, 0.0, 1.0) * 255.0, dtype=np.float32), mode="F")
    ink = np.clip(np.asarray(grey.resize((scene.side, scene.side), Image.BICUBIC), dtype=np.float64) / 255.0, 0.0, 1.0)
    alpha = np.zeros((SIZE, SIZE))
    alpha[scene.y : scene.y + scene.side, scene.x : scene.x + scene.side] = ink
    return alpha


def render(glyph: np.ndarray, scene: Scene) -> np.ndarray:
    """Render one digit in a scene.

    Args:
        glyph: the digit, grey ``(h, w)`` in [0, 1] at any size (ink bright); it is resized to ``scene.side``.
        scene: the scene.

    Returns:
        uint8 ``(32, 32, 3)``.
    """
    share = _pattern(scene)[..., None]
    first = _colour(BACKGROUND_COLOURS, scene.colours[0], scene.dims[0])
    second = _colour(BACKGROUND_COLOURS, scene.colours[1], scene.dims[1])
    out = first * (1.0 - share) + second * share
    for item in scene.clutter:
        mask = _shape_mask(item)[..., None]
        out = out * (1.0 - mask) + _colour(GLYPH_COLOURS, item.colour, item.dim) * mask
    alpha = glyph_alpha(glyph, scene)[..., None]
    out = out * (1.0 - alpha) + _colour(GLYPH_COLOURS, scene.glyph_colour) * alpha
    return np.asarray(np.rint(np.clip(out, 0.0, 1.0) * 255.0), dtype=np.uint8)


def scene_words(scene: Scene) -> dict[str, str]:
    """The phrases a caption may use for ``scene``: ``glyph`` ("pink"), ``background`` ("a green and blue
    striped background"; "a plain green background") and ``clutter`` ("a small yellow disc and a small red
    bar"; empty when there is none)."""
    first, second = scene.colours
    if scene.background == "plain":
        background = f"a plain {first} background"
    else:
        background = f"{_article(first)} {first} and {second} {scene.background} background"
    items = [f"a small {c.colour} {c.shape}" for c in scene.clutter]
    return {"glyph": scene.glyph_colour, "background": background, "clutter": " and ".join(items)}


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(scene: Scene, label: int | None) -> str:
    """The full description of a scene: "a pink seven on a green and blue striped background with a small
    yellow disc"; with ``label=None`` the digit is "digit" ("a pink digit on ...")."""
    words = scene_words(scene)
    name = "digit" if label is None else CLASS_NAMES[label]
    text = f"{_article(words['glyph'])} {words['glyph']} {name} on {words['background']}"
    return text + (f" with {words['clutter']}" if words["clutter"] else "")


#: Probabilities of the caption kinds during training (the rest: digit and some scene words).
P_EMPTY, P_AGNOSTIC, P_CLASS_ONLY, P_SCENE_ONLY = 0.1, 0.05, 0.25, 0.1
#: Probability that a caption naming scene words names each of the three parts (at least one is named).
P_PART = 0.6

#: Class-only captions ("{}" is the digit's word); agnostic ones name no digit and no scene word.
CLASS_ONLY = ("a {}", "a digit {}", "a photo of a {}", "the number {}", "{}")
AGNOSTIC = ("a digit", "a photo of a digit", "a number", "a picture")


#: The phrases of a grey-world picture (a white digit on a black background, as :func:`~dafusion_aug.pocket.digits`).
GREY_WORDS = {"glyph": "white", "background": "a plain black background", "clutter": ""}


def sample_caption(scene: Scene | None, label: int, rng: random.Random) -> str:
    """Draw a training caption for a picture of ``label`` in ``scene`` (the v3 caption rule); ``scene=None``
    is a grey-world picture, described by :data:`GREY_WORDS` ("a white seven on a plain black background").

    Empty with :data:`P_EMPTY`; agnostic with :data:`P_AGNOSTIC` ("a digit"); the digit alone with
    :data:`P_CLASS_ONLY` ("a seven"); scene words without the digit with :data:`P_SCENE_ONLY`; otherwise
    the digit with scene words. A caption with scene words names each of the glyph's colour, the
    background and the clutter with probability :data:`P_PART` (at least one), always in that order:
    "a pink seven on a green and blue striped background", "a seven with a small yellow disc", "a green
    and blue striped background with a small yellow disc", "a pink digit". Every scene word is shared by
    all digits, and the scene was drawn without looking at the digit.

    Args:
        scene: the picture's scene.
        label: the digit.
        rng: the random source.

    Returns:
        The caption.
    """
    u = rng.random()
    if u < P_EMPTY:
        return ""
    if u < P_EMPTY + P_AGNOSTIC:
        return rng.choice(AGNOSTIC)
    if u < P_EMPTY + P_AGNOSTIC + P_CLASS_ONLY:
        return rng.choice(CLASS_ONLY).format(CLASS_NAMES[label])
    with_digit = u >= P_EMPTY + P_AGNOSTIC + P_CLASS_ONLY + P_SCENE_ONLY
    words = GREY_WORDS if scene is None else scene_words(scene)
    parts = [name for name in ("glyph", "background", "clutter") if words[name] and rng.random() < P_PART]
    if not parts:
        parts = [rng.choice([name for name in ("glyph", "background", "clutter") if words[name]])]
    return _phrase(words, parts, CLASS_NAMES[label] if with_digit else None)


def _phrase(words: dict[str, str], parts: Sequence[str], name: str | None) -> str:
    """A caption from some of a scene's phrases: the glyph part ("a pink seven" / "a pink digit"), then
    "on" the background, then "with" the clutter; without a glyph part or digit, the background or the
    clutter leads."""
    glyph = words["glyph"] if "glyph" in parts else None
    if glyph is not None or name is not None:
        noun = name if name is not None else "digit"
        head = f"{_article(glyph)} {glyph} {noun}" if glyph is not None else f"a {noun}"
        text = head + (f" on {words['background']}" if "background" in parts else "")
    elif "background" in parts:
        text = words["background"]
    else:
        return words["clutter"]
    return text + (f" with {words['clutter']}" if "clutter" in parts else "")


def vocabulary() -> list[str]:
    """Every word a v3 caption can use besides the digits' names (for the tokenizer's corpus)."""
    words = {"a", "an", "and", "on", "with", "small", "background", "digit", "photo", "of", "the", "number", "picture"}
    words |= set(GLYPH_COLOURS) | set(BACKGROUND_COLOURS) | set(BACKGROUNDS) | set(CLUTTER_SHAPES) | {"black"}
    return sorted(words)


@functools.lru_cache(maxsize=1)
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    """``(glyphs float (N, 8, 8) in [0, 1], targets int64 (N,))`` of the whole digits data set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    bunch = load_digits()
    glyphs = (bunch.images / 16.0).astype(np.float64)
    glyphs.setflags(write=False)
    return glyphs, bunch.target.astype(np.int64)


class SceneDataset(torch.utils.data.Dataset):
    """A map-style data set of ``(PIL RGB 32x32 scene, int label)``: one half of the digits, each in its scene.

    Attributes:
        class_names: ``["zero", ..., "nine"]``, index = label.
        targets: the label of every item, as a list of ints.
        indices: the position of every item in ``sklearn.datasets.load_digits()``.
        part: ``"A"`` or ``"B"``.
    """

    def __init__(self, part: str = "B") -> None:
        part = str(part).upper()
        if part not in _PARTS:
            raise ValueError(f"part must be 'A' or 'B', got {part!r}")
        glyphs, targets = _glyphs()
        part_a, part_b = split_indices(targets)
        self.part = part
        self.indices: list[int] = (part_a if part == "A" else part_b).tolist()
        self.class_names: list[str] = list(CLASS_NAMES)
        self.targets: list[int] = [int(targets[i]) for i in self.indices]
        self._glyphs = glyphs
        self._scenes = [draw_scene(_rng(_PARTS[part], i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _position(self, index: int) -> int:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``."""
        return self._scenes[self._position(index)]

    def array(self, index: int, scene: Scene | None = None) -> np.ndarray:
        """Item ``index`` as uint8 ``(32, 32, 3)``, in its own scene or in ``scene``."""
        index = self._position(index)
        return render(self._glyphs[self.indices[index]], self._scenes[index] if scene is None else scene)

    def alpha(self, index: int) -> np.ndarray:
        """Item ``index``'s glyph opacity, float ``(32, 32)`` in [0, 1] (the same in every redraw)."""
        index = self._position(index)
        return glyph_alpha(self._glyphs[self.indices[index]], self._scenes[index])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = self._position(index)
        return Image.fromarray(self.array(index), mode="RGB"), self.targets[index]

    def redrawn_scene(self, index: int, seed: int) -> Scene:
        """The scene of :meth:`redraw` ``(index, seed)``: the glyph's side and place kept, all else drawn anew."""
        index = self._position(index)
        old = self._scenes[index]
        return draw_scene(_rng(2, _PARTS[self.part], self.indices[index], int(seed)), old.side, old.x, old.y)

    def redraw(self, index: int, seed: int) -> Image.Image:
        """The same glyph, same side and place, in a freshly drawn scene (new colours, background, clutter).

        Args:
            index: the item.
            seed: seeds the new scene (the same seed, the same picture).

        Returns:
            A PIL RGB 32x32 image.
        """
        return Image.fromarray(self.array(index, self.redrawn_scene(index, seed)), mode="RGB")

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All items at once: float32 ``(N, 3, 32, 32)`` in [0, 1] and int64 ``(N,)``."""
        arrays = np.stack([self.array(i) for i in range(len(self))])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0), torch.tensor(self.targets, dtype=torch.long)

    def captions(self, index: int) -> str:
        """The full caption of item ``index`` (:func:`caption`)."""
        return caption(self.scene(index), self.targets[self._position(index)])

    def __repr__(self) -> str:
        return f"SceneDataset(part={self.part!r}, n={len(self)})"


def scenes(part: str = "B") -> SceneDataset:
    """One half of the digits, each drawn in its own scene (see the module's docstring).

    Args:
        part: ``"A"`` (trains the pocket v3 model and its judge) or ``"B"`` (few-shot train and test).

    Returns:
        A :class:`SceneDataset`.

    Raises:
        ImportError: when scikit-learn is not installed.

    Example:
        >>> data = scenes("B")
        >>> image, label = data[0]
        >>> image.size, data.captions(0).startswith("a ")
        ((32, 32), True)
    """
    return SceneDataset(part)


def save_grid(path: str, part: str = "B", count: int = 24, columns: int = 6, redraws: int = 0) -> str:
    """Draw ``count`` pictures of ``part`` with their full captions (or, with ``redraws``, each picture
    followed by that many :meth:`SceneDataset.redraw` s) into a PNG, for the docs.

    Args:
        path: the PNG to write.
        part: ``"A"`` or ``"B"``.
        count: pictures.
        columns: tiles per row.
        redraws: redraws shown after each picture (the oracle's variants); 0 shows captions instead.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = scenes(part)
    tiles: list[tuple[np.ndarray, str]] = []
    for i in range(count):
        tiles.append((data.array(i), "\n".join(_wrap(data.captions(i), 26)) if not redraws else f"{part}[{i}]"))
        tiles += [(np.asarray(data.redraw(i, s)), f"redraw {s}") for s in range(redraws)]
    columns = redraws + 1 if redraws else columns
    rows = (len(tiles) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * (2.5 if not redraws else 2.0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (arr, text) in zip(axes.flat, tiles):
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(text, fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


if __name__ == "__main__":  # python -m dafusion_aug.pocket.scenes docs/img/scenes_v3.png [redraws.png]
    import sys

    save_grid(sys.argv[1] if len(sys.argv) > 1 else "scenes.png")
    if len(sys.argv) > 2:
        save_grid(sys.argv[2], count=6, redraws=7)
