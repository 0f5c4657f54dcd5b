"""Classifiers of the few-shot protocol: what is trained, with which standard augmentation, how long, and
how it is scored (class-balanced accuracy).

A :class:`ClassifierSpec` bundles a model builder, the input size, the standard augmentation (applied by
every method alike, on a float batch) and the optimisation budget. Two are built in: ``"small-cnn"`` for
32x32 images (the pocket digits) and ``"resnet50"``, DA-Fusion's frozen ImageNet ResNet-50 with a trained
linear head (its weights come from torchvision, which downloads them once).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .._images import to_canonical
from ..hashing import image_digest, stable_digest
from ..mixing import one_hot

__all__ = [
    "ClassifierSpec",
    "small_cnn",
    "resnet50_linear",
    "random_affine",
    "random_colour",
    "compose",
    "scene_augmentation",
    "random_crop_flip",
    "resolve_classifier",
    "train_classifier",
    "to_input",
    "Inputs",
    "evaluate",
]

BatchAugment = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What the protocol trains for every (method, k, seed), identically across methods.

    Args:
        name: a short name recorded with the results.
        build: ``num_classes -> nn.Module`` taking float ``(B, 3, S, S)`` in [0, 1] and returning logits.
        image_size: S, the side images are resized to (bilinear) before the model.
        standard_augmentation: ``float (B, 3, S, S) -> same``, drawn from the global torch RNG; applied in
            training only, after the diffusion augmentation, for every method (``None``: none).
        steps: optimiser steps (the same budget for every method).
        batch_size: images per step (drawn with replacement from the few-shot set).
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> spec = small_cnn(steps=300)
        >>> spec.image_size
        32
    """

    name: str
    build: Callable[[int], nn.Module]
    image_size: int
    standard_augmentation: BatchAugment | None = None
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for field in ("image_size", "steps", "batch_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{field} must be an int >= 1, got {v!r}")
        if not callable(self.build):
            raise TypeError(f"build must be callable (num_classes -> nn.Module), got {type(self.build).__name__}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")


# -- standard augmentations (batch-wise, global RNG) --------------------------------------------------
def random_affine(degrees: float = 10.0, scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.1,
                  padding: str = "zeros") -> BatchAugment:
    """Per-image random rotation, zoom and shift: the standard augmentation for digits.

    ``padding`` fills the borders as ``grid_sample``'s ``padding_mode`` does: ``"zeros"`` (black, right
    for white-on-black digits) or ``"reflection"`` / ``"border"`` (for pictures with a background).
    """
    if padding not in ("zeros", "reflection", "border"):
        raise ValueError(f"padding must be 'zeros', 'reflection' or 'border', got {padding!r}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        angle = (torch.rand(b) * 2 - 1) * degrees * math.pi / 180.0
        zoom = torch.rand(b) * (scale[1] - scale[0]) + scale[0]
        tx, ty = (torch.rand(b) * 2 - 1) * shift, (torch.rand(b) * 2 - 1) * shift
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

    return apply


def random_colour(shuffle: bool = True, grey: float = 0.3, brightness: tuple[float, float] = (0.7, 1.3)) -> BatchAugment:
    """Per-image colour augmentation: a random permutation of the channels, greyscale (ITU-R 601 luma) with
    probability ``grey``, and a brightness factor drawn from ``brightness`` (results clipped to [0, 1])."""
    if not 0.0 <= grey <= 1.0:
        raise ValueError(f"grey must be a probability in [0, 1], got {grey!r}")
    if not 0.0 < brightness[0] <= brightness[1]:
        raise ValueError(f"brightness must be a range (low, high) with 0 < low <= high, got {brightness!r}")
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if shuffle:
            order = torch.argsort(torch.rand(b, 3), dim=1)
            x = torch.gather(x, 1, order[:, :, None, None].expand_as(x))
        if grey > 0:
            to_grey = (torch.rand(b) < grey).view(b, 1, 1, 1)
            x = torch.where(to_grey, (x * luma.to(x.dtype)).sum(1, keepdim=True).expand_as(x), x)
        factor = torch.rand(b) * (brightness[1] - brightness[0]) + brightness[0]
        return (x * factor.view(b, 1, 1, 1).to(x.dtype)).clamp(0.0, 1.0)

    return apply


def compose(*augments: BatchAugment) -> BatchAugment:
    """Batch augmentations applied one after the other."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        for augment in augments:
            x = augment(x)
        return x

    return apply


def scene_augmentation() -> BatchAugment:
    """What a practitioner would use on the scene world's coloured pictures: :func:`random_affine` with
    reflected borders, then :func:`random_colour` (channel shuffle, 30 % greyscale, brightness 0.7..1.3)."""
    return compose(random_affine(padding="reflection"), random_colour())


def random_crop_flip(min_scale: float = 0.5) -> BatchAugment:
    """Per-image random resized crop (area fraction in ``[min_scale, 1]``) and horizontal flip: natural images."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        side = torch.sqrt(torch.rand(b) * (1 - min_scale) + min_scale)
        cx, cy = (torch.rand(b) * 2 - 1) * (1 - side), (torch.rand(b) * 2 - 1) * (1 - side)
        flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
        zero = torch.zeros(b)
        theta = torch.stack([torch.stack([side * flip, zero, cx], 1), torch.stack([zero, side, cy], 1)], 1)
        grid = nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return apply


# -- models -------------------------------------------------------------------------------------------
class _SmallCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2.0 - 1.0))


def small_cnn(steps: int = 300, batch_size: int = 32, learning_rate: float = 1e-3, width: int = 16, image_size: int = 32,
              colour: bool = False) -> ClassifierSpec:
    """A three-block CNN trained from scratch on small images, with :func:`random_affine` as standard augmentation.

    Args:
        steps: Adam steps.
        batch_size: images per step.
        learning_rate: Adam learning rate.
        width: channels of the first block (then 2x and 4x).
        image_size: input side; images are resized to it (16 keeps 8x8-born digits whole at a quarter of the cost).
        colour: use :func:`scene_augmentation` (affine and colour, for the scene world's pictures) instead.

    Returns:
        A :class:`ClassifierSpec` named ``"small-cnn"`` (``"small-cnn-colour"`` with ``colour``, so the
        protocol's rows of the two never mix).
    """
    name, augment = ("small-cnn-colour", scene_augmentation()) if colour else ("small-cnn", random_affine())
    return ClassifierSpec(
        name, functools.partial(_SmallCNN, width=width), image_size, augment, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate,
    )


class _FrozenBackboneLinear(nn.Module):
    """A frozen feature extractor (always in eval mode) and a trained linear head."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> _FrozenBackboneLinear:
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm statistics, as in the paper
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone((x - self.mean) / self.std)
        return self.head(feats)


def resnet50_linear(steps: int = 1000, batch_size: int = 32, learning_rate: float = 1e-4, weights: Any = "DEFAULT") -> ClassifierSpec:
    """DA-Fusion's classifier: a frozen ImageNet ResNet-50 (torchvision) and a linear head, Adam 1e-4, at 224x224.

    Args:
        steps: Adam steps of the head (the paper trains 50 epochs; here the budget is in steps, equal for
            every method).
        batch_size: images per step.
        learning_rate: Adam learning rate (the paper's 1e-4).
        weights: torchvision weights name or enum (``"DEFAULT"`` downloads ImageNet weights once into the
            torch hub cache); ``None`` builds random weights (tests only).

    Returns:
        A :class:`ClassifierSpec` named ``"resnet50"`` with :func:`random_crop_flip` as standard augmentation.
    """

    def build(num_classes: int) -> nn.Module:
        from torchvision.models import resnet50

        net = resnet50(weights=weights)
        net.fc = nn.Identity()
        return _FrozenBackboneLinear(net, 2048, num_classes)

    return ClassifierSpec("resnet50", build, 224, random_crop_flip(), steps=steps, batch_size=batch_size, learning_rate=learning_rate)


def resolve_classifier(classifier: str | ClassifierSpec) -> ClassifierSpec:
    """``"small-cnn"``, ``"resnet50"`` or a :class:`ClassifierSpec` -> a :class:`ClassifierSpec`."""
    if isinstance(classifier, ClassifierSpec):
        return classifier
    if classifier == "small-cnn":
        return small_cnn()
    if classifier == "resnet50":
        return resnet50_linear()
    raise ValueError(f"classifier must be 'small-cnn', 'resnet50' or a ClassifierSpec, got {classifier!r}")


# -- training and evaluation --------------------------------------------------------------------------
def to_input(images: Sequence[Any], size: int) -> torch.Tensor:
    """PIL images or uint8 ``(H, W, 3)`` arrays -> float ``(B, 3, size, size)`` in [0, 1]."""
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.array(im)
        else:
            arr = np.asarray(im)
            if arr.shape[:2] != (size, size):
                arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
        out.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))
    return torch.stack(out).float().div_(255.0)


def batch_targets(labels: Sequence[Any], real: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The loss targets of a batch of augmented samples' labels: the class indices ``real`` when every label
    is still a class index (so a method that never mixes labels trains exactly as before), else one
    ``(B, num_classes)`` float row per sample (soft labels as they are, class indices one-hot).

    Raises:
        ValueError: a soft label of another length than ``num_classes``.
    """
    if not any(isinstance(y, torch.Tensor) and y.is_floating_point() for y in labels):
        return real
    rows = []
    for y, r in zip(labels, real.tolist()):
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            if y.shape != (num_classes,):
                raise ValueError(f"a soft label must have shape ({num_classes},), got {tuple(y.shape)}")
            rows.append(y.float())
        else:
            rows.append(one_hot(r, num_classes))
    return torch.stack(rows)


def train_classifier(
    spec: ClassifierSpec,
    samples: Sequence[tuple[Any, int]],
    num_classes: int,
    augment: Callable[[Any], Any] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``spec``'s model on ``samples`` for ``spec.steps`` steps; every draw comes from the global torch RNG.

    Args:
        spec: the classifier and its budget.
        samples: the few-shot training set, ``(PIL image or uint8 array, label)`` pairs.
        num_classes: outputs of the model.
        augment: applied to each ``(image, label)`` sample before the standard augmentation (e.g. a
            ``DiffusionAugment`` reading its cache); ``None`` for the baseline. The labels it returns are
            trained on: class indices, or soft labels (``target="other-class"``'s float vectors, as
            ``v2.MixUp`` returns them), which ``cross_entropy`` reads as class probabilities.
        device: where to train.

    Returns:
        The trained model, in eval mode.
    """
    model = spec.build(num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    labels_all = torch.tensor([int(y) for _, y in samples])
    model.train()
    for _ in range(spec.steps):
        idx = torch.randint(len(samples), (spec.batch_size,)).tolist()
        batch = [samples[i] if augment is None else augment(samples[i]) for i in idx]
        x = to_input([b[0] for b in batch], spec.image_size)
        if spec.standard_augmentation is not None:
            x = spec.standard_augmentation(x)
        target = labels_all[idx] if augment is None else batch_targets([b[1] for b in batch], labels_all[idx], num_classes)
        loss = nn.functional.cross_entropy(model(x.to(device)), target.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


# -- scoring ------------------------------------------------------------------------------------------
class Inputs:
    """Lazy access to a dataset of ``(image, label)``: labels, items, and classifier inputs (memoised when small).

    Args:
        dataset: map-style, ``(image, label, ...)`` items; ``.targets`` is used for labels when present.
        size: the classifier's input side.
        memo_limit: datasets up to this length keep their converted inputs in memory.
    """

    def __init__(self, dataset: Any, size: int, memo_limit: int = 4096) -> None:
        self.dataset, self.size = dataset, size
        targets = getattr(dataset, "targets", None)
        if targets is None or len(targets) != len(dataset):
            targets = [dataset[i][1] for i in range(len(dataset))]
        self.labels = [int(y) for y in targets]
        self._memo: dict[int, Any] | None = {} if len(dataset) <= memo_limit else None

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, i: int) -> tuple[Any, int]:
        image, label, *_ = self.dataset[int(i)]
        return image, int(label)

    def tensor(self, indices: Sequence[int]):
        """Float ``(N, 3, size, size)`` inputs of ``indices``."""
        if self._memo is None:
            return to_input([self.item(i)[0] for i in indices], self.size)
        todo = [i for i in indices if i not in self._memo]
        if todo:
            for i, x in zip(todo, to_input([self.item(i)[0] for i in todo], self.size)):
                self._memo[i] = x
        return torch.stack([self._memo[i] for i in indices])

    def digest(self) -> str:
        """A digest of every image's pixels and every label (one pass over the data)."""
        return stable_digest([image_digest(to_canonical(self.item(i)[0])[0][0]) for i in range(len(self))], self.labels)


def evaluate(model: Any, inputs: Inputs, indices: Sequence[int], num_classes: int, device: Any, batch_size: int = 256) -> float:
    """Class-balanced accuracy of ``model`` on ``indices`` of ``inputs``, streamed in batches."""
    model.eval()
    preds: list[int] = []
    with torch.no_grad():
        for i in range(0, len(indices), batch_size):
            preds.extend(model(inputs.tensor(indices[i : i + batch_size]).to(device)).argmax(1).tolist())
    y = np.asarray([inputs.labels[i] for i in indices])
    pred = np.asarray(preds)
    return float(np.mean([(pred[y == c] == c).mean() for c in range(num_classes) if (y == c).any()]))
