"""Per-class erasures of the few-shot protocol: class c is augmented by the model with c erased.

:func:`build_erasures` trains one :class:`~dafusion_aug.Erasure` per class (files named by a digest of the
model and the settings, so a second call only finds them); :func:`resolve_erasures` reads the mapping a
caller passes to :func:`~dafusion_aug.fewshot.run_fewshot`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..erase import ensure_erasure
from ..erasure import Erasure
from ..hashing import stable_digest
from ..pipeline import pipeline_fingerprint, resolve_pipeline

__all__ = ["build_erasures", "resolve_erasures"]


def resolve_erasures(erasures: Any, class_names: Sequence[str]) -> list[Erasure]:
    """One :class:`~dafusion_aug.Erasure` per class from ``{label or class name: Erasure or file}``.

    Raises:
        ValueError: not a mapping, or a class without an entry.
    """
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
    preserve_others: bool = False,
    preserve: Sequence[str] = (),
    preserve_weight: float = 1.0,
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
        preserve_others: class c's erasure keeps the other classes' prompts (``prompts`` filled with their
            names) as they were: ``erase_concept(..., preserve=...)``, so erasing one class leaves the rest.
        preserve: more prompts every erasure keeps (e.g. class-agnostic or attribute prompts).
        preserve_weight: weight of the preservation term.
        progress: show progress bars.

    Returns:
        ``{class name: erasure file}``, ready for ``run_fewshot(..., erase=True, erasures=...)``.

    Example:
        >>> files = build_erasures("pocket", digits("B").class_names, "demo/erasures")  # doctest: +SKIP
    """
    pipe = resolve_pipeline(pipeline).load()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = dict(prompts=list(prompts), method=method, steps=steps, learning_rate=learning_rate,
                                    ddim_steps=ddim_steps, seed=seed)
    if preserve_others or preserve:  # only then, so files of plain ESD keep their names
        settings.update(preserve_others=bool(preserve_others), preserve=list(preserve), preserve_weight=float(preserve_weight))
    base = pipeline_fingerprint(pipe)
    files: dict[str, Path] = {}
    for c, name in enumerate(class_names):
        path = folder / f"erase-{c:03d}-{stable_digest('fewshot-erasure', base, name, settings)[:12]}.safetensors"
        concept = {name: [t.format(name=name) for t in prompts]}
        others = [t.format(name=other) for other in class_names if other != name for t in prompts] if preserve_others else []
        kept = others + list(preserve)
        ensure_erasure(path, pipe, concept, method=method, steps=steps, learning_rate=learning_rate, ddim_steps=ddim_steps,
                       seed=seed, progress=progress, preserve=kept or None, preserve_weight=preserve_weight)
        files[name] = path
    return files

