"""Variant filters: keep only variants that still show their class (Real Guidance, ALIA, Diff-Mix).

A filter is a callable ``filter(images, labels)``: ``images`` are the generated variants (RGB uint8
``(H, W, 3)`` arrays at the input's size), ``labels`` their labels; it returns a keep mask (bools) or
scores (numbers, kept when ``>= threshold``), one per image. A rejected variant is generated again with a
seed derived from its own (:func:`retry_seed`), up to ``max_tries`` generations in all; a variant rejected
every time falls back to the real image (``fallback="real"``) or to its best-scoring try (``"best"``;
with a keep-mask filter, the first try). Same inputs, same tries, same accepted picture.

Built in: :class:`ClassifierFilter` (any torch classifier: the probability of the label) and
:class:`CLIPFilter` (CLIP zero-shot confidence of the label among the class names, through transformers).

Example:
    >>> keep_bright = lambda images, labels: [img.mean() > 20 for img in images]
    >>> check_filter(keep_bright, None, 3, "real")
    (None, 3, 'real')
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ._checks import check_int
from .errors import FilterError
from .fingerprints import fingerprint_callable
from .hashing import stable_digest, stable_hash

__all__ = ["ClassifierFilter", "CLIPFilter", "FALLBACKS", "check_filter", "filter_fingerprint", "retry_seed",
           "judge", "filter_variants"]

#: What a variant rejected ``max_tries`` times becomes: the real image, or its best-scoring try.
FALLBACKS = ("real", "best")


def _threshold(value: Any, name: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def check_filter(filter: Any, threshold: Any, max_tries: Any, fallback: Any) -> tuple[float | None, int, str]:
    """``(threshold, max_tries, fallback)`` of a transform's filter, checked (``threshold`` defaults to the
    filter's own ``.threshold``, else ``None``: the filter must then return a keep mask).

    Raises:
        TypeError: ``filter`` is not callable, or ``max_tries`` is not an int.
        ValueError: a threshold that is not finite (or outside [0, 1] for a built-in filter), ``max_tries < 1``,
            an unknown fallback, or a filter that cannot be part of a cache key (see :func:`filter_fingerprint`).
    """
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be a callable (images, labels) -> keep mask or scores, got {type(filter).__name__}: {filter!r}")
    if filter is not None and not callable(getattr(filter, "fingerprint", None)):
        fingerprint_callable(filter, "filter")  # refused here, not at the first sample
    if threshold is None:
        threshold = getattr(filter, "threshold", None)
    if threshold is not None:
        bounded = isinstance(filter, (ClassifierFilter, CLIPFilter))
        threshold = _threshold(threshold, "filter_threshold", *((0.0, 1.0) if bounded else (None, None)))
    max_tries = check_int(max_tries, "max_tries", minimum=1)
    if fallback not in FALLBACKS:
        raise ValueError(f"filter_fallback must be one of {FALLBACKS}, got {fallback!r}")
    return threshold, max_tries, fallback


def filter_fingerprint(filter: Callable, threshold: float | None, max_tries: int, fallback: str) -> tuple:
    """What decides a filtered variant besides its generation: the filter, the threshold, ``max_tries`` and
    the fallback.

    The filter counts by its own ``fingerprint()`` when it has one (the built-in filters: their weights),
    else by :func:`~dafusion_aug.fingerprints.fingerprint_callable`: its code, and the values it closes
    over and reads (a model by its weights, a module-level threshold by its value).

    Raises:
        ValueError: the filter reads a value with no stable digest (a lock, a ``torch.Generator``, an
            object whose state is not in its attributes) and has no ``fingerprint()``: a key that ignored
            it could serve another filter's variants.
    """
    if hasattr(filter, "fingerprint") and callable(filter.fingerprint):
        fp = filter.fingerprint()
    else:
        fp = fingerprint_callable(filter, "filter")
    return ("filter", fp, threshold, max_tries, fallback)


def retry_seed(seed: int, attempt: int) -> int:
    """The generator seed of try ``attempt`` (0 = the variant's own seed) of a variant."""
    return int(seed) if attempt == 0 else stable_hash(int(seed), "filter-retry", int(attempt))


def judge(filter: Callable, images: Sequence[np.ndarray], labels: Sequence[Any], threshold: float | None,
          names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, scores)`` of ``images`` by ``filter``; ``names`` say which sample each image is, for errors.

    Raises:
        FilterError: the filter raised (the message names the first sample it raises on), returned another
            number of results than images, returned scores without a threshold, or returned NaN.
    """
    if not images:
        return np.zeros(0, bool), np.zeros(0)
    try:
        raw = filter(list(images), list(labels))
    except Exception as e:
        bad = _first_raising(filter, images, labels)
        where = names[bad] if bad is not None else f"a batch of {len(images)} ({', '.join(names[:3])}, ...)"
        raise FilterError(f"filter {filter!r} raised on {where}: {type(e).__name__}: {e}"[:600]) from e
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    out = np.asarray(raw)
    if out.shape != (len(images),):
        raise FilterError(f"filter {filter!r} must return one keep flag or score per image ({len(images)}), got "
                          f"{'shape ' + str(out.shape) if out.ndim else repr(raw)}"[:400])
    if out.dtype == bool:
        return out, out.astype(float)
    if not np.issubdtype(out.dtype, np.number):
        raise FilterError(f"filter {filter!r} must return bools or numbers, got dtype {out.dtype}")
    if threshold is None:
        raise FilterError(f"filter {filter!r} returned scores, so it needs a threshold: pass filter_threshold=")
    scores = out.astype(float)
    if np.isnan(scores).any():
        raise FilterError(f"filter {filter!r} returned NaN for {names[int(np.flatnonzero(np.isnan(scores))[0])]}")
    return scores >= threshold, scores


def _first_raising(filter: Callable, images: Sequence[np.ndarray], labels: Sequence[Any]) -> int | None:
    """The first image the filter raises on when called on it alone (``None`` if only the batch raises)."""
    for i in range(len(images)):
        try:
            filter([images[i]], [labels[i]])
        except Exception:
            return i
    return None


def _to_batch(images: Sequence[np.ndarray], transform: Callable | None) -> torch.Tensor:
    if transform is not None:
        from PIL import Image

        return torch.stack([transform(Image.fromarray(img)) for img in images])
    return torch.stack([torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) for img in images]).float().div_(255.0)


def _class_labels(labels: Sequence[Any], who: str) -> torch.Tensor:
    for y in labels:
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
            raise ValueError(f"{who} needs one class index per image, got label {y!r}")
    return torch.as_tensor([int(y) for y in labels])


class ClassifierFilter:
    """Score each variant by a torch classifier's probability of its label (ALIA's filter).

    Args:
        model: any ``nn.Module`` mapping a float ``(B, C, H, W)`` batch to class logits; run in eval mode,
            without gradients, on its own device.
        transform: maps one variant (a PIL image) to the model's input tensor ``(C, H, W)``; default: the RGB
            pixels as floats in [0, 1].
        threshold: keep a variant when its label's softmax probability is ``>= threshold``, in [0, 1].
        batch_size: images per forward pass.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``threshold`` outside [0, 1].

    Example:
        >>> from dafusion_aug import pocket  # doctest: +SKIP
        >>> DiffusionAugment("pocket", ..., filter=ClassifierFilter(pocket.judge(), threshold=0.5))  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, transform: Callable | None = None, threshold: float = 0.5,
                 batch_size: int = 256) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module classifier, got {type(model).__name__}")
        self.model, self.transform = model, transform
        self.threshold = _threshold(threshold, "threshold", 0.0, 1.0)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], labels: Sequence[Any]) -> np.ndarray:
        y = _class_labels(labels, "ClassifierFilter")
        was_training = self.model.training
        self.model.eval()
        try:
            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            probs = []
            for a in range(0, len(images), self.batch_size):
                batch = _to_batch(images[a : a + self.batch_size], self.transform).to(device)
                probs.append(torch.softmax(self.model(batch).float(), dim=-1).cpu())
            p = torch.cat(probs)
        finally:
            self.model.train(was_training)
        if int(y.max()) >= p.shape[1]:
            raise ValueError(f"ClassifierFilter's model has {p.shape[1]} classes, got label {int(y.max())}")
        return p[torch.arange(len(y)), y].numpy()

    def fingerprint(self) -> str:
        """The model's class and weights, the transform and the threshold."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        transform = None if self.transform is None else fingerprint_callable(self.transform, "ClassifierFilter's transform")
        return stable_digest("ClassifierFilter", type(self.model).__qualname__, h.hexdigest(), transform, self.threshold)

    def __repr__(self) -> str:
        return f"ClassifierFilter({type(self.model).__name__}, threshold={self.threshold})"


_CLIP: dict[tuple, Any] = {}  # (model, device) -> (model, processor): loaded once per process


class CLIPFilter:
    """Score each variant by CLIP's zero-shot confidence in its label among the class names (Real Guidance).

    The score is the softmax over ``prompt.format(name=c)`` for every class ``c`` of CLIP's image-text
    similarities, taken at the variant's label.

    Args:
        model: a Hugging Face id (``"openai/clip-vit-base-patch32"``) or a local folder saved with
            ``save_pretrained`` (a ``CLIPModel`` and its processor); a folder is read offline
            (``local_files_only``). Loaded through transformers once per process, on first use.
        class_names: the classes, index = label.
        threshold: keep a variant when its score is ``>= threshold``, in [0, 1].
        prompt: the text of each class; ``{name}`` is the class name.
        device: where to run CLIP (default: CUDA when available, else the CPU).

    Raises:
        ValueError: ``threshold`` outside [0, 1], no class names, or a prompt without ``{name}``.
    """

    def __init__(self, model: str | os.PathLike = "openai/clip-vit-base-patch32", class_names: Sequence[str] | None = None,
                 threshold: float = 0.5, prompt: str = "a photo of a {name}", device: str | None = None) -> None:
        if not class_names or isinstance(class_names, str):
            raise ValueError(f"class_names must be a non-empty list of class names, got {class_names!r}")
        if "{name}" not in prompt:
            raise ValueError(f"prompt must contain {{name}}, got {prompt!r}")
        self.model = os.fspath(model)
        self.class_names, self.prompt = list(class_names), prompt
        self.threshold = _threshold(threshold, "threshold", 0.0, 1.0)
        self.device = device

    def _load(self) -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        key = (self.model, device)
        if key not in _CLIP:
            local = os.path.isdir(self.model)
            clip = CLIPModel.from_pretrained(self.model, local_files_only=local).to(device).eval()
            _CLIP[key] = (clip, CLIPProcessor.from_pretrained(self.model, local_files_only=local))
        return _CLIP[key]

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], labels: Sequence[Any]) -> np.ndarray:
        y = _class_labels(labels, "CLIPFilter")
        if int(y.max()) >= len(self.class_names):
            raise ValueError(f"CLIPFilter has {len(self.class_names)} class names, got label {int(y.max())}")
        clip, processor = self._load()
        texts = [self.prompt.format(name=c) for c in self.class_names]
        inputs = processor(text=texts, images=[np.asarray(img) for img in images], return_tensors="pt", padding=True)
        inputs = {k: v.to(clip.device) for k, v in inputs.items()}
        probs = clip(**inputs).logits_per_image.float().softmax(dim=-1).cpu()
        return probs[torch.arange(len(y)), y].numpy()

    def fingerprint(self) -> str:
        """The model (its id, or a local folder's file contents), the class texts and the threshold."""
        model = self.model
        if os.path.isdir(model):
            from .hashing import file_digest

            files = sorted(f for f in os.listdir(model) if f.endswith((".json", ".safetensors", ".txt", ".bin")))
            model = stable_digest([(f, file_digest(os.path.join(model, f))) for f in files])
        return stable_digest("CLIPFilter", model, [self.prompt.format(name=c) for c in self.class_names], self.threshold)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()  # the loaded model lives in the process-wide table, never pickled

    def __repr__(self) -> str:
        return f"CLIPFilter({self.model!r}, {len(self.class_names)} classes, threshold={self.threshold})"


def filter_variants(generate: Callable[[list[int], list[Any]], list[np.ndarray | None]], filter: Callable,
                    first: list[np.ndarray | None], images: Sequence[np.ndarray], variants: Sequence[Any],
                    labels: Sequence[Any], *, threshold: float | None, max_tries: int, fallback: str,
                    counts: dict | None = None) -> list[np.ndarray | None]:
    """Filter generated variants, regenerating the rejected ones with derived seeds.

    Args:
        generate: ``generate(indices, retry_variants)`` makes the given variants of ``images[indices]``.
        filter: the filter (see the module).
        first: the first try of every variant (``None`` where generation failed: a rejected try).
        images, variants, labels: the real images, their variants (a ``Variant``) and labels.
        threshold, max_tries, fallback: as :func:`check_filter` returns them.
        counts: where to add ``accepted``, ``retried`` (extra generations) and ``fallen_back``.

    Returns:
        One picture per variant: its first accepted try, else the fallback (the real image, or the
        best-scoring try; ``None`` when no try could be generated).

    Raises:
        FilterError: see :func:`judge`.
    """
    n = len(images)
    final: list[np.ndarray | None] = [None] * n
    best: list[tuple[float, np.ndarray | None]] = [(-math.inf, None)] * n
    pending, outs = list(range(n)), list(first)
    names = [f"variant {v.key[:12]} (label {y!r}, seed {v.seed})" for v, y in zip(variants, labels)]
    stats = {"accepted": 0, "retried": 0, "fallen_back": 0}
    for attempt in range(max_tries):
        made = [i for i, out in zip(pending, outs) if out is not None]
        by_index = dict(zip(pending, outs))
        keep, scores = judge(filter, [by_index[i] for i in made], [labels[i] for i in made], threshold,
                             [names[i] for i in made])
        for i, ok, score in zip(made, keep, scores):
            if ok:
                final[i] = by_index[i]
                stats["accepted"] += 1
            elif score > best[i][0]:
                best[i] = (float(score), by_index[i])
        pending = [i for i in pending if final[i] is None]
        if not pending or attempt + 1 == max_tries:
            break
        stats["retried"] += len(pending)
        outs = generate(pending, [variants[i]._replace(seed=retry_seed(variants[i].seed, attempt + 1)) for i in pending])
    for i in pending:
        stats["fallen_back"] += 1
        final[i] = np.array(images[i], copy=True) if fallback == "real" else best[i][1]
    if counts is not None:
        for k, v in stats.items():
            counts[k] = counts.get(k, 0) + v
    return final
