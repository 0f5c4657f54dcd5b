"""Helpers of :func:`dafusion_aug.fit_tokens`: prompt templates, reading the training data, checkpoints.

Checkpoints are a pair of files per saved step, both written atomically (temp file + ``os.replace``):
``checkpoint-<step>.safetensors`` (learned rows, AdamW moments and step, the sampling generator's state as
a uint8 tensor, the loss history) and ``checkpoint-<step>.json`` (step, config digest, readable config),
written second so that a JSON file always names a complete tensor file. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._hashing import image_digest, stable_digest
from ._images import to_canonical
from ._io import atomic_path, atomic_write_bytes
from .errors import DafusionError

__all__ = ["FitError", "IMAGENET_TEMPLATES", "TrainingData", "open_training_data", "read_training_data", "save_checkpoint", "load_checkpoint", "clear_checkpoints"]

CHECKPOINT_FORMAT = "dafusion-aug/fit-checkpoint/1"
_CKPT_RE = re.compile(r"^checkpoint-(\d{8})\.json$")
_KEEP_CHECKPOINTS = 2

#: The object templates of the diffusers textual-inversion example (``imagenet_templates_small``).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


class FitError(DafusionError, ValueError):
    """``fit_tokens`` cannot run as asked: bad training data, initializer, tokens, or checkpoint."""


class TrainingData:
    """What was read from the training data: labels, class names, image count and a digest of pixels + labels."""

    def __init__(self, labels: list[int], class_names: list[str], digest: str) -> None:
        self.labels = labels
        self.class_names = class_names
        self.digest = digest


def _as_dataset(data: Any):
    from .data import image_folder

    if isinstance(data, (str, os.PathLike)):
        return image_folder(data)
    if isinstance(data, (list, tuple)):
        for i, item in enumerate(data):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise TypeError(f"data[{i}] must be a (path or PIL image, label) pair, got {item!r}"[:300])
        return list(data)  # paths are opened by _image_array, labels may be ints or class names
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return data
    raise TypeError(
        "data must be a folder path, a list of (path or PIL image, label) pairs, or a map-style dataset of "
        f"(image, label), got {type(data).__name__}"
    )


def _where(ds: Any, i: int) -> str:
    items = ds if isinstance(ds, list) else getattr(ds, "items", None) or getattr(ds, "samples", None)
    try:
        src = items[i][0] if items is not None else None
    except (IndexError, TypeError, KeyError):
        src = None
    return repr(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else f"data[{i}]"


def _image_array(image: Any, where: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.dtype != np.uint8:
            raise TypeError(f"{where}: a numpy image must be uint8 (H, W[, 1|3|4]), got {arr.dtype} {arr.shape}")
        arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]
        return np.ascontiguousarray(arr)
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if not isinstance(image, (Image.Image, torch.Tensor)):
        raise TypeError(f"{where}: the image must be a PIL image, a tensor, a uint8 array or a path, got {type(image).__name__}")
    arrays, _ = to_canonical(image, where)
    if len(arrays) != 1:
        raise ValueError(f"{where}: expected one image, got a batch of {len(arrays)}")
    return arrays[0]


def _label_index(label: Any, names: Sequence[str], where: str) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, np.generic):
        label = label.item()
    if isinstance(label, str):
        if label not in names:
            raise FitError(f"the label {label!r} of {where} is not one of class_names {list(names)}")
        return list(names).index(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise TypeError(f"the label of {where} must be an int class index or a class name, got {type(label).__name__}: {label!r}")
    if not 0 <= label < len(names):
        raise FitError(f"the label {label} of {where} is outside class_names (valid labels: 0..{len(names) - 1}, {len(names)} classes)")
    return label


def open_training_data(data: Any, class_names: Sequence[str] | None) -> tuple[Any, list[str]]:
    """The dataset behind ``data`` and its class names, checked (no image is read yet)."""
    ds = _as_dataset(data)
    names = class_names
    if names is None:
        names = getattr(ds, "class_names", None) or getattr(ds, "classes", None)
    if names is None:
        raise ValueError(f"class_names is required: data ({type(data).__name__}) has no .class_names or .classes attribute")
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names must be a non-empty list of non-empty str, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    if len(ds) == 0:
        raise FitError(f"data is empty ({type(data).__name__} with 0 images); fit_tokens needs at least one image per class")
    return ds, names


def read_training_data(ds: Any, names: list[str], consume: Callable[[np.ndarray], None]) -> TrainingData:
    """Decode every image once, in order, handing each to ``consume``; check labels and classes on the way.

    Only labels and digests are kept, so memory does not grow with the images' size.
    """
    labels: list[int] = []
    digests: list[str] = []
    for i in range(len(ds)):
        where = _where(ds, i)
        try:
            sample = ds[i]
            if not isinstance(sample, (tuple, list)) or len(sample) < 2:
                raise TypeError(f"{where} must be an (image, label) sample, got {type(sample).__name__}")
            arr = _image_array(sample[0], where)
        except (TypeError, FitError):
            raise
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, ...: name the file in any case
            raise FitError(f"cannot read the training image {where}: {e}") from e
        labels.append(_label_index(sample[1], names, where))
        digests.append(image_digest(arr))
        consume(arr)
    counts = np.bincount(np.asarray(labels), minlength=len(names))
    empty = [f"{names[k]!r} (label {k})" for k in range(len(names)) if counts[k] == 0]
    if empty:
        raise FitError(f"class {', '.join(empty)} has no images in data; every class in class_names needs at least one")
    return TrainingData(labels, names, stable_digest("fit-data", names, list(zip(digests, labels))))


# -- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(folder: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` (tensors, then the JSON that names them) and drop all but the newest two."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"checkpoint-{step:08d}"
    tensor_path, json_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "config_digest": info["config_digest"]}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(tensor_path, suffix=".safetensors") as tmp:
        save_file(cpu, tmp, metadata=meta)
    doc = dict(info, format=CHECKPOINT_FORMAT, step=step, tensors=tensor_path.name)
    atomic_write_bytes(json_path, json.dumps(doc, indent=1, default=str).encode("utf-8"), suffix=".json")
    for old in _list_checkpoints(folder)[_KEEP_CHECKPOINTS:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return json_path


def clear_checkpoints(folder: str | os.PathLike) -> None:
    """Delete the checkpoints in ``folder`` (a run that starts over must not leave older, later steps behind)."""
    for old in _list_checkpoints(Path(folder)):
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def _list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint JSON files, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _config_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]
    return "; ".join(diffs)[:1500] or "the config digest differs"


def load_checkpoint(folder: str | os.PathLike, config_digest: str, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Return ``(info, tensors)`` of the newest checkpoint in ``folder``, or ``None`` when it holds none.

    Raises:
        FitError: the newest checkpoint was written for other data or hyper-parameters, or is unreadable.
    """
    from safetensors import SafetensorError, safe_open

    paths = _list_checkpoints(Path(folder))
    if not paths:
        return None
    json_path = paths[0]
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {info.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    except (OSError, ValueError) as e:
        raise FitError(f"checkpoint {str(json_path)!r} is unreadable: {e}; delete it or pass resume=False") from e
    if info.get("config_digest") != config_digest:
        raise FitError(
            f"checkpoint {str(json_path)!r} was written by a run with other data or hyper-parameters "
            f"({_config_difference(info.get('config', {}), config)}); use another checkpoint_dir, "
            "or resume=False to start over (its checkpoints will then be replaced)"
        )
    tensor_path = json_path.with_name(str(info.get("tensors", "")))
    try:
        with safe_open(str(tensor_path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FitError(f"checkpoint tensors {str(tensor_path)!r} are unreadable: {e}; delete the checkpoint or pass resume=False") from e
    if meta.get("config_digest") != config_digest or meta.get("step") != str(info.get("step")):
        raise FitError(f"checkpoint {str(tensor_path)!r} does not match {str(json_path)!r}; delete them or pass resume=False")
    return info, tensors
