"""The Ray Data backend of :func:`dafusion_aug.precompute` (extra ``[ray]``).

The driver plans the batches exactly as the local backend does (same grouping, same order), and each
planned batch becomes one row of a Ray dataset. ``map_batches`` runs :class:`RayBatchGenerator` actors
(one per GPU, or ``concurrency`` CPU actors): each loads the pipeline once and turns a row into one
``generate`` call, writing into the shared cache folder. Same batches, same threads, same device and dtype:
the same pixels as the local backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import PipelineError
from .variants import Augmenter, Variant

__all__ = ["RayBatchGenerator", "run_ray", "batch_row"]

_FILTER_COUNTS = ("accepted", "retried", "fallen_back")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError('backend="ray" needs Ray Data: pip install "dafusion-aug[ray]"') from e
    return ray


class RayBatchGenerator:
    """A picklable batch generator for ``ray.data.Dataset.map_batches``: loads the pipeline once per actor.

    Args:
        augment: the transform (pickled without its pipeline; it loads lazily in the actor).
        threads: torch CPU threads in the actor (Ray sets 1 by default; matching the driver's count keeps
            CPU results bit-identical to the local backend).
        batch_size: most images per UNet call (the driver's ``batch_size``; a row may hold several).
        mixed_strengths: passed to :func:`~dafusion_aug.diffuse` (``None``: mix strengths when possible).
    """

    def __init__(self, augment: Augmenter, threads: int | None = None, batch_size: int | None = None,
                 mixed_strengths: bool | None = None) -> None:
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.augment = augment
        self.batch_size = batch_size
        self.mixed_strengths = mixed_strengths

    def __call__(self, rows: dict[str, Any]) -> dict[str, np.ndarray]:
        written, bad = [], []
        extra: dict[str, list[int]] = {k: [] for k in _FILTER_COUNTS}
        for i in range(len(rows["keys"])):
            shapes = [tuple(int(x) for x in s) for s in rows["shapes"][i]]
            images = [np.frombuffer(b, dtype=np.uint8).reshape(shape) for b, shape in zip(rows["pixels"][i], shapes)]
            edits = [None if not b else np.unpackbits(np.frombuffer(b, np.uint8), count=shape[0] * shape[1]).astype(bool).reshape(shape[:2])
                     for b, shape in zip(rows["edits"][i], shapes)]
            variants = [
                Variant(float(s), str(p), int(seed), str(k), e)
                for s, p, seed, k, e in zip(rows["strengths"][i], rows["prompts"][i], rows["seeds"][i], rows["keys"][i], edits)
            ]
            labels = [None if int(x) < 0 else int(x) for x in rows["labels"][i]]
            filtered: dict[str, int] = {}
            outs = self.augment.generate(images, variants, labels, batch_size=self.batch_size, mixed_strengths=self.mixed_strengths,
                                         counts=filtered)
            for k in _FILTER_COUNTS:
                extra[k].append(filtered.get(k, 0))
            n_ok = 0
            for var, arr in zip(variants, outs):
                if arr is not None:
                    self.augment.cache.put(var.key, arr)
                    n_ok += 1
            written.append(n_ok)
            bad.append(len(variants) - n_ok)
        return {"written": np.asarray(written, dtype=np.int64), "bad": np.asarray(bad, dtype=np.int64),
                **{k: np.asarray(v, dtype=np.int64) for k, v in extra.items()}}


def batch_row(batch) -> dict[str, Any]:
    """One planned batch as a row of the Ray dataset (plain bytes, strings and numbers; edit masks bit-packed)."""
    return {
        "pixels": [np.ascontiguousarray(a).tobytes() for a, _, _ in batch],
        "shapes": [list(a.shape) for a, _, _ in batch],
        "strengths": [v.strength for _, v, _ in batch],
        "prompts": [v.prompt for _, v, _ in batch],
        "seeds": [str(v.seed) for _, v, _ in batch],  # 63-bit seeds overflow some Arrow paths as ints
        "keys": [v.key for _, v, _ in batch],
        "labels": [-1 if lab is None else lab for _, _, lab in batch],
        "edits": [b"" if v.edit is None else np.packbits(v.edit, axis=None).tobytes() for _, v, _ in batch],
    }


def run_ray(augment: Augmenter, batches, counts: dict, *, batch_size: int, concurrency: int | None,
            num_gpus: float | None, progress: bool, mixed_strengths: bool | None = None) -> None:
    """Run the planned ``batches`` on Ray Data actors, one ``generate`` call per batch."""
    ray = _import_ray()
    if augment.spec is None:
        raise PipelineError('backend="ray" needs a transform built from a model id or PipelineSpec, not a loaded pipeline')
    augment.fingerprint()  # computed once here, pickled to the actors
    rows = [batch_row(batch) for batch in batches]
    if not rows:
        return
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    gpus = num_gpus if num_gpus is not None else (1.0 if torch.cuda.is_available() else 0.0)
    if concurrency is None:
        concurrency = max(1, int(ray.available_resources().get("GPU", 0))) if gpus else 2
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * concurrency))
    result = ds.map_batches(
        RayBatchGenerator,
        fn_constructor_kwargs={"augment": augment, "threads": torch.get_num_threads(), "batch_size": batch_size,
                               "mixed_strengths": mixed_strengths},
        batch_size=1,
        concurrency=concurrency,
        num_gpus=gpus,
        num_cpus=0 if gpus else 1,
        batch_format="numpy",
    )
    written = bad = 0
    for out in result.iter_batches(batch_size=None, batch_format="numpy"):
        written += int(out["written"].sum())
        bad += int(out["bad"].sum())
        for k in _FILTER_COUNTS:
            if k in counts:
                counts[k] += int(out[k].sum())
    counts["generated"] += written
    counts["bad_outputs"] += bad
    counts["ray_actors"] = concurrency
