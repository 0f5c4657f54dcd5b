"""Stable hashes: the same inputs give the same digest on every process, machine and run.

Cache keys, variant seeds, fingerprints and the names of cached token and erasure files are built from
these functions, so their output never changes within a format version. Public so that scripts can name
their own files the same way and compute an image's cache key (``aug.cache_key(image_digest(rgb), label, v)``).

Example:
    >>> stable_digest("a", 1) == stable_digest("a", 1)
    True
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

__all__ = ["stable_hash", "stable_digest", "image_digest", "file_digest"]


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return repr(float(obj))
    return repr(obj)


def stable_digest(*parts: Any) -> str:
    """sha256 hex digest of a JSON rendering of ``parts`` (never Python's salted ``hash``)."""
    payload = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def stable_hash(*parts: Any) -> int:
    """A non-negative 63-bit integer derived from :func:`stable_digest` (fits ``torch.Generator.manual_seed``)."""
    return int(stable_digest(*parts)[:16], 16) & ((1 << 63) - 1)


def image_digest(rgb: np.ndarray) -> str:
    """Digest of canonical pixels: an ``(H, W, 3)`` uint8 array, shape included.

    This is the ``digest`` of :meth:`dafusion_aug.DiffusionAugment.cache_key` and ``variant``; a PIL RGB
    image's pixels are ``np.asarray(image)``.

    Raises:
        ValueError: ``rgb`` is not an ``(H, W, 3)`` uint8 array.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image_digest expects an (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    h = hashlib.sha256()
    h.update(f"rgb8:{rgb.shape[0]}x{rgb.shape[1]}:".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
