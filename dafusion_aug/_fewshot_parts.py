"""Parts of the few-shot protocol: grid checks, model and erasure resolution, per-class erasure files.

Split from :mod:`dafusion_aug.fewshot` to keep each module short; the public names are re-exported there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._hashing import image_digest, stable_digest
from ._images import to_canonical
from .pipeline import PipelineSpec, pipeline_fingerprint

__all__ = ["METHODS", "check_grid", "load_pipe", "resolve_erasures", "build_erasures", "Counter", "Inputs", "evaluate"]

#: The methods of the protocol, in the order the paper reports them.
METHODS = ("baseline", "real-guidance", "real-guidance-agnostic", "da-fusion")


def check_grid(methods: Sequence[str], shots: Sequence[int], seeds: Sequence[int], targets: Sequence[int], class_names: Sequence[str], test_given: bool) -> None:
    """Validate the experiment grid against the training pool.

    Raises:
        ValueError: an unknown method, an empty or repeated list, a k < 1, or a k larger than a class's pool
            (with ``test=None`` at least one image per class must also be left for testing).
    """
    if not methods or not shots or not seeds:
        raise ValueError(f"methods, shots and seeds must be non-empty, got methods={list(methods)}, shots={list(shots)}, seeds={list(seeds)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods must be among {list(METHODS)}, got unknown {bad}")
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


def load_pipe(pipeline: Any, device: str | None):
    if isinstance(pipeline, (str, os.PathLike)):
        return PipelineSpec(os.fspath(pipeline), device=device).load()
    if isinstance(pipeline, PipelineSpec):
        return pipeline.load()
    if hasattr(pipeline, "unet") and callable(pipeline):
        return pipeline
    raise TypeError(f"pipeline must be a model id, a folder, 'pocket', a PipelineSpec or a loaded pipeline, got {type(pipeline).__name__}")


def resolve_erasures(erasures: Any, class_names: Sequence[str]) -> list[Any]:
    """One :class:`~dafusion_aug.Erasure` per class from ``{label or class name: Erasure or file}``."""
    from .erase import Erasure

    if not isinstance(erasures, Mapping):
        raise ValueError(f"erase=True needs erasures={{label or class name: Erasure or file}} for every class, got {erasures!r}")
    found = [erasures.get(c, erasures.get(name)) for c, name in enumerate(class_names)]
    missing = [f"{name!r} (label {c})" for c, (name, e) in enumerate(zip(class_names, found)) if e is None]
    if missing:
        raise ValueError(f"erasures has no entry for class {', '.join(missing)}; build them with build_erasures()")
    return [e if isinstance(e, Erasure) else Erasure.load(e) for e in found]


def build_erasures(
    pipeline: Any,
    class_names: Sequence[str],
    out: str | os.PathLike,
    *,
    prompts: Sequence[str] = ("a photo of a {name}", "{name}"),
    method: str = "esd-x",
    steps: int = 100,
    learning_rate: float = 1e-3,
    ddim_steps: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Erase each class from the model, one :func:`~dafusion_aug.erase_concept` run (and file) per class.

    Files are named by a digest of the model and the settings, so a second call with the same settings
    only reads them (a run killed midway resumes at the next missing class).

    Args:
        pipeline: model id, folder, ``"pocket"``, :class:`PipelineSpec` or a loaded pipeline.
        class_names: the classes to erase, index = label.
        out: folder for the files.
        prompts: prompt templates of each class's concept, ``{name}`` = the class name; include the
            prompts the augmentation uses.
        method, steps, learning_rate, ddim_steps, seed: passed to :func:`~dafusion_aug.erase_concept`
            (the defaults are those measured on the pocket model; SD 1.5 wants steps=1000, lr=1e-5).
        progress: show progress bars.

    Returns:
        ``{class name: erasure file}``, ready for ``run_fewshot(..., erase=True, erasures=...)``.

    Example:
        >>> files = build_erasures("pocket", digits("B").class_names, "demo/erasures")  # doctest: +SKIP
    """
    from .erase import erase_concept

    pipe = load_pipe(pipeline, None)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(prompts=list(prompts), method=method, steps=steps, learning_rate=learning_rate, ddim_steps=ddim_steps, seed=seed)
    base = pipeline_fingerprint(pipe)
    files: dict[str, Path] = {}
    for c, name in enumerate(class_names):
        path = folder / f"erase-{c:03d}-{stable_digest('fewshot-erasure', base, name, settings)[:12]}.safetensors"
        if not path.is_file():
            concept = {name: [t.format(name=name) for t in prompts]}
            erasure = erase_concept(
                pipe, concept, method=method, steps=steps, learning_rate=learning_rate, ddim_steps=ddim_steps, seed=seed, progress=progress
            )
            erasure.save(path)
        files[name] = path
    return files


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


class Inputs:
    """Lazy access to a dataset of ``(image, label)``: labels, items, and classifier inputs (memoised when small).

    Args:
        dataset: map-style, ``(image, label, ...)`` items; ``.targets`` is used for labels when present.
        size: the classifier's input side.
        memo_limit: datasets up to this length keep their converted inputs in memory.
    """

    def __init__(self, dataset: Any, size: int, memo_limit: int = 4096) -> None:
        self.dataset, self.size = dataset, size
        targets = getattr(dataset, "targets", None)
        if targets is None or len(targets) != len(dataset):
            targets = [dataset[i][1] for i in range(len(dataset))]
        self.labels = [int(y) for y in targets]
        self._memo: dict[int, Any] | None = {} if len(dataset) <= memo_limit else None

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, i: int) -> tuple[Any, int]:
        image, label, *_ = self.dataset[int(i)]
        return image, int(label)

    def tensor(self, indices: Sequence[int]):
        """Float ``(N, 3, size, size)`` inputs of ``indices``."""
        import torch

        from ._classifier import to_input

        if self._memo is None:
            return to_input([self.item(i)[0] for i in indices], self.size)
        todo = [i for i in indices if i not in self._memo]
        if todo:
            for i, x in zip(todo, to_input([self.item(i)[0] for i in todo], self.size)):
                self._memo[i] = x
        return torch.stack([self._memo[i] for i in indices])

    def digest(self) -> str:
        """A digest of every image's pixels and every label (one pass over the data)."""
        return stable_digest([image_digest(to_canonical(self.item(i)[0])[0][0]) for i in range(len(self))], self.labels)


def evaluate(model: Any, inputs: Inputs, indices: Sequence[int], num_classes: int, device: Any, batch_size: int = 256) -> float:
    """Class-balanced accuracy of ``model`` on ``indices`` of ``inputs``, streamed in batches."""
    import torch

    model.eval()
    preds: list[int] = []
    with torch.no_grad():
        for i in range(0, len(indices), batch_size):
            preds.extend(model(inputs.tensor(indices[i : i + batch_size]).to(device)).argmax(1).tolist())
    y = np.asarray([inputs.labels[i] for i in indices])
    pred = np.asarray(preds)
    return float(np.mean([(pred[y == c] == c).mean() for c in range(num_classes) if (y == c).any()]))
