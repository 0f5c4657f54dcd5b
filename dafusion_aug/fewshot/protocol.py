"""DA-Fusion's few-shot experiment: does diffusion augmentation help a classifier trained on k images per class?

For every ``(k, seed)`` a few-shot subset of ``k`` images per class is drawn from a training pool; every
method (see :mod:`~dafusion_aug.fewshot.methods`) trains the same classifier with the same budget and
standard augmentation, and is scored by class-balanced accuracy on a test set. Variants are generated once
into a cache by :func:`~dafusion_aug.precompute`; training reads them with ``on_miss="real"``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._images import to_canonical
from .._io import atomic_write_bytes
from ..data import ImageList, class_names_of, few_shot_indices
from ..errors import CacheError
from ..filters import filter_fingerprint
from ..hashing import image_digest, stable_digest, stable_hash
from ..pipeline import pipeline_fingerprint, resolve_device, resolve_pipeline
from ..regions import Region
from ..tokens import ClassTokens
from ..transform import DiffusionAugment
from ..variants import DEFAULT_STRENGTHS, fingerprint_callable
from .classifier import ClassifierSpec, Inputs, evaluate, resolve_classifier, train_classifier
from .erasures import resolve_erasures
from .methods import (
    BEYOND,
    GENERATIVE,
    LORA_METHODS,
    METHODS,
    MaskedSamples,
    fit_subset_tokens,
    method_transform,
    subset_filter,
    with_masks,
)
from .oracle import UPPER_BOUNDS, SceneOracle
from .report import (
    augmentation_grid,
    format_table,
    oracle_share,
    paired_differences,
    plot_summary,
    require_modules,
    summarize,
    write_rows,
)

__all__ = ["METHODS", "FewShotResult", "run_fewshot", "check_grid", "Counter"]


def check_grid(methods: Sequence[str], shots: Sequence[int], seeds: Sequence[int], targets: Sequence[int], class_names: Sequence[str], test_given: bool) -> None:
    """Validate the experiment grid against the training pool.

    Raises:
        ValueError: an unknown method, an empty or repeated list, a k < 1, or a k larger than a class's pool
            (with ``test=None`` at least one image per class must also be left for testing).
    """
    if not methods or not shots or not seeds:
        raise ValueError(f"methods, shots and seeds must be non-empty, got methods={list(methods)}, shots={list(shots)}, seeds={list(seeds)}")
    known = METHODS + BEYOND + UPPER_BOUNDS
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"methods must be among {list(known)}, got unknown {bad}")
    for name, values in (("methods", methods), ("shots", shots), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name} must not repeat entries, got {list(values)}")
    for k in shots:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"shots must hold ints >= 1, got {k!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"seeds must hold ints, got {s!r}")
    counts = np.bincount(np.asarray(list(targets), dtype=np.int64), minlength=len(class_names))
    if len(counts) > len(class_names):
        raise ValueError(f"the training pool has labels up to {len(counts) - 1}, but class_names has {len(class_names)} names")
    need = max(shots) + (0 if test_given else 1)
    short = [(class_names[c], int(n)) for c, n in enumerate(counts) if n < need]
    if short:
        name, n = short[0]
        rest = "" if test_given else " (test=None keeps at least one more per class for testing)"
        raise ValueError(f"shots: k={max(shots)} is larger than class {name!r}'s pool of {n} training images{rest}")


class Counter:
    """Counts how many training samples a transform replaced (it returns a new image object when it does)."""

    def __init__(self, augment: Any) -> None:
        self.augment, self.seen, self.replaced = augment, 0, 0

    def __call__(self, sample: Any) -> Any:
        res = self.augment(sample)
        self.seen += 1
        self.replaced += res[0] is not sample[0]
        return res

    def share(self) -> float:
        return round(self.replaced / self.seen, 4) if self.seen else 0.0


class FewShotResult:
    """The rows of a run (one per method, k, seed), their summary, and the files written.

    Attributes:
        rows: dicts with ``method``, ``k``, ``seed``, ``erase``, ``accuracy`` (class-balanced, in [0, 1]),
            ``synthetic_share`` (fraction of training samples that were variants), timings and counts;
            da-fusion rows also name their ``tokens`` file (in ``tokens_dir``).
        summary: :func:`~dafusion_aug.fewshot.report.summarize` of the rows (mean and t confidence interval).
        files: ``{"csv", "json", "plot", "summary"}`` paths (and ``"grid"`` when one was drawn).
    """

    def __init__(self, rows: list[dict[str, Any]], confidence: float, files: dict[str, Path]) -> None:
        self.rows = rows
        self.confidence = confidence
        self.summary = summarize(rows, confidence)
        self.files = files

    def table(self) -> str:
        """The summary as a Markdown table (accuracy in %, mean ± CI half-width)."""
        return format_table(self.summary)

    def compare(
        self, method: str = "da-fusion", references: Sequence[str] = ("baseline", "real-guidance", "real-guidance-agnostic")
    ) -> str:
        """``method`` minus each reference, paired by seed, as a Markdown table (accuracy points, signed mean ± CI).

        A row whose interval lies above 0 says ``method`` beat that reference at that k on these seeds.
        Methods that did not run are left out. The default references are those the demo's claims are
        about: standard augmentation, Real Guidance (with the class erased in the leakage-free protocol)
        and the class-agnostic prompt.
        """
        present = {r["method"] for r in self.rows}
        diffs = [d for ref in references if method in present and ref in present and ref != method
                 for d in paired_differences(self.rows, method, ref, self.confidence)]
        return format_table(diffs, signed=True) if diffs else ""

    def report(self) -> str:
        """:meth:`table`, then :meth:`compare` under a one-line caption (what ``summary.md`` holds)."""
        text = self.table() + "\n"
        comparison = self.compare()
        if comparison:
            text += f"\nda-fusion minus each reference, paired by seed (accuracy points, mean ± {self.confidence:.0%} CI):\n\n{comparison}\n"
        shares = self.oracle_shares()
        if shares:
            text += "\nshare of the reachable gain, (method - baseline) / (oracle-scene - baseline), over paired seeds:\n\n" + shares + "\n"
        return text

    def oracle_shares(self) -> str:
        """A Markdown table of :func:`~dafusion_aug.fewshot.report.oracle_share` for every generative method
        that ran beside ``baseline`` and ``oracle-scene`` (empty when either is missing)."""
        present = list(dict.fromkeys(r["method"] for r in self.rows))
        if "oracle-scene" not in present or "baseline" not in present:
            return ""
        methods = [m for m in present if m in GENERATIVE]
        table = {m: oracle_share(self.rows, m) for m in methods}
        shots = sorted({k for v in table.values() for k in v})
        if not shots:
            return ""
        lines = ["| method | " + " | ".join(f"k = {k}" for k in shots) + " |", "| --- |" + " ---: |" * len(shots)]
        lines += [f"| {m} | " + " | ".join("" if k not in v else f"{v[k]:.0%}" for k in shots) + " |" for m, v in table.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"FewShotResult({len(self.rows)} rows, files={ {k: str(v) for k, v in self.files.items()} })"


def run_fewshot(
    pipeline: Any,
    train: Any,
    test: Any = None,
    class_names: Sequence[str] | None = None,
    *,
    out: str | os.PathLike,
    methods: Sequence[str] = METHODS,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    classifier: str | ClassifierSpec = "resnet50",
    num_variants: int = 10,
    p: float = 0.5,
    strength: Sequence[float] = DEFAULT_STRENGTHS,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    prompt: str = "a photo of a {name}",
    agnostic_prompt: str = "a photo",
    fit_steps: int = 1000,
    fit_batch_size: int = 4,
    fit_learning_rate: float = 5e-4,
    num_vectors: int = 1,
    fit_initializer: str | None = None,
    lora_rank: int = 10,
    lora_learning_rate: float = 1e-4,
    erase: bool = False,
    erasures: Mapping[Any, Any] | None = None,
    generation_batch_size: int = 32,
    cache: str | os.PathLike | None = None,
    tokens_dir: str | os.PathLike | None = None,
    grid_classes: Sequence[int] | None = None,
    confidence: float = 0.95,
    device: str | None = "auto",
    progress: bool = True,
    region: str = "all",
    mask_grow: int = 16,
    masks: Callable[[Any], Any] | None = None,
    filter: str | Callable | None = None,
    filter_threshold: float | None = None,
    max_tries: int = 4,
    filter_fallback: str = "real",
    _on_run: Callable[[dict[str, Any]], None] | None = None,
) -> FewShotResult:
    """Run the few-shot protocol over ``methods x shots x seeds`` and write the results into ``out``.

    Writes (each atomically, rewritten after every run, so an interrupted call resumes where it stopped):
    ``results.csv`` and ``results.json`` (one row per method, k, seed), ``summary.md`` (the table),
    ``results.png`` (accuracy vs k, with confidence intervals), ``augmentations.png`` (with ``grid_classes``),
    plus ``cache/`` (generated variants) and ``tokens/`` (fitted tokens). Rows already in ``results.json`` for the same settings are kept, not rerun.

    Args:
        pipeline: model id, folder, ``"pocket"``, :class:`PipelineSpec` or a loaded img2img pipeline.
        train: the training pool, a map-style dataset of ``(PIL image, label)`` with ``.targets`` (or
            ``.class_names``); each seed draws its subsets with :func:`~dafusion_aug.few_shot_indices`.
        test: the test set; ``None`` tests on the rest of the pool (everything not in the subset).
        class_names: class names, index = label; default ``train.class_names`` / ``train.classes``.
        out: the output folder.
        methods: among :data:`METHODS`, ``BEYOND`` (issue 32; not with ``erase``) and ``oracle-scene``.
        shots: the values of k (examples per class).
        seeds: one trial per seed (subset draw, token fit, classifier initialisation).
        classifier: ``"resnet50"`` (the paper's frozen ResNet-50 + linear head, needs its ImageNet weights),
            ``"small-cnn"`` (32x32 images) or a :class:`~dafusion_aug.fewshot.classifier.ClassifierSpec`.
        num_variants, p, strength, num_inference_steps, guidance_scale: the augmentation (DA-Fusion: M=10,
            p=0.5, strengths 0.25/0.5/0.75/1.0, 50 steps, guidance 7.5), the same for every generative method.
        prompt: template of ``real-guidance`` (``{name}`` = class name) and ``da-fusion`` (``{name}`` = token).
        agnostic_prompt: the prompt of ``real-guidance-agnostic`` (no class information).
        fit_steps, fit_batch_size, fit_learning_rate, num_vectors: textual inversion on the k-shot subset
            (all classes jointly; with ``erase`` one run per class, with that class erased, of ``fit_steps``
            steps each, so every token gets as many optimizer steps as in the joint run).
        fit_initializer: default ``"class_name"``, ``"the"`` with ``erase`` (a name carries class knowledge).
        lora_rank, lora_learning_rate: the LoRA methods' class LoRA, fitted with their own tokens (Diff-Mix: rank 10).
        erase: augment class c's images with class c erased from the model.
        erasures: ``{label or class name: Erasure or file}`` for ``erase`` (see :func:`build_erasures`).
        generation_batch_size: images per pipeline call in :func:`~dafusion_aug.precompute`.
        cache: the variants' cache folder (default ``out/cache``); runs with other settings can share it.
        tokens_dir: where fitted tokens are kept (default ``out/tokens``), named by a digest of their settings.
        grid_classes: also write ``augmentations.png``: for these labels, an image of the first (k, seed)
            subset beside its variant at each strength, one row per generative method.
        confidence: coverage of the confidence intervals.
        device: where to load a model id / folder and train the classifier (``"auto"``: CUDA if available).
        progress: show a progress bar over the (method, k, seed) grid.
        region, mask_grow: region edits of every generative method (see
            :class:`~dafusion_aug.DiffusionAugment`); ``region`` other than ``"all"`` needs ``masks``.
        masks: ``masks(image) -> tv_tensors.Mask`` (or a 0/1 array of the image's size): a training image's
            object mask (for the pocket digits, :func:`~dafusion_aug.fewshot.demo.ink_mask`).
        filter: ``None``; ``"subset"``: a leakage-free :class:`~dafusion_aug.ClassifierFilter` per (k, seed),
            ``classifier`` trained on the k-shot subset alone (:func:`~dafusion_aug.fewshot.methods.subset_filter`);
            or any filter callable, used as is (it answers for its own leakage: the pocket judge is an upper
            bound that knows every digit).
        filter_threshold, max_tries, filter_fallback: the filter's settings (``"subset"``'s threshold: 0.5).

    Returns:
        A :class:`FewShotResult`.

    Raises:
        ValueError: an unknown method, a k larger than a class's pool, missing erasures, bad arguments.
        PipelineError: ``device`` names a device this machine does not have (``"cuda"`` without a GPU).
        ImportError: matplotlib (the plots) is not installed: ``pip install "dafusion-aug[demo]"``.
        CacheError: variants are missing from the cache after precomputing (generation failed).

    Example:
        >>> from dafusion_aug.pocket import digits
        >>> res = run_fewshot("pocket", digits("B"), out="demo/", classifier="small-cnn", shots=(1, 2))  # doctest: +SKIP
        >>> print(res.table())  # doctest: +SKIP
    """
    require_modules({"matplotlib": "matplotlib"}, "run_fewshot (its plots)", "demo")  # before any work, not after the first run
    generation = dict(num_variants=num_variants, p=p, strength=list(strength), num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, prompt=prompt, agnostic_prompt=agnostic_prompt)
    generation.update(_edit_settings(region, mask_grow, masks, filter, filter_threshold, max_tries, filter_fallback))
    fitting = _fit_settings(fit_steps, fit_batch_size, fit_learning_rate, num_vectors, fit_initializer, erase)
    lora = _lora_settings(methods, erase, lora_rank, lora_learning_rate)
    experiment = _Experiment(
        pipeline, train, test, class_names, out=Path(out), methods=list(methods), shots=list(shots), seeds=list(seeds),
        classifier=classifier, generation=generation, fitting=fitting, erase=erase, erasures=erasures,
        batch_size=generation_batch_size, cache=cache, tokens_dir=tokens_dir, confidence=confidence, device=device,
    )
    experiment.masks, experiment.filter = masks, filter
    experiment.use_lora(lora)
    rows = experiment.run(progress, _on_run)
    return experiment.finish(rows, grid_classes)


def _lora_settings(methods: Sequence[str], erase: bool, rank: Any, learning_rate: float) -> dict[str, Any] | None:
    """The LoRA methods' fit settings (``None`` when no method fits a LoRA), checked before any work."""
    beyond = [m for m in methods if m in BEYOND]
    if beyond and erase:
        raise ValueError(f"methods {beyond} (a class LoRA, inter-class edits) are not supported by the leakage-free protocol "
                         "(erase=True) yet")
    lora = [m for m in methods if m in LORA_METHODS]
    if not lora:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_rank must be an int >= 1 for methods {lora}, got {rank!r}")
    return dict(lora_rank=rank, lora_learning_rate=learning_rate)


def _fit_settings(steps: int, batch_size: int, learning_rate: float, num_vectors: int, initializer: str | None,
                  erase: bool) -> dict[str, Any]:
    """da-fusion's token recipe as JSON; the initializer defaults to "the" with ``erase`` (a class-name start
    would carry class knowledge into the token), else to the class name."""
    if erase and initializer is None:
        initializer = "the"
    return dict(steps=steps, batch_size=batch_size, learning_rate=learning_rate, num_vectors=num_vectors,
                initializer=initializer or "class_name")


def _edit_settings(region: str, mask_grow: int, masks: Callable | None, filter: Any, threshold: float | None,
                   max_tries: int, fallback: str) -> dict[str, Any]:
    """The generation settings of region edits and filters, as JSON (only those set, so the rows of runs
    without them keep their config digest)."""
    out: dict[str, Any] = {}
    if region != "all":
        if masks is None:
            raise ValueError(f"region={region!r} needs masks= (a function image -> its object mask)")
        out.update(region=region, mask_grow=mask_grow, masks=fingerprint_callable(masks))
    if filter is not None:
        if isinstance(filter, str) and filter != "subset":
            raise ValueError(f"filter must be None, 'subset' or a filter callable, got {filter!r}")
        threshold = 0.5 if filter == "subset" and threshold is None else threshold
        name = filter if isinstance(filter, str) else filter_fingerprint(filter, threshold, max_tries, fallback)[1]
        out["filter"] = dict(filter=name, threshold=threshold, max_tries=max_tries, fallback=fallback)
    return out


class _Experiment:
    """One :func:`run_fewshot` call: its data, model, settings, digests, transforms and fitted tokens."""

    def __init__(self, pipeline: Any, train: Any, test: Any, class_names: Sequence[str] | None, *, out: Path,
                 methods: list[str], shots: list[int], seeds: list[int], classifier: str | ClassifierSpec,
                 generation: dict[str, Any], fitting: dict[str, Any], erase: bool, erasures: Mapping[Any, Any] | None,
                 batch_size: int, cache: str | os.PathLike | None, tokens_dir: str | os.PathLike | None,
                 confidence: float, device: str | None) -> None:
        # 1. Arguments, data and the grid.
        names = list(class_names) if class_names is not None else (class_names_of(train) or [])
        if not names:
            raise ValueError("class_names is required: train has no .class_names or .classes attribute")
        self.names, self.methods, self.shots, self.seeds = names, methods, shots, seeds
        self.spec = resolve_classifier(classifier)
        self.pool = Inputs(train, self.spec.image_size)
        check_grid(methods, shots, seeds, self.pool.labels, names, test is not None)
        if "oracle-scene" in methods:
            SceneOracle(train)  # a pool that cannot redraw its scenes is refused before any work
        self.tests = Inputs(test, self.spec.image_size) if test is not None else None
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.erase, self.batch_size, self.confidence = out, bool(erase), batch_size, confidence
        self.device = str(resolve_device(device, require_available=True))  # no CUDA: a clear error, not torch's
        self.generation, self.fitting = generation, fitting
        if erase:
            # one run per class, each as many optimizer steps as the joint run gives every token (fit_subset_tokens)
            self.fitting["runs"] = "per class, fit_steps each"
        # 2. The model (only when a method generates) and one erasure per class.
        needs_model = any(m in GENERATIVE for m in methods)
        # ``device`` places a model id or folder; a spec or a loaded pipeline keeps its own
        self.pipe = resolve_pipeline(pipeline, device=device if isinstance(pipeline, (str, os.PathLike)) else None).load() if needs_model else None
        self.erasures = resolve_erasures(erasures, names) if (erase and needs_model) else None
        self.config, self.token_config = self._digests()
        self.settings = {
            "methods": methods, "shots": shots, "seeds": seeds, "erase": self.erase,
            "classifier": {"name": self.spec.name, "steps": self.spec.steps, "batch_size": self.spec.batch_size,
                           "learning_rate": self.spec.learning_rate, "image_size": self.spec.image_size},
            "generation": generation, "fit_tokens": self.fitting, "test": "rest of the pool" if test is None else f"{len(test)} images",
        }
        self.files = {"csv": out / "results.csv", "json": out / "results.json", "plot": out / "results.png", "summary": out / "summary.md"}
        self.cache_dir = Path(cache) if cache is not None else out / "cache"
        self.tokens_dir = Path(tokens_dir) if tokens_dir is not None else out / "tokens"
        self.augs: dict[Any, DiffusionAugment] = {}
        self.masks: Callable[[Any], Any] | None = None  # set by run_fewshot: region edits and filters
        self.filter: Any = None
        self.token_files: dict[tuple[int, int, bool], str] = {}  # (k, seed, lora) -> the token file's name, recorded in rows
        self.lora: dict[str, Any] | None = None  # the LoRA methods' settings (use_lora)

    def use_lora(self, settings: dict[str, Any] | None) -> None:
        """Fit a class LoRA with the LoRA methods' tokens; the settings join the rows' config digest (only
        when set, so the rows of runs without LoRA methods keep theirs)."""
        if settings is None:
            return
        self.lora = settings
        self.settings["fit_tokens_lora"] = settings
        self.config = stable_digest(self.config, "lora", settings)

    def _digests(self) -> tuple[str, str]:
        """The digest of everything that decides a row, and of everything that decides a token file."""
        spec, model = self.spec, pipeline_fingerprint(self.pipe) if self.pipe is not None else None
        erased = [e.content_hash() for e in self.erasures] if self.erasures else None
        data_fp = stable_digest(self.pool.digest(), None if self.tests is None else self.tests.digest())
        config = stable_digest(
            "fewshot", 1, data_fp, self.names, spec.name, spec.steps, spec.batch_size, spec.learning_rate, spec.image_size,
            self.generation, self.fitting, self.erase, model, erased,
        )
        return config, stable_digest(self.names, self.fitting, model, erased)

    def done_rows(self) -> dict[tuple[str, int, int], dict[str, Any]]:
        """Rows of the same settings already in ``results.json`` (a resumed run keeps them)."""
        done: dict[tuple[str, int, int], dict[str, Any]] = {}
        if not self.files["json"].is_file():
            return done
        try:
            old = json.loads(self.files["json"].read_text())
            for r in old.get("rows", []):
                if r.get("config") == self.config:
                    done[(r["method"], int(r["k"]), int(r["seed"]))] = r
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return done

    # -- the methods' transforms ----------------------------------------------------------------------
    def tokens(self, subset: list[tuple[Any, int]], k: int, seed: int, lora: bool = False) -> ClassTokens:
        """da-fusion's tokens for this subset (with ``lora``, the LoRA methods' tokens and LoRA), kept in
        ``tokens_dir`` under a name that digests what decides them."""
        digests = [image_digest(to_canonical(im)[0][0]) for im, _ in subset]
        if lora and self.lora:
            settings, config = dict(self.fitting, **self.lora), stable_digest(self.token_config, "lora", self.lora)
        else:
            settings, config = self.fitting, self.token_config
        key = stable_digest("fewshot-tokens", config, digests, [y for _, y in subset], seed)
        path = self.tokens_dir / f"k{k}-seed{seed}{'-lora' if lora else ''}-{key[:12]}.safetensors"
        self.token_files[(k, seed, lora)] = path.name
        return fit_subset_tokens(self.pipe, subset, self.names, path, seed=seed, fit_settings=settings, erasures=self.erasures)

    def transform(self, method: str, subset: list[tuple[Any, int]], k: int, seed: int) -> DiffusionAugment:
        """The method's transform (one per method; da-fusion's per subset, with its tokens)."""
        fitted = method == "da-fusion" or method in BEYOND
        per_subset = fitted or self.filter == "subset"
        key = method if not per_subset else (method, k, seed)
        if key not in self.augs:
            g = self.generation
            edits: dict[str, Any] = {}
            if "region" in g:
                edits["region"] = Region(g["region"], grow=g["mask_grow"])
            if "filter" in g:
                f = g["filter"]
                edits.update(filter=self.filter, filter_threshold=f["threshold"], max_tries=f["max_tries"], filter_fallback=f["fallback"])
                if self.filter == "subset":
                    edits["filter"] = subset_filter(self.spec, subset, len(self.names), k=k, seed=seed, threshold=f["threshold"], device=self.device)
            self.augs[key] = method_transform(
                method, self.pipe, self.names, tokens=self.tokens(subset, k, seed, method in LORA_METHODS) if fitted else None,
                prompt=g["prompt"], agnostic_prompt=g["agnostic_prompt"], class_erasures=dict(enumerate(self.erasures or [])),
                num_variants=g["num_variants"], p=g["p"], strength=tuple(g["strength"]), num_inference_steps=g["num_inference_steps"],
                guidance_scale=g["guidance_scale"], cache=self.cache_dir, batch_size=self.batch_size, **edits,
            )
        return self.augs[key]

    def prepare(self, method: str, subset: list[tuple[Any, int]], k: int, seed: int) -> DiffusionAugment:
        """Fill the cache for this subset and return a transform that only reads it (``on_miss='real'``)."""
        aug = self.transform(method, subset, k, seed)
        samples = ImageList(subset, self.names) if aug.region == "all" else with_masks(subset, self.masks)
        self.filter_counts = aug.precompute(samples, batch_size=self.batch_size, progress=False)
        missing = sum(aug.cache_key(image_digest(to_canonical(sample[0])[0][0]), sample[-1], v, aug.edit_masks(sample)[0]) not in aug.cache
                      for sample in samples for v in range(aug.num_variants))
        if missing:
            raise CacheError(f"{missing} variants of {method} (k={k}, seed={seed}) are missing from {self.cache_dir} after precompute")
        reader = copy.copy(aug)  # pickles through __getstate__: no pipeline, so it can never generate
        reader.on_miss = "real"
        return reader if aug.region == "all" else MaskedSamples(reader, self.masks)

    # -- the grid ----------------------------------------------------------------------------------------
    def run_one(self, method: str, k: int, seed: int, subset: list[tuple[Any, int]], ev_data: Inputs, ev_idx: list[int]) -> dict[str, Any]:
        """Train and score one (method, k, seed); the row of the results."""
        t0 = time.perf_counter()
        self.filter_counts = {}
        augment: Any = None
        if method == "oracle-scene":  # an upper bound that reads the renderer (oracle.py)
            augment = SceneOracle(self.pool.dataset, self.generation["num_variants"], self.generation["p"], seed)
        elif method != "baseline":
            augment = self.prepare(method, subset, k, seed)
        t1 = time.perf_counter()
        counter = Counter(augment)
        torch.manual_seed(stable_hash("fewshot-classifier", k, seed))  # same init for every method: paired
        model = train_classifier(self.spec, subset, len(self.names), counter if augment is not None else None, device=self.device)
        acc = evaluate(model, ev_data, ev_idx, len(self.names), self.device)
        row = {
            "method": method, "k": k, "seed": seed, "erase": self.erase, "accuracy": acc,
            "synthetic_share": counter.share(), "num_train": len(subset), "num_test": len(ev_idx),
            "prepare_seconds": round(t1 - t0, 2), "train_seconds": round(time.perf_counter() - t1, 2),
            "classifier": self.spec.name, "config": self.config,
        }
        for name in ("accepted", "retried", "fallen_back"):  # this run's generation; 0 when all was cached
            if name in self.filter_counts:
                row[f"filter_{name}"] = self.filter_counts[name]
        if method == "da-fusion" or method in BEYOND:
            row["tokens"] = self.token_files[(k, seed, method in LORA_METHODS)]  # which file of the tokens folder these variants came from
        return row

    def subset(self, k: int, seed: int) -> tuple[list[int], list[tuple[Any, int]]]:
        idx = few_shot_indices(self.pool.labels, k, seed, num_classes=len(self.names))
        return idx, [self.pool.item(i) for i in idx]

    def run(self, progress: bool, on_run: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
        """Every (k, seed) subset, then every method on it; rows of the same settings already written are kept."""
        from .._progress import progress_bar

        done = self.done_rows()
        rows: list[dict[str, Any]] = []
        grid = [(k, s) for k in self.shots for s in self.seeds]
        bar = progress_bar(total=len(grid) * len(self.methods), desc="few-shot", unit="run", progress=progress)
        try:
            for k, seed in grid:
                idx, subset = self.subset(k, seed)
                chosen = set(idx)
                ev_data, ev_idx = (self.pool, [i for i in range(len(self.pool)) if i not in chosen]) if self.tests is None else (self.tests, list(range(len(self.tests))))
                for method in self.methods:
                    bar.set_postfix_str(f"{method} k={k} seed={seed}", refresh=True)
                    if (method, k, seed) in done:
                        rows.append(done[(method, k, seed)])
                        bar.update(1)
                        continue
                    rows.append(self.run_one(method, k, seed, subset, ev_data, ev_idx))
                    if on_run is not None:
                        on_run(rows[-1])
                    self.write(rows)
                    bar.update(1)
        finally:
            bar.close()
        return rows

    # -- results -----------------------------------------------------------------------------------------
    def write(self, rows: list[dict[str, Any]]) -> None:
        """``results.csv``, ``results.json``, ``summary.md`` and ``results.png``, each atomically."""
        result = FewShotResult(rows, self.confidence, self.files)
        extra = {"config": self.config, "confidence": self.confidence, "settings": self.settings, "summary": result.summary}
        write_rows(rows, self.files["csv"], self.files["json"], extra=extra)
        atomic_write_bytes(self.files["summary"], result.report().encode(), suffix=self.files["summary"].suffix)
        plot_summary(result.summary, self.files["plot"], title=f"few-shot accuracy (mean ± {self.confidence:.0%} CI)")

    def grid_rows(self, classes: Sequence[int], subset: list[tuple[Any, int]], k: int, seed: int) -> list[tuple[str, list[np.ndarray]]]:
        """For each class and generative method: a real image and its variant at each strength."""
        out_rows = []
        strengths = self.generation["strength"]
        for c in classes:
            im = next(im for im, y in subset if y == c)
            arr = to_canonical(im)[0][0]
            for method in [m for m in self.methods if m in GENERATIVE]:
                aug = self.transform(method, subset, k, seed)
                edit = aug.edit_masks(with_masks([(im, c)], self.masks)[0])[0] if aug.region != "all" else None
                var = aug.variant(image_digest(arr), c, 0, edit)
                made = aug.generate([arr] * len(strengths), [var._replace(strength=float(s)) for s in strengths], [c] * len(strengths))
                towards = "" if var.target is None else f" -> {self.names[var.target]}"  # diff-mix: the target class
                out_rows.append((f"{self.names[c]}\n{method}{towards}", [arr, *made]))
        return out_rows

    def finish(self, rows: list[dict[str, Any]], grid_classes: Sequence[int] | None) -> FewShotResult:
        """Write the results once more, draw ``augmentations.png`` for ``grid_classes``, and return the result."""
        self.write(rows)
        files = dict(self.files)
        if grid_classes:
            k0, s0 = self.shots[0], self.seeds[0]
            _, subset0 = self.subset(k0, s0)
            files["grid"] = augmentation_grid(
                self.grid_rows(grid_classes, subset0, k0, s0), ["real"] + [f"strength {s:g}" for s in self.generation["strength"]],
                self.out / "augmentations.png",
                title=f"k={k0}, seed={s0}: each real image, then its variant at each strength (same generator seed)"
                + (" — class erased" if self.erase else ""),
            )
        return FewShotResult(rows, self.confidence, files)
