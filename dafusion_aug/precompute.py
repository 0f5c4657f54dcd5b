"""Batched pre-generation of every (image, variant) pair into the cache, locally or on Ray Data.

One pass over the dataset plans the work: variants already cached are skipped, the rest wait in one
bucket per erasure group, and a full bucket becomes one batch: ``MIX_FACTOR * batch_size`` variants of
every strength, run by :func:`~dafusion_aug.functional.diffuse` in UNet batches of ``batch_size`` where a
finished sample makes room for the next. When the scheduler cannot mix strengths (multistep schedulers),
there is one bucket per (erasure group, strength) and a batch of ``batch_size`` is one pipeline call. The
local backend runs the batches in this process, with encoding and writing in a thread pool so the model
does not wait for PNG encoding; the Ray backend sends the same batches to actors that each load the
pipeline once. Every entry is written atomically, so a run killed at any moment leaves only whole files,
and a rerun generates only what is missing.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._denoise import loop_unsupported, scheduler_mixes, spec_scheduler
from ._hashing import image_digest
from ._images import is_image_leaf, to_canonical
from ._io import atomic_path, atomic_write_bytes
from .tokens import token_for_class

if TYPE_CHECKING:
    from .transform import DiffusionAugment, Variant

__all__ = ["precompute", "plan_batches"]

Batch = list[tuple[np.ndarray, "Variant", "int | None"]]

#: A planned batch of mixed strengths holds this many UNet batches, so that only its last few UNet calls
#: run short (the longest samples go first and the shortest fill the tail): with DA-Fusion's strengths,
#: 8 keeps about 97.5% of the UNet rows busy (4: 95.5%, 16: 99%), for 8 x batch_size images held in memory.
MIX_FACTOR = 8


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


def _source_of(dataset: Any, index: int) -> str:
    items = getattr(dataset, "items", None) or getattr(dataset, "samples", None)
    if items is not None:
        try:
            src = items[index][0]
            if isinstance(src, (str, os.PathLike)):
                return os.fspath(src)
        except (IndexError, TypeError, KeyError):
            pass
    return f"#{index}"


def mixes_strengths(augment: DiffusionAugment) -> bool:
    """Whether ``augment``'s pipeline runs strengths in shared batches (a one-step scheduler: DDIM, Euler,
    Euler-ancestral). A transform built from a model id or spec answers from the spec alone, loaded or not,
    so the Ray driver (which never loads the model) plans the same batches as the local backend."""
    if augment.spec is not None:
        return scheduler_mixes(spec_scheduler(augment.spec))
    return augment._pipe is not None and loop_unsupported(augment._pipe) is None


def plan_batches(augment: DiffusionAugment, dataset: Any, batch_size: int, counts: dict, failures: list,
                 records: list | None = None, mixed: bool = False) -> Iterator[Batch]:
    """Yield the batches still to generate, in a fixed order (the same for every backend).

    Updates ``counts`` (skipped, failed) and ``failures`` as it goes; appends one manifest record per
    (image, variant) to ``records`` when given. ``mixed``: batches of ``MIX_FACTOR * batch_size`` variants
    of any strength (per erasure group; the last one also takes the leftover, so no batch is small); else
    batches of ``batch_size`` of one strength.
    """
    cache = augment.cache
    m = augment.num_variants
    buckets: dict[tuple, Batch] = defaultdict(list)
    held: dict[tuple, Batch] = {}  # mixed: the last full batch waits, so the final leftover joins it
    queued: set[str] = set()
    limit = MIX_FACTOR * batch_size if mixed else batch_size
    for index in range(len(dataset)):
        try:
            image, labels = _split_item(augment, dataset[index])
            arrays, _ = to_canonical(image)
            label_list = augment._labels_per_sample(labels, len(arrays))
        except (OSError, ValueError, TypeError) as e:
            failures.append((index, f"{type(e).__name__}: {e}"))
            counts["failed"] += m
            continue
        for arr, label in zip(arrays, label_list):
            digest = image_digest(arr)
            for v in range(m):
                key = augment.cache_key(digest, label, v)
                if records is not None:
                    records.append((index, label, v, digest))
                if key in queued or key in cache:
                    counts["skipped"] += 1
                    continue
                queued.add(key)
                var = augment.variant(digest, label, v)
                group = (label if augment.erasure_group(label) is not None else -1, 0.0 if mixed else var.strength)
                buckets[group].append((arr, var, label))
                if len(buckets[group]) < limit:
                    continue
                if not mixed:
                    yield buckets.pop(group)
                    continue
                if group in held:
                    yield held.pop(group)
                held[group] = buckets.pop(group)
    for group in sorted(set(buckets) | set(held)):
        yield held.pop(group, []) + buckets.pop(group, [])


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _generate(augment: DiffusionAugment, batch: Batch, batch_size: int, mixed: bool | None) -> list[np.ndarray | None]:
    return augment.generate([a for a, _, _ in batch], [v for _, v, _ in batch], [lab for _, _, lab in batch],
                            batch_size=batch_size, mixed_strengths=mixed)


def _generate_backing_off(augment: DiffusionAugment, batch: Batch, state: dict,
                          mixed: bool | None) -> list[np.ndarray | None]:
    """Generate ``batch`` in UNet batches of ``state['chunk']``, halving the chunk on CUDA out-of-memory."""
    while True:
        try:
            return _generate(augment, batch, state["chunk"], mixed)
        except Exception as e:
            if not _is_oom(e) or state["chunk"] == 1:
                raise
            state["chunk"] = max(1, state["chunk"] // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _run_local(augment, batches: Iterator[Batch], counts: dict, bar, encode_threads: int, auto: bool, batch_size: int,
               mixed: bool | None) -> None:
    cache = augment.cache
    pool = cf.ThreadPoolExecutor(max_workers=max(1, encode_threads), thread_name_prefix="dafusion-encode")
    pending: list[cf.Future] = []
    state = {"chunk": batch_size}

    def drain(limit: int) -> None:
        while len(pending) > limit:
            pending.pop(0).result()  # re-raises CacheError (disk full) here, in the main thread

    try:
        for batch in batches:
            if auto:
                outs = _generate_backing_off(augment, batch, state, mixed)
            else:
                outs = _generate(augment, batch, batch_size, mixed)
            for (_, var, _), arr in zip(batch, outs):
                if arr is None:  # NaN or black even in fp32: never cached
                    counts["bad_outputs"] += 1
                    continue
                pending.append(pool.submit(cache.put, var.key, arr))
                counts["generated"] += 1
            bar.update(len(batch))
            drain(4 * batch_size)
        drain(0)
    except BaseException:
        for f in pending:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
        if auto:
            counts["batch_size"] = state["chunk"]


def _export(augment: DiffusionAugment, dataset: Any, out: Path, records: list) -> int:
    """Copy every cached variant into ``out/<label>-<slug>/<index>_v<v>.png`` and write ``manifest.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    names = augment.class_names
    lines = []
    written = 0
    for index, label, v, digest in records:
        var = augment.variant(digest, label, v)
        src = augment.cache.path(var.key)
        if not src.is_file():
            continue
        if label is None:
            folder = "unlabelled"
        else:
            slug = token_for_class(names[label], label).strip("<>") if names else "class"
            folder = f"{label:03d}-{slug}"
        rel = Path(folder) / f"{index:06d}_v{v:02d}{src.suffix}"
        dst = out / rel
        if not dst.is_file():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        written += 1
        lines.append(json.dumps({
            "file": rel.as_posix(), "source": _source_of(dataset, index), "index": index, "label": label,
            "class_name": names[label] if names and label is not None else None, "variant": v,
            "strength": var.strength, "seed": var.seed, "prompt": var.prompt, "key": var.key,
        }))
    atomic_write_bytes(out / "manifest.jsonl", ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return written


def precompute(
    augment: DiffusionAugment,
    dataset: Any,
    *,
    backend: str = "local",
    batch_size: int | str = 16,
    progress: bool = True,
    encode_threads: int = 2,
    out: str | os.PathLike | None = None,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    mixed_strengths: bool | None = None,
) -> dict[str, Any]:
    """Generate and cache all ``len(dataset) * augment.num_variants`` variants.

    Args:
        augment: the transform whose variants to fill (it must have a cache).
        dataset: a map-style dataset of ``(image, label)`` (or anything ``augment``'s ``labels_getter`` reads).
        backend: ``"local"`` (this process) or ``"ray"`` (Ray Data actors; ``pip install "dafusion-aug[ray]"``).
        batch_size: images per UNet call (per pipeline call where calls are grouped by strength; never more
            than the transform's own ``batch_size``), or ``"auto"``: start at 64 on CUDA (16 on CPU) and halve
            on out-of-memory.
        progress: show a progress bar (images/s).
        encode_threads: threads that encode and write images while the model runs (local backend).
        out: also write an ImageFolder-style copy of every variant plus ``manifest.jsonl`` (source, label,
            variant, strength, seed, prompt, cache key) into this folder.
        concurrency: number of Ray actors (default: the number of GPUs, or 2 on CPU).
        num_gpus: GPUs per Ray actor (default 1 when CUDA is available, else 0).
        mixed_strengths: ``None`` (default): variants of every strength share UNet batches when the
            scheduler allows it (DDIM, Euler, Euler-ancestral), else batches are grouped by strength;
            ``False``: group by strength and make one diffusers pipeline call per batch (the path of earlier
            versions, for comparison); ``True``: require shared batches (``ValueError`` from
            :func:`~dafusion_aug.diffuse` otherwise).

    Returns:
        Counts: ``total``, ``generated``, ``skipped`` (already cached), ``failed`` (variants of items that
        could not be read), ``bad_outputs`` (NaN/black even in fp32, not cached), ``failures``
        (``[(index, reason), ...]``; the run goes on without them), ``seconds`` and ``images_per_second``.

    Raises:
        CacheError: the cache cannot be written (e.g. the disk is full); nothing half-written is left.
        ImportError: ``backend="ray"`` without Ray installed.

    Example:
        >>> aug = DiffusionAugment("pocket", class_names=CLASS_NAMES, cache="cache/")  # doctest: +SKIP
        >>> precompute(aug, digits("B"), batch_size=16)["generated"]  # doctest: +SKIP
        3600
    """
    from tqdm.auto import tqdm

    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if augment.cache is None:
        raise ValueError("precompute needs a transform with a cache (cache=...), got cache=None")
    auto = batch_size == "auto"
    if auto:
        batch_size = 64 if torch.cuda.is_available() else 16
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
    if mixed_strengths not in (None, True, False):
        raise ValueError(f"mixed_strengths must be None, True or False, got {mixed_strengths!r}")
    if augment.batch_size is not None:
        batch_size = min(batch_size, augment.batch_size)
    mixed = mixes_strengths(augment) if mixed_strengths is None else mixed_strengths
    augment.cache.clean_temporaries()
    total = len(dataset) * augment.num_variants
    counts: dict[str, Any] = {"total": total, "generated": 0, "skipped": 0, "failed": 0, "bad_outputs": 0}
    failures: list[tuple[int, str]] = []
    records: list | None = [] if out is not None else None
    t0 = time.perf_counter()
    batches = plan_batches(augment, dataset, batch_size, counts, failures, records, mixed=mixed)
    if backend == "ray":
        from ._ray import run_ray

        run_ray(augment, batches, counts, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                progress=progress, mixed_strengths=mixed_strengths)
    else:
        with tqdm(total=total, unit="img", desc="precompute", disable=not progress, smoothing=0.1) as bar:
            done_before = 0

            def counted(it):
                nonlocal done_before
                for b in it:
                    skipped_now = counts["skipped"] + counts["failed"]
                    bar.update(skipped_now - done_before)
                    done_before = skipped_now
                    yield b
                bar.update(counts["skipped"] + counts["failed"] - done_before)

            _run_local(augment, counted(batches), counts, bar, encode_threads, auto, batch_size, mixed_strengths)
    if out is not None:
        counts["exported"] = _export(augment, dataset, Path(out), records or [])
    elapsed = time.perf_counter() - t0
    counts["seconds"] = round(elapsed, 3)
    counts["images_per_second"] = round(counts["generated"] / elapsed, 3) if elapsed > 0 else 0.0
    counts["failures"] = failures
    if failures:
        import warnings

        warnings.warn(f"precompute skipped {len(failures)} unreadable item(s), first: {failures[0][1]}", stacklevel=2)
    return counts

