"""DA-Fusion's few-shot experiment: does diffusion augmentation help a classifier trained on k images per class?

For every ``(k, seed)`` a few-shot subset of ``k`` images per class is drawn from a training pool; every
method trains the same classifier with the same budget and standard augmentation, and is scored by
class-balanced accuracy on a test set. Methods:

- ``baseline``: standard augmentation only;
- ``real-guidance``: img2img with the class *name* in the prompt (He et al.);
- ``real-guidance-agnostic``: img2img with a prompt that names no class ("a photo");
- ``da-fusion``: img2img with class tokens learned by :func:`~dafusion_aug.fit_tokens` on the k images.

Variants are generated once into a cache by :func:`~dafusion_aug.precompute`; training reads them with
``on_miss="real"``. With ``erase=True`` the images of class c are augmented (and c's token is learned) by
the model with c erased (one :class:`~dafusion_aug.Erasure` per class), so no method can draw on what the
model already knows about the class.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._classifier import (
    ClassifierSpec,
    resnet50_linear,
    resolve_classifier,
    small_cnn,
    train_classifier,
)
from ._fewshot_parts import (
    METHODS,
    Counter,
    Inputs,
    build_erasures,
    check_grid,
    evaluate,
    load_pipe,
    resolve_erasures,
)
from ._hashing import image_digest, stable_digest, stable_hash
from ._images import to_canonical
from ._report import augmentation_grid, format_table, paired_differences, plot_summary, summarize, write_rows
from .data import ImageList, few_shot_indices
from .errors import CacheError
from .pipeline import pipeline_fingerprint
from .tokens import ClassTokens
from .transform import DEFAULT_STRENGTHS, DiffusionAugment

__all__ = ["METHODS", "FewShotResult", "run_fewshot", "build_erasures", "check_grid", "run_demo", "ClassifierSpec", "small_cnn", "resnet50_linear"]

_GENERATIVE = METHODS[1:]


class FewShotResult:
    """The rows of a run (one per method, k, seed), their summary, and the files written.

    Attributes:
        rows: dicts with ``method``, ``k``, ``seed``, ``erase``, ``accuracy`` (class-balanced, in [0, 1]),
            ``synthetic_share`` (fraction of training samples that were variants), timings and counts;
            da-fusion rows also name their ``tokens`` file (in ``tokens_dir``).
        summary: :func:`~dafusion_aug._report.summarize` of the rows (mean and t confidence interval).
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

    def compare(self, method: str = "da-fusion", references: Sequence[str] = ("baseline", "real-guidance-agnostic")) -> str:
        """``method`` minus each reference, paired by seed, as a Markdown table (accuracy points, mean ± CI).

        A row whose interval lies above 0 says ``method`` beat that reference at that k on these seeds.
        Methods that did not run are left out.
        """
        present = {r["method"] for r in self.rows}
        diffs = [d for ref in references if method in present and ref in present and ref != method
                 for d in paired_differences(self.rows, method, ref, self.confidence)]
        return format_table(diffs) if diffs else ""

    def report(self) -> str:
        """:meth:`table`, then :meth:`compare` under a one-line caption (what ``summary.md`` holds)."""
        text = self.table() + "\n"
        comparison = self.compare()
        if comparison:
            text += f"\nda-fusion minus each reference, paired by seed (accuracy points, mean ± {self.confidence:.0%} CI):\n\n{comparison}\n"
        return text

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
    erase: bool = False,
    erasures: Mapping[Any, Any] | None = None,
    generation_batch_size: int = 32,
    cache: str | os.PathLike | None = None,
    tokens_dir: str | os.PathLike | None = None,
    grid_classes: Sequence[int] | None = None,
    confidence: float = 0.95,
    device: str | None = None,
    progress: bool = True,
    _on_run: Callable[[dict[str, Any]], None] | None = None,
) -> FewShotResult:
    """Run the few-shot protocol over ``methods x shots x seeds`` and write the results into ``out``.

    Writes (each atomically, rewritten after every run, so an interrupted call resumes where it stopped):
    ``results.csv`` and ``results.json`` (one row per method, k, seed), ``summary.md`` (the table),
    ``results.png`` (accuracy vs k, with confidence intervals), ``augmentations.png`` (with ``grid_classes``),
    plus ``cache/`` (generated variants) and ``tokens/`` (fitted tokens). Rows already in ``results.json`` for the same settings are kept, not rerun.

    Args:
        pipeline: model id, folder, ``"pocket"``, :class:`PipelineSpec` or a loaded img2img pipeline.
        train: the training pool, a map-style dataset of ``(PIL image, label)`` with ``.targets``
            (or ``.class_names``); few-shot subsets are drawn from it per seed with
            :func:`~dafusion_aug.few_shot_indices`.
        test: the test set; ``None`` tests on the rest of the pool (everything not in the subset).
        class_names: class names, index = label; default ``train.class_names`` / ``train.classes``.
        out: the output folder.
        methods: a subset of :data:`METHODS`.
        shots: the values of k (examples per class).
        seeds: one trial per seed (subset draw, token fit, classifier initialisation).
        classifier: ``"resnet50"`` (the paper's frozen ResNet-50 + linear head, needs its ImageNet weights),
            ``"small-cnn"`` (32x32 images) or a :class:`~dafusion_aug._classifier.ClassifierSpec`.
        num_variants, p, strength, num_inference_steps, guidance_scale: the augmentation (DA-Fusion: M=10,
            p=0.5, strengths 0.25/0.5/0.75/1.0, 50 steps, guidance 7.5), the same for every generative method.
        prompt: template of ``real-guidance`` (``{name}`` = class name) and ``da-fusion`` (``{name}`` = token).
        agnostic_prompt: the prompt of ``real-guidance-agnostic`` (no class information).
        fit_steps, fit_batch_size, fit_learning_rate, num_vectors: textual inversion on the k-shot subset
            (all classes jointly; with ``erase`` one run per class, with that class erased, of ``fit_steps``
            steps each, so every token gets as many optimizer steps as in the joint run).
        fit_initializer: default ``"class_name"``, or ``"the"`` with ``erase`` (a class-name start would
            carry class knowledge into the token).
        erase: augment class c's images with class c erased from the model.
        erasures: ``{label or class name: Erasure or file}`` for ``erase`` (see :func:`build_erasures`).
        generation_batch_size: images per pipeline call in :func:`~dafusion_aug.precompute`.
        cache: the variants' cache folder (default ``out/cache``); runs with other settings can share it.
        tokens_dir: where fitted tokens are kept (default ``out/tokens``), named by a digest of everything
            that decides them, so runs over other grids can share them.
        grid_classes: also write ``augmentations.png``: for these labels, an image of the first (k, seed)
            subset beside its variant at each strength, one row per generative method.
        confidence: coverage of the confidence intervals.
        device: where to load a model id / folder and train the classifier (default: CUDA if available).
        progress: show a progress bar over the (method, k, seed) grid.

    Returns:
        A :class:`FewShotResult`.

    Raises:
        ValueError: an unknown method, a k larger than a class's pool, missing erasures, bad arguments.
        CacheError: variants are missing from the cache after precomputing (generation failed).

    Example:
        >>> from dafusion_aug.pocket import digits
        >>> res = run_fewshot("pocket", digits("B"), out="demo/", classifier="small-cnn", shots=(1, 2))  # doctest: +SKIP
        >>> print(res.table())  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    # 1. Arguments, data and the grid.
    names = list(class_names if class_names is not None else (getattr(train, "class_names", None) or getattr(train, "classes", None) or []))
    if not names:
        raise ValueError("class_names is required: train has no .class_names or .classes attribute")
    spec = resolve_classifier(classifier)
    pool = Inputs(train, spec.image_size)
    targets = pool.labels
    check_grid(list(methods), list(shots), list(seeds), targets, names, test is not None)
    tests = Inputs(test, spec.image_size) if test is not None else None
    if erase and fit_initializer is None:
        fit_initializer = "the"
    fit_initializer = fit_initializer or "class_name"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    gen_settings = dict(
        num_variants=num_variants, p=p, strength=list(strength), num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, prompt=prompt, agnostic_prompt=agnostic_prompt,
    )
    fit_settings = dict(steps=fit_steps, batch_size=fit_batch_size, learning_rate=fit_learning_rate, num_vectors=num_vectors, initializer=fit_initializer)
    if erase:
        # one run per class, each as many optimizer steps as the joint run gives every token (see fit() below)
        fit_settings["runs"] = "per class, fit_steps each"
    needs_model = any(m in _GENERATIVE for m in methods)
    pipe = load_pipe(pipeline, device) if needs_model else None
    erasure_list = resolve_erasures(erasures, names) if (erase and needs_model) else None
    data_fp = stable_digest(pool.digest(), None if tests is None else tests.digest())
    config = stable_digest(
        "fewshot", 1, data_fp, names, spec.name, spec.steps, spec.batch_size, spec.learning_rate, spec.image_size,
        gen_settings, fit_settings, bool(erase),
        pipeline_fingerprint(pipe) if pipe is not None else None,
        [e.content_hash() for e in erasure_list] if erasure_list else None,
    )
    token_config = stable_digest(
        names, fit_settings, pipeline_fingerprint(pipe) if pipe is not None else None, [e.content_hash() for e in erasure_list] if erasure_list else None
    )
    settings = {
        "methods": list(methods), "shots": list(shots), "seeds": list(seeds), "erase": bool(erase),
        "classifier": {"name": spec.name, "steps": spec.steps, "batch_size": spec.batch_size, "learning_rate": spec.learning_rate, "image_size": spec.image_size},
        "generation": gen_settings, "fit_tokens": fit_settings, "test": "rest of the pool" if test is None else f"{len(test)} images",
    }

    # 2. Resume: rows of the same settings already written.
    files = {"csv": out / "results.csv", "json": out / "results.json", "plot": out / "results.png", "summary": out / "summary.md"}
    done: dict[tuple[str, int, int], dict[str, Any]] = {}
    if files["json"].is_file():
        import json

        try:
            old = json.loads(files["json"].read_text())
            for r in old.get("rows", []):
                if r.get("config") == config:
                    done[(r["method"], int(r["k"]), int(r["seed"]))] = r
        except (OSError, ValueError, KeyError, TypeError):
            done = {}
    cache_dir = Path(cache) if cache is not None else out / "cache"
    augs: dict[Any, Any] = {}
    token_files: dict[tuple[int, int], str] = {}  # (k, seed) -> the token file's name, recorded in da-fusion rows

    def erased(c: int):
        return erasure_list[c].applied(pipe) if erasure_list else contextlib.nullcontext()

    def make_aug(method: str, tokens: ClassTokens | None) -> DiffusionAugment:
        kw = dict(
            num_variants=num_variants, p=p, strength=tuple(strength), num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, cache=cache_dir, batch_size=generation_batch_size,
            class_erasures=dict(enumerate(erasure_list)) if erasure_list else None,
        )
        if method == "da-fusion":
            return DiffusionAugment(pipe, tokens=tokens, prompt=prompt, **kw)
        return DiffusionAugment(pipe, class_names=names, prompt=prompt if method == "real-guidance" else agnostic_prompt, **kw)

    def fit(subset: list[tuple[Any, int]], k: int, seed: int) -> ClassTokens:
        key = stable_digest("fewshot-tokens", token_config, [image_digest(to_canonical(im)[0][0]) for im, _ in subset], [y for _, y in subset], seed)
        path = (Path(tokens_dir) if tokens_dir is not None else out / "tokens") / f"k{k}-seed{seed}-{key[:12]}.safetensors"
        token_files[(k, seed)] = path.name
        if path.is_file():
            return ClassTokens.load(path)
        from .fit import fit_tokens

        kw = dict(num_vectors=num_vectors, initializer=fit_initializer, batch_size=fit_batch_size, learning_rate=fit_learning_rate, seed=seed, progress=False)
        if erasure_list is None:
            tokens = fit_tokens(pipe, ImageList(subset, names), names, steps=fit_steps, **kw)
        else:
            # Adam moves a token about lr per step whatever the batch holds, and the joint run steps every
            # token fit_steps times: a run per class of fit_steps / classes steps left tokens 10x short.
            embs = []
            for c, name in enumerate(names):
                with erased(c):
                    one = fit_tokens(pipe, ImageList([(im, 0) for im, y in subset if y == c], [name]), [name], steps=fit_steps, **kw)
                embs.append(one.embeddings[0])
            tokens = ClassTokens(names, embs, metadata={"fit": "one run per class, each with its class erased", **fit_settings})
        tokens.save(path)
        return tokens

    def get_aug(method: str, subset: list[tuple[Any, int]], k: int, seed: int) -> DiffusionAugment:
        """The method's transform; with ``erase`` it generates class c's images with c erased (``class_erasures``)."""
        key = method if method != "da-fusion" else (method, k, seed)
        if key not in augs:
            augs[key] = make_aug(method, fit(subset, k, seed) if method == "da-fusion" else None)
        return augs[key]

    def prepare(method: str, subset: list[tuple[Any, int]], k: int, seed: int) -> DiffusionAugment:
        """Fill the cache for this subset and return a transform that only reads it (on_miss='real')."""
        aug = get_aug(method, subset, k, seed)
        aug.precompute(ImageList(subset, names), batch_size=generation_batch_size, progress=False)
        missing = sum(aug.cache_key(image_digest(to_canonical(im)[0][0]), y, v) not in aug.cache for im, y in subset for v in range(num_variants))
        if missing:
            raise CacheError(f"{missing} variants of {method} (k={k}, seed={seed}) are missing from {cache_dir} after precompute")
        reader = copy.copy(aug)  # pickles through __getstate__: no pipeline, so it can never generate
        reader.on_miss = "real"
        return reader

    def grid_rows(subset: list[tuple[Any, int]], k: int, seed: int) -> list[tuple[str, list[np.ndarray]]]:
        """For each class of ``grid_classes`` and generative method: a real image and its variant at each strength."""
        out_rows = []
        for c in grid_classes or ():
            im = next(im for im, y in subset if y == c)
            arr = to_canonical(im)[0][0]
            for method in [m for m in methods if m in _GENERATIVE]:
                aug = get_aug(method, subset, k, seed)
                var = aug.variant(image_digest(arr), c, 0)
                made = aug.generate([arr] * len(strength), [var._replace(strength=float(s)) for s in strength], [c] * len(strength))
                out_rows.append((f"{names[c]}\n{method}", [arr, *made]))
        return out_rows

    # 3. The grid: for each (k, seed) one subset, then every method on it.
    rows: list[dict[str, Any]] = []
    grid = [(k, s) for k in shots for s in seeds]
    bar = tqdm(total=len(grid) * len(methods), desc="few-shot", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        for k, seed in grid:
            idx = few_shot_indices(targets, k, seed, num_classes=len(names))
            subset = [pool.item(i) for i in idx]
            chosen = set(idx)
            ev_data, ev_idx = (pool, [i for i in range(len(pool)) if i not in chosen]) if tests is None else (tests, list(range(len(tests))))
            for method in methods:
                bar.set_postfix_str(f"{method} k={k} seed={seed}", refresh=True)
                if (method, k, seed) in done:
                    rows.append(done[(method, k, seed)])
                    bar.update(1)
                    continue
                t0 = time.perf_counter()
                augment = prepare(method, subset, k, seed) if method != "baseline" else None
                t1 = time.perf_counter()
                counter = Counter(augment)
                torch.manual_seed(stable_hash("fewshot-classifier", k, seed))  # same init for every method: paired
                model = train_classifier(spec, subset, len(names), counter if augment is not None else None, device=train_device)
                acc = evaluate(model, ev_data, ev_idx, len(names), train_device)
                row = {
                    "method": method, "k": k, "seed": seed, "erase": bool(erase), "accuracy": acc,
                    "synthetic_share": counter.share(), "num_train": len(subset), "num_test": len(ev_idx),
                    "prepare_seconds": round(t1 - t0, 2), "train_seconds": round(time.perf_counter() - t1, 2),
                    "classifier": spec.name, "config": config,
                }
                if method == "da-fusion":
                    row["tokens"] = token_files[(k, seed)]  # which file of the tokens folder these variants came from
                rows.append(row)
                if _on_run is not None:
                    _on_run(row)
                _write(rows, files, confidence, config, settings)
                bar.update(1)
    finally:
        bar.close()
    _write(rows, files, confidence, config, settings)
    if grid_classes:
        k0, s0 = grid[0]
        subset0 = [pool.item(i) for i in few_shot_indices(targets, k0, s0, num_classes=len(names))]
        files["grid"] = augmentation_grid(
            grid_rows(subset0, k0, s0), ["real"] + [f"strength {s:g}" for s in strength], out / "augmentations.png",
            title=f"k={k0}, seed={s0}: each real image, then its variant at each strength (same generator seed)"
            + (" — class erased" if erase else ""),
        )
    return FewShotResult(rows, confidence, files)


def _write(rows: list[dict[str, Any]], files: dict[str, Path], confidence: float, config: str, settings: dict[str, Any]) -> None:
    from ._report import _atomic_write

    result = FewShotResult(rows, confidence, files)
    extra = {"config": config, "confidence": confidence, "settings": settings, "summary": result.summary}
    write_rows(rows, files["csv"], files["json"], extra=extra)
    _atomic_write(files["summary"], result.report().encode())
    plot_summary(result.summary, files["plot"], title=f"few-shot accuracy (mean ± {confidence:.0%} CI)")


from ._demo import run_demo  # noqa: E402  (the demo module imports this one lazily)
