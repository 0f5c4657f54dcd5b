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
from typing import Any

import numpy as np
import torch

from ._io import atomic_path, atomic_write_bytes
from .data import class_names_of, source_of
from .hashing import image_digest
from .mixing import mix_labels
from .tokens import token_for_class
from .variants import Augmenter, Variant

__all__ = ["precompute", "plan_batches", "check_classes"]

Batch = list[tuple[np.ndarray, Variant, "int | None"]]

#: A planned batch of mixed strengths holds this many UNet batches, so that only its last few UNet calls
#: run short (the longest samples go first and the shortest fill the tail): with DA-Fusion's strengths,
#: 8 keeps about 97.5% of the UNet rows busy (4: 95.5%, 16: 99%), for 8 x batch_size images held in memory.
MIX_FACTOR = 8


def check_classes(augment: Augmenter, dataset: Any) -> None:
    """Refuse a dataset whose class names differ from the transform's (its token file's, with tokens).

    Label ``i`` of the data must be class ``i`` of the transform, or every prompt names the wrong class. A
    dataset without ``.class_names`` / ``.classes``, or a transform without class names, is not checked.

    Raises:
        ValueError: both name their classes, differently.
    """
    theirs = class_names_of(dataset)
    if augment.class_names is None or theirs is None or list(augment.class_names) == theirs:
        return
    source = "the token file's classes" if getattr(augment, "tokens", None) is not None else "the transform's class_names"
    raise ValueError(f"{source} {list(augment.class_names)} differ from the dataset's {theirs}; "
                     "label i of the data must be class i of the transform")


def plan_batches(augment: Augmenter, dataset: Any, batch_size: int, counts: dict, failures: list,
                 records: list | None = None, mixed: bool = False) -> Iterator[Batch]:
    """Yield the batches still to generate, in a fixed order (the same for every backend).

    Updates ``counts`` (skipped, failed) and ``failures`` as it goes; appends one manifest record per
    (image, variant) to ``records`` when given. A region edit's variants carry their edit masks (a sample
    without the mask the transform needs is a failure, like an unreadable one). ``mixed``: batches of ``MIX_FACTOR * batch_size`` variants
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
            sample = dataset[index]
            arrays, label_list = augment.sample_images(sample)
            edits = augment.edit_masks(sample)
        except (OSError, ValueError, TypeError) as e:
            failures.append((index, f"{type(e).__name__}: {e}"))
            counts["failed"] += m
            continue
        for arr, label, edit in zip(arrays, label_list, edits):
            digest = image_digest(arr)
            for v in range(m):
                key = augment.cache_key(digest, label, v, edit)
                if records is not None:
                    records.append((index, label, v, digest, edit))
                if key in queued or key in cache:
                    counts["skipped"] += 1
                    continue
                queued.add(key)
                var = augment.variant(digest, label, v, edit)
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


def _generate(augment: Augmenter, batch: Batch, batch_size: int, mixed: bool | None, counts: dict) -> list[np.ndarray | None]:
    return augment.generate([a for a, _, _ in batch], [v for _, v, _ in batch], [lab for _, _, lab in batch],
                            batch_size=batch_size, mixed_strengths=mixed, counts=counts)


def _generate_backing_off(augment: Augmenter, batch: Batch, state: dict,
                          mixed: bool | None, counts: dict) -> list[np.ndarray | None]:
    """Generate ``batch`` in UNet batches of ``state['chunk']``, halving the chunk on CUDA out-of-memory."""
    while True:
        try:
            return _generate(augment, batch, state["chunk"], mixed, counts)
        except Exception as e:
            if not _is_oom(e) or state["chunk"] == 1:
                raise
            state["chunk"] = max(1, state["chunk"] // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _counted(batches: Iterator[Batch], counts: dict, bar) -> Iterator[Batch]:
    """Pass the batches on, moving ``bar`` past the variants the plan skipped or could not read."""
    done_before = 0
    for b in batches:
        skipped_now = counts["skipped"] + counts["failed"]
        bar.update(skipped_now - done_before)
        done_before = skipped_now
        yield b
    bar.update(counts["skipped"] + counts["failed"] - done_before)


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
                outs = _generate_backing_off(augment, batch, state, mixed, counts)
            else:
                outs = _generate(augment, batch, batch_size, mixed, counts)
            if "fallen_back" in counts:  # a filtered transform: show what the filter did
                bar.set_postfix(accepted=counts["accepted"], retried=counts["retried"], fallen_back=counts["fallen_back"])
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


def _class_name(names: list[str] | None, label: Any) -> str | list[str] | None:
    """The manifest's ``class_name``: the label's name, the names of an image's several labels, or ``None``."""
    if not names or label is None:
        return None
    return [names[x] for x in label] if isinstance(label, tuple) else names[label]


def _export(augment: Augmenter, dataset: Any, out: Path, records: list) -> int:
    """Copy every cached variant into ``out/<label>-<slug>/<index>_v<v>.png`` and write ``manifest.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    names = augment.class_names
    lines = []
    written = 0
    for index, label, v, digest, edit in records:
        var = augment.variant(digest, label, v, edit)
        if var.key not in augment.cache:  # a regular file in real shard folders; never a link or a FIFO
            continue
        src = augment.cache.path(var.key)
        if label is None:
            folder = "unlabelled"
        elif isinstance(label, tuple):  # an image with several labels (a detection target) has no class folder
            folder = "several-labels"
        else:
            slug = token_for_class(names[label], label).strip("<>") if names else "class"
            folder = f"{label:03d}-{slug}"
        rel = Path(folder) / f"{index:06d}_v{v:02d}{src.suffix}"
        dst = out / rel
        if not dst.is_file():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        written += 1
        record = {
            "file": rel.as_posix(), "source": source_of(dataset, index) or f"#{index}", "index": index, "label": label,
            "class_name": _class_name(names, label), "variant": v,
            "strength": var.strength, "seed": var.seed, "prompt": var.prompt, "key": var.key,
        }
        if var.target is not None:  # an inter-class edit: its target class and soft label (dafusion_aug.mixing)
            gamma = augment.target.label_gamma
            record.update(target=var.target, target_class_name=_class_name(names, var.target), label_gamma=gamma,
                          soft_label=mix_labels(label, var.target, var.strength, len(names), gamma).tolist())
        lines.append(json.dumps(record))
    atomic_write_bytes(out / "manifest.jsonl", ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return written


def precompute(
    augment: Augmenter,
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
        (``[(index, reason), ...]``; the run goes on without them), ``seconds`` and ``images_per_second``;
        with a filtered transform also ``accepted`` (variants a filter kept), ``retried`` (extra generations
        of rejected variants) and ``fallen_back`` (variants rejected ``max_tries`` times, cached as their
        fallback), shown with the progress bar too.

    Raises:
        ValueError: bad arguments, or a dataset whose class names differ from the transform's (with a
            token file: from the token file's), which would put the wrong class into every prompt.
        CacheError: the cache cannot be written (e.g. the disk is full); nothing half-written is left.
        ImportError: ``backend="ray"`` without Ray installed.

    Example:
        >>> aug = DiffusionAugment("pocket", class_names=CLASS_NAMES, cache="cache/")  # doctest: +SKIP
        >>> precompute(aug, digits("B"), batch_size=16)["generated"]  # doctest: +SKIP
        3600
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if augment.cache is None:
        raise ValueError("precompute needs a transform with a cache (cache=...), got cache=None")
    check_classes(augment, dataset)
    auto = batch_size == "auto"
    if auto:
        batch_size = 64 if torch.cuda.is_available() else 16
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
    if mixed_strengths not in (None, True, False):
        raise ValueError(f"mixed_strengths must be None, True or False, got {mixed_strengths!r}")
    if augment.batch_size is not None:
        batch_size = min(batch_size, augment.batch_size)
    mixed = augment.mixes_strengths() if mixed_strengths is None else mixed_strengths
    augment.cache.clean_temporaries()
    total = len(dataset) * augment.num_variants
    counts: dict[str, Any] = {"total": total, "generated": 0, "skipped": 0, "failed": 0, "bad_outputs": 0}
    if getattr(augment, "filter", None) is not None:
        counts.update(accepted=0, retried=0, fallen_back=0)
    failures: list[tuple[int, str]] = []
    records: list | None = [] if out is not None else None
    t0 = time.perf_counter()
    batches = plan_batches(augment, dataset, batch_size, counts, failures, records, mixed=mixed)
    if backend == "ray":
        from ._ray import run_ray

        run_ray(augment, batches, counts, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                progress=progress, mixed_strengths=mixed_strengths)
    else:
        from ._progress import progress_bar

        with progress_bar(total=total, unit="img", desc="precompute", progress=progress, smoothing=0.1) as bar:
            _run_local(augment, _counted(batches, counts, bar), counts, bar, encode_threads, auto, batch_size, mixed_strengths)
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

