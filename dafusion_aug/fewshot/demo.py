"""``dafusion-aug demo``: the few-shot experiment on the pocket model and digits part B, quick or full.

The settings of both modes live here, in one place, and docs/results.md quotes them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..pipeline import PipelineSpec
from ..pocket.evaluate import attribute_only_prompts
from .classifier import ClassifierSpec, small_cnn
from .erasures import build_erasures
from .protocol import run_fewshot
from .report import require_modules

__all__ = ["DemoSettings", "QUICK", "FULL", "ERASURE_PROMPTS", "ERASURE_PRESERVE", "ERASURE_SETTINGS", "run_demo", "demo_folder",
           "ink_mask", "demo_filter"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """One mode of the demo. Every field is passed to :func:`~dafusion_aug.fewshot.run_fewshot`.

    The ``fit_*`` fields are the token recipe of the ordinary protocol (one joint run on the k-shot subset);
    the ``erase_fit_*`` fields, when set, replace them in the leakage-free protocol (``erase=True``), where
    each class's token is fitted alone on the model with that class erased and has to bring the class
    back from nothing (docs/tokens.md measures what that takes).
    """

    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    num_inference_steps: int
    num_variants: int
    fit_steps: int
    classifier_steps: int
    p: float = 0.5
    strength: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    guidance_scale: float = 7.5
    fit_batch_size: int = 4
    fit_learning_rate: float = 5e-4
    classifier_batch_size: int = 32
    classifier_width: int = 16
    classifier_image_size: int = 16
    fit_initializer: str | None = None
    fit_num_vectors: int = 1
    erase_fit_steps: int | None = None
    erase_fit_learning_rate: float | None = None
    erase_fit_num_vectors: int | None = None
    grid_classes: tuple[int, ...] = (0, 2, 4, 7)

    def classifier(self, steps: int | None = None) -> ClassifierSpec:
        """The demo's classifier: :func:`small_cnn` with these settings (``steps`` overrides ``classifier_steps``)."""
        return small_cnn(steps=self.classifier_steps if steps is None else steps, batch_size=self.classifier_batch_size, width=self.classifier_width,
                         image_size=self.classifier_image_size)

    def token_recipe(self, erase: bool) -> dict[str, Any]:
        """``run_fewshot``'s token arguments for one protocol: ``fit_steps``, ``fit_learning_rate``, ``num_vectors``."""
        recipe = dict(fit_steps=self.fit_steps, fit_learning_rate=self.fit_learning_rate, num_vectors=self.fit_num_vectors)
        if erase:
            for key, value in (("fit_steps", self.erase_fit_steps), ("fit_learning_rate", self.erase_fit_learning_rate),
                               ("num_vectors", self.erase_fit_num_vectors)):
                if value is not None:
                    recipe[key] = value
        return recipe


#: What the demo needs beyond the core dependencies (import name -> distribution): the extra ``[demo]``.
DEMO_REQUIRES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}

#: The default, ``dafusion-aug demo``: k in {1, 2, 4}, 3 seeds.
#: With ``erase``, each class's token is fitted alone with four vectors, lr 2e-3, 1000 steps: the recipe that
#: brings erased digits back in docs/tokens.md (one vector, 200 steps cannot).
QUICK = DemoSettings(shots=(1, 2, 4), seeds=(0, 1, 2), num_inference_steps=15, num_variants=5, fit_steps=200, classifier_steps=200,
                     erase_fit_steps=1000, erase_fit_learning_rate=2e-3, erase_fit_num_vectors=4)
#: ``--full``: the paper's grid of k and 5 seeds, with the same per-run settings as QUICK (so both share
#: cached variants and tokens, and QUICK's rows are a subset of FULL's).
FULL = dataclasses.replace(QUICK, shots=(1, 2, 4, 8, 16), seeds=(0, 1, 2, 3, 4))

#: Prompts each class's erasure is trained on (the augmentation's prompt among them).
ERASURE_PROMPTS = ("a photo of a {name}", "a photo of a handwritten digit {name}", "{name}")
#: Class-free prompts every erasure keeps: one per attribute word of the pocket model ("a photo of a bold
#: handwritten digit"), so that erasing "six" leaves "loop" and "bold" (pocket.attributes).
ERASURE_PRESERVE = attribute_only_prompts()
#: erase_concept settings for the pocket model v2 (docs/erasure.md): esd-x, 200 steps at lr 2e-3 with a
#: 10-step DDIM schedule, and a preservation term of weight 4 over the other classes' prompts and the
#: attribute prompts. Plain ESD (v1's 100 steps, no preservation) erased neighbours too on v2.
ERASURE_SETTINGS = dict(method="esd-x", steps=200, learning_rate=2e-3, ddim_steps=10, preserve_others=True,
                        preserve=ERASURE_PRESERVE, preserve_weight=4.0)


def demo_folder(out: str | os.PathLike, full: bool, erase: bool, region: str = "all", filter: str | None = None) -> Path:
    """Where a mode writes its results: ``OUT/quick``, ``OUT/full``, ``OUT/quick-erase`` or ``OUT/full-erase``,
    with ``-object`` / ``-background`` for a region edit and ``-filter-subset`` / ``-filter-judge`` for a filter."""
    name = ("full" if full else "quick") + ("-erase" if erase else "")
    name += "" if region == "all" else f"-{region}"
    return Path(out) / (name + ("" if filter is None else f"-filter-{filter}"))


def ink_mask(image: Any, threshold: int = 128) -> Any:
    """A pocket digit's ink as a ``tv_tensors.Mask``: the pixels of grey level ``>= threshold`` (the digits are
    light ink on a dark ground)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import tv_tensors

    grey = np.asarray(image.convert("L") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("L"))
    return tv_tensors.Mask(torch.from_numpy(grey >= threshold))


def demo_filter(filter: str | None, threshold: float | None) -> Any:
    """The demo's ``filter``: ``None``, ``"subset"`` (leakage-free, see :func:`~dafusion_aug.fewshot.run_fewshot`)
    or ``"judge"``: the pocket judge as a :class:`~dafusion_aug.ClassifierFilter`. The judge was trained on
    every digit, so it leaks class knowledge the few-shot learner does not have: an upper bound only."""
    if filter in (None, "subset"):
        return filter
    if filter != "judge":
        raise ValueError(f"filter must be None, 'subset' or 'judge', got {filter!r}")
    from ..filters import ClassifierFilter
    from ..pocket import judge

    return ClassifierFilter(judge(), threshold=0.5 if threshold is None else threshold)


def run_demo(
    out: str | os.PathLike = "dafusion-demo",
    *,
    full: bool = False,
    erase: bool = False,
    build_erasures_only: bool = False,
    settings: DemoSettings | None = None,
    threads: int | None = 1,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    region: str = "all",
    mask_grow: int = 1,
    filter: str | None = None,
    filter_threshold: float | None = None,
) -> Any:
    """Run the paper's few-shot experiment on the pocket model: digits part B, k per class to train, the rest to test.

    Methods: baseline, real-guidance, real-guidance-agnostic, da-fusion; a small CNN classifier (see
    :class:`DemoSettings`; random affine as the standard augmentation of every method). Variants, tokens
    and erasures are cached under ``out``, so a rerun is fast and an interrupted run resumes.

    Args:
        out: the output folder; results go to :func:`demo_folder` inside it, the variant cache to
            ``out/cache`` and the per-class erasures to ``out/erasures``.
        full: :data:`FULL` instead of :data:`QUICK`.
        erase: the leakage-free protocol: class c's images are augmented with c erased from the model
            (the erasures are built first if missing: ten ESD runs of 100 steps).
        build_erasures_only: build (or find) the ten erasure files and return ``{class name: path}``.
        settings: override the mode's settings.
        threads: ``torch.set_num_threads`` for the run (``None`` leaves torch's default). The default, 1,
            is what the measured times used: this model is small, and on a shared machine more threads
            spin against other jobs (a pocket UNet call measured up to 19x slower with 2 threads than with 1
            while other jobs ran).
        progress: show progress bars.
        log: where to print the table and the paths.
        region, mask_grow: edit only each digit's ink (``"object"``) or its background, the ink found by
            :func:`ink_mask` and grown by ``mask_grow`` pixels.
        filter, filter_threshold: ``"subset"`` (leakage-free: a classifier trained on the k images only) or
            ``"judge"`` (the pocket judge: leaks, an upper bound), see :func:`demo_filter`.

    Returns:
        A :class:`~dafusion_aug.fewshot.FewShotResult` (or the erasure files with ``build_erasures_only``).

    Raises:
        ImportError: scikit-learn (the digits) or matplotlib (the plots) is missing; checked before any work,
            the message names the extra: ``pip install "dafusion-aug[demo]"``.
        FileNotFoundError: the pocket model is missing (``python -m dafusion_aug.pocket.train`` rebuilds it).
    """
    require_modules(DEMO_REQUIRES, "dafusion-aug demo", "demo")
    from ..pocket import digits, model_path

    model_path()  # a clear error first when the weights are missing
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    cfg = settings or (FULL if full else QUICK)
    out = Path(out)
    data = digits("B")
    spec = PipelineSpec("pocket")
    t0 = time.perf_counter()
    erasures = None
    if erase or build_erasures_only:
        log(f"building/finding the per-class erasures in {out / 'erasures'} (esd-x, {ERASURE_SETTINGS['steps']} steps per class, "
            "the other classes and the attribute words preserved)")
        erasures = build_erasures(spec, data.class_names, out / "erasures", prompts=ERASURE_PROMPTS, progress=progress, **ERASURE_SETTINGS)
        if build_erasures_only:
            for name, path in erasures.items():
                log(f"  {name}: {path}")
            return erasures
    folder = demo_folder(out, full, erase, region, filter)
    result = run_fewshot(
        spec,
        data,
        None,
        out=folder,
        cache=out / "cache",
        tokens_dir=out / "tokens",
        shots=cfg.shots,
        seeds=cfg.seeds,
        classifier=cfg.classifier(),
        num_variants=cfg.num_variants,
        p=cfg.p,
        strength=cfg.strength,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        fit_batch_size=cfg.fit_batch_size,
        fit_initializer=cfg.fit_initializer,
        **cfg.token_recipe(erase),
        erase=erase,
        erasures=erasures,
        grid_classes=cfg.grid_classes,
        progress=progress,
        region=region,
        mask_grow=mask_grow,
        masks=ink_mask if region != "all" else None,
        filter=demo_filter(filter, filter_threshold),
        filter_threshold=filter_threshold,
    )
    log("")
    log(f"class-balanced test accuracy (%), mean ± 95% CI over seeds {list(cfg.seeds)}"
        + (", each class augmented with itself erased" if erase else ""))
    log(result.report())
    for what, path in result.files.items():
        log(f"{what:>8}: {path}")
    log(f"finished in {time.perf_counter() - t0:.0f} s")
    return result
