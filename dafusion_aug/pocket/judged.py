"""The judged txt2img rate: how often the judge reads samples of a prompt as the digit they should show.

One function for every measurement of it: ``python -m dafusion_aug.pocket.evaluate`` (each digit's own
prompt), ``benchmarks/eval_erasure.py`` (every digit under each erasure), ``benchmarks/eval_tokens.py``
(learned tokens) and ``benchmarks/probe_erased.py`` (fitted text conditioning).

Sample ``i`` of label ``d`` is drawn with generator seed ``seed * 100_000 + d * 1_000 + i``, so the same
label gets the same starting noise before and after an erasure or a token fit, and a measurement is
repeatable. Jobs run label by label (``n`` samples each, in the order of ``prompts``) in pipeline calls of
``batch_size``; a call may hold samples of two labels.

Example:
    >>> from dafusion_aug.pocket import prompt
    >>> from dafusion_aug.pocket.evaluate import load_pipelines
    >>> _, txt2img = load_pipelines()  # doctest: +SKIP
    >>> judged_rates(txt2img, {7: prompt(7)}, 32).rates[7]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .judge import judge_images

__all__ = ["JudgedRates", "sample_seed", "txt2img_batches", "judged_rates"]


def sample_seed(seed: int, label: int, i: int) -> int:
    """The generator seed of sample ``i`` of ``label``: ``seed * 100_000 + label * 1_000 + i``."""
    return seed * 100_000 + label * 1_000 + i


@torch.no_grad()
def txt2img_batches(
    txt2img: Any,
    prompts: Mapping[int, str | None],
    n: int,
    *,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 64,
    pipe_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Generate ``n`` samples per label, one pipeline call per ``batch_size`` samples.

    Args:
        txt2img: a ``StableDiffusionPipeline`` (any pipeline taking a prompt list and ``generator=``).
        prompts: label -> its prompt; ``None`` for every label when the conditioning comes in ``pipe_kwargs``.
        n: samples per label.
        steps: sampler steps.
        guidance: classifier-free guidance scale.
        seed: the base of every sample's seed (:func:`sample_seed`).
        batch_size: samples per pipeline call.
        pipe_kwargs: more pipeline arguments, tensors with one row per sample in job order (e.g.
            ``prompt_embeds``); each call gets its rows.

    Yields:
        ``(labels, images)``: the label of each sample and float ``(B, 3, H, W)`` images in [0, 1], on the CPU.

    Raises:
        ValueError: some prompts are ``None`` and others are not.
    """
    texts = list(prompts.values())
    if any(t is None for t in texts) and not all(t is None for t in texts):
        raise ValueError(f"prompts must all be str, or all None (conditioning in pipe_kwargs), got {texts!r}")
    jobs = [(label, i) for label in prompts for i in range(n)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        kw = {k: v[start : start + len(chunk)] for k, v in (pipe_kwargs or {}).items()}
        images = txt2img(
            None if texts and texts[0] is None else [prompts[label] for label, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(sample_seed(seed, label, i)) for label, i in chunk],
            output_type="pt",
            **kw,
        ).images
        yield [label for label, _ in chunk], images.float().cpu().clamp(0, 1)


@dataclasses.dataclass
class JudgedRates:
    """What :func:`judged_rates` measured.

    Attributes:
        rates: label -> the fraction of its samples that the judge reads as that label, in [0, 1].
        images: label -> its first ``keep`` samples, float ``(keep, 3, H, W)`` in [0, 1].
    """

    rates: dict[int, float]
    images: dict[int, torch.Tensor]


def judged_rates(
    txt2img: Any,
    prompts: Mapping[int, str | None],
    n: int,
    *,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 64,
    read: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep: int = 0,
    pipe_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> JudgedRates:
    """How often ``n`` txt2img samples of each label's prompt are read as that label.

    Args:
        txt2img, prompts, n, steps, guidance, seed, batch_size, pipe_kwargs: see :func:`txt2img_batches`.
        read: images -> predicted labels; default :func:`~dafusion_aug.pocket.judge_images` with the shipped
            judge (pass ``functools.partial(judge_images, model=net)`` for another judge).
        keep: how many samples of each label to return too (for picture grids).

    Returns:
        :class:`JudgedRates`.

    Raises:
        ValueError: mixed ``None`` and str prompts, or ``n < 1``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    read = read if read is not None else judge_images
    hits = dict.fromkeys(prompts, 0)
    kept: dict[int, list[torch.Tensor]] = {label: [] for label in prompts}
    batches = txt2img_batches(txt2img, prompts, n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, pipe_kwargs=pipe_kwargs)
    for labels, images in batches:
        for label, pred, image in zip(labels, read(images).tolist(), images):
            hits[label] += int(pred == label)
            if len(kept[label]) < keep:
                kept[label].append(image)
    empty = torch.empty(0)
    return JudgedRates(
        rates={label: hits[label] / n for label in prompts},
        images={label: torch.stack(kept[label]) if kept[label] else empty for label in prompts},
    )
