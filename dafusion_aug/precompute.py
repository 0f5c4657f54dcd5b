"""Batched pre-generation of every (image, variant) pair into the cache.

One pass over the dataset: variants already cached are skipped, the rest wait in one bucket per strength,
and a full bucket becomes one pipeline call. Encoding and writing run in a thread pool, so the model
does not wait for PNG encoding. Every entry is written atomically, so a run killed at any moment leaves
only whole files, and a rerun generates only what is missing.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from ._hashing import image_digest
from ._images import is_image_leaf, to_canonical

if TYPE_CHECKING:
    from .transform import DiffusionAugment, Variant

__all__ = ["precompute"]


def _split_item(augment: DiffusionAugment, item: Any) -> tuple[Any, Any]:
    labels = augment._labels_getter(item) if augment._labels_getter is not None else None
    if isinstance(item, (tuple, list)):
        leaves = [x for x in item if is_image_leaf(x)] or [x for x in item if x is not labels and hasattr(x, "ndim")]
    elif isinstance(item, dict):
        leaves = [x for x in item.values() if is_image_leaf(x)]
    else:
        leaves = [item]
    if not leaves:
        raise ValueError(f"dataset items must hold an image (PIL or tensor), got {type(item).__name__}")
    return leaves[0], labels


def precompute(
    augment: DiffusionAugment,
    dataset: Any,
    *,
    backend: str = "local",
    batch_size: int = 16,
    progress: bool = True,
    encode_threads: int = 2,
) -> dict[str, Any]:
    """Generate and cache all ``len(dataset) * augment.num_variants`` variants.

    Args:
        augment: the transform whose variants to fill (it must have a cache).
        dataset: a map-style dataset of ``(image, label)`` (or anything ``augment``'s ``labels_getter`` reads).
        backend: ``"local"`` (this process).
        batch_size: images per pipeline call; calls are grouped by strength.
        progress: show a tqdm bar (images/s).
        encode_threads: threads that encode and write images while the model runs.

    Returns:
        Counts: ``total``, ``generated``, ``skipped`` (already cached), ``failed`` and ``failures``
        (``[(index, reason), ...]`` of items that could not be read; the run continues without them).

    Raises:
        CacheError: the cache cannot be written (e.g. the disk is full); nothing half-written is left.
    """
    from tqdm.auto import tqdm

    if backend != "local":
        raise ValueError(f"backend must be 'local', got {backend!r}")
    if augment.cache is None:
        raise ValueError("precompute needs a transform with a cache (cache=...), got cache=None")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    cache = augment.cache
    cache.clean_temporaries()
    m = augment.num_variants
    total = len(dataset) * m
    counts = {"total": total, "generated": 0, "skipped": 0, "failed": 0}
    failures: list[tuple[int, str]] = []
    buckets: dict[float, list[tuple[np.ndarray, Variant]]] = defaultdict(list)
    queued: set[str] = set()
    pool = cf.ThreadPoolExecutor(max_workers=max(1, encode_threads), thread_name_prefix="dafusion-encode")
    pending: list[cf.Future] = []
    bar = tqdm(total=total, unit="img", desc="precompute", disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            pending.pop(0).result()  # re-raises CacheError (disk full) in the main thread

    def flush(strength: float) -> None:
        jobs = buckets.pop(strength, [])
        if not jobs:
            return
        outs = augment.generate([a for a, _ in jobs], [v for _, v in jobs])
        for (_, var), arr in zip(jobs, outs):
            pending.append(pool.submit(cache.put, var.key, arr))
        counts["generated"] += len(jobs)
        bar.update(len(jobs))
        drain(4 * batch_size)

    try:
        for index in range(len(dataset)):
            try:
                image, labels = _split_item(augment, dataset[index])
                arrays, _ = to_canonical(image)
            except (OSError, ValueError, TypeError) as e:
                failures.append((index, f"{type(e).__name__}: {e}"))
                counts["failed"] += m
                bar.update(m)
                continue
            label_list = augment._labels_per_sample(labels, len(arrays))
            for arr, label in zip(arrays, label_list):
                digest = image_digest(arr)
                for v in range(m):
                    key = augment.cache_key(digest, label, v)
                    if key in queued or key in cache:
                        counts["skipped"] += 1
                        bar.update(1)
                        continue
                    queued.add(key)
                    var = augment.variant(digest, label, v)
                    buckets[var.strength].append((arr, var))
                    if len(buckets[var.strength]) >= batch_size:
                        flush(var.strength)
        for strength in sorted(buckets):
            flush(strength)
        drain(0)
    except BaseException:
        for f in pending:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    elapsed = time.perf_counter() - t0
    counts["seconds"] = round(elapsed, 3)
    counts["images_per_second"] = round(counts["generated"] / elapsed, 3) if elapsed > 0 else 0.0
    result: dict[str, Any] = dict(counts)
    result["failures"] = failures
    return result

