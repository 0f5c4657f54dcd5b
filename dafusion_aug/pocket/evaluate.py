"""Measure the pocket model with its judge: ``python -m dafusion_aug.pocket.evaluate``.

* txt2img: ``n`` samples per digit from "a photo of a handwritten digit {word}" (guidance 7.5, 50 DDIM
  steps), per-digit accuracy as read by the judge (targets: every digit >= 80%, mean >= 90%);
* img2img over part B with the image's own prompt at strengths 0.25 / 0.5 / 0.75 / 1.0: how often the
  class is kept (target at 0.5: >= 90%); the same at 0.25 / 0.5 / 0.75 with the class-agnostic prompt
  "a photo of a handwritten digit";
* img2img over part B at strength 1.0 (and 0.5, for information) prompting the *next* digit
  ``(label + 1) % 10``: how often the output is the prompted digit (target at 1.0: >= 80%);
* attributes (v2): every attribute word of :mod:`dafusion_aug.pocket.attributes`, prompted without a
  digit ("a photo of a bold handwritten digit") and with each digit that shows that attribute in at least
  15% of part A ("a photo of a bold handwritten digit seven"): how often the sample's own measured
  attribute is the one prompted (target: >= 80% without a digit, and >= 80% on average with one).

It writes a JSON report and picture grids (rows = digits) for the docs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import attributes, model_path, prompt
from .arch import ATTRIBUTE_CLASS_TEMPLATES, ATTRIBUTE_ONLY_TEMPLATES
from .data import CLASS_NAMES, digits
from .judge import judge, judge_images
from .judged import judged_rates, txt2img_batches

#: The class-agnostic prompt measured with img2img (names no digit).
AGNOSTIC_PROMPT = "a photo of a handwritten digit"

__all__ = [
    "AGNOSTIC_PROMPT",
    "load_pipelines",
    "txt2img_samples",
    "img2img_outputs",
    "attribute_prompts",
    "attribute_only_prompts",
    "attribute_report",
    "save_grid",
    "evaluate",
    "main",
]


def load_pipelines(folder: str | Path | None = None):
    """Load the pocket model in float32 on the CPU.

    Args:
        folder: a saved pipeline folder; defaults to :func:`dafusion_aug.pocket.model_path`.

    Returns:
        ``(img2img, txt2img)``: a ``StableDiffusionImg2ImgPipeline`` and a ``StableDiffusionPipeline``
        sharing its components, progress bars disabled.
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    folder = Path(folder) if folder is not None else model_path()
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(str(folder))  # float32 (see docs/pocket.md)
    txt2img = StableDiffusionPipeline(**img2img.components)
    for pipe in (img2img, txt2img):
        pipe.set_progress_bar_config(disable=True)
    return img2img, txt2img


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def txt2img_samples(
    txt2img, label: int, n: int, steps: int = 50, guidance: float = 7.5, seed: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """Generate ``n`` images of one digit from its standard prompt.

    Args:
        txt2img: a ``StableDiffusionPipeline``.
        label: the digit.
        n: how many images.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        seed: sample ``i`` uses generator seed ``seed * 100_000 + label * 1_000 + i``.
        batch_size: images per pipeline call.

    Returns:
        Float ``(n, 3, 32, 32)`` in [0, 1].
    """
    batches = txt2img_batches(txt2img, {label: prompt(label)}, n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)
    return torch.cat([images for _, images in batches])


@torch.no_grad()
def img2img_outputs(
    img2img,
    images: torch.Tensor,
    prompts: Sequence[int | str],
    strength: float,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 128,
) -> torch.Tensor:
    """Run img2img over a batch of images, each with its own prompt.

    Args:
        img2img: a ``StableDiffusionImg2ImgPipeline``.
        images: float ``(N, 3, 32, 32)`` in [0, 1].
        prompts: per image, a prompt, or a digit (its standard prompt :func:`dafusion_aug.pocket.prompt`).
        strength: the img2img strength.
        steps: DDIM steps at strength 1 (``int(steps * strength)`` run).
        guidance: classifier-free guidance scale.
        seed: image ``i`` uses generator seed ``seed * 100_000 + i``.
        batch_size: images per pipeline call.

    Returns:
        Float ``(N, 3, 32, 32)`` in [0, 1].
    """
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        texts = [p if isinstance(p, str) else prompt(int(p)) for p in prompts[start : start + batch_size]]
        result = img2img(
            texts,
            image=batch,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=_generators([seed * 100_000 + start + i for i in range(len(batch))]),
            output_type="pt",
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


#: A (digit, attribute level) pair is checked with the digit named when part A shows it this often.
MIN_SHARE = 0.15


def attribute_prompts(name: str, level: int, label: int | None) -> str:
    """The check's prompt for one attribute word, e.g. "a photo of a bold handwritten digit seven".

    Args:
        name: the attribute (:data:`dafusion_aug.pocket.attributes.ATTRIBUTES`).
        level: 0, 1 or 2; it must have a word.
        label: the digit to name, or None.

    Raises:
        ValueError: when that level has no word.
    """
    word = attributes.WORDS[name][level]
    if word is None:
        raise ValueError(f"attribute {name!r} has no word for level {level}")
    adj, suffix = ("a", f" {word}") if word.startswith("with") else (("an" if word[0] in "aeiou" else "a") + f" {word}", "")
    if label is None:
        return ATTRIBUTE_ONLY_TEMPLATES[0].format(adj=adj, suffix=suffix)
    return ATTRIBUTE_CLASS_TEMPLATES[0].format(adj=adj, name=CLASS_NAMES[label], suffix=suffix)


def attribute_only_prompts() -> tuple[str, ...]:
    """The check's prompt of every attribute word without a digit, in :func:`~dafusion_aug.pocket.attributes.attribute_words`
    order ("a photo of a thin handwritten digit", ...): what the demo's erasures preserve."""
    return tuple(attribute_prompts(name, level, None) for name in attributes.ATTRIBUTES
                 for level, word in enumerate(attributes.WORDS[name]) if word is not None)


@torch.no_grad()
def _txt2img(txt2img, text: str, n: int, steps: int, guidance: float, seed: int, batch_size: int = 64) -> torch.Tensor:
    out = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        result = txt2img(
            [text] * count,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=_generators([seed * 100_000 + start + i for i in range(count)]),
            output_type="pt",
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


def attribute_report(
    txt2img,
    n: int = 32,
    n_per_digit: int = 16,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    net=None,
    log=print,
    with_digits: bool = True,
) -> dict[str, dict[str, object]]:
    """Check that every attribute word draws what it says, by the sample's own measured attribute.

    Args:
        txt2img: a ``StableDiffusionPipeline`` of the pocket model.
        n: samples per word without a digit.
        n_per_digit: samples per (word, digit) pair, for the digits that show the attribute in at least
            :data:`MIN_SHARE` of part A.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        seed: the base seed.
        net: the judge (default: the shipped one).
        log: where per-word lines go (None: silent).
        with_digits: also check the word with each digit named.

    Returns:
        ``{word: {"prompt", "without_digit", "with_digit_mean", "with_digit_min", "digits",
        "with_digit", "judged_as_digit"}}``: shares in [0, 1]; ``with_digit`` maps digit names to
        shares.
    """
    net = net if net is not None else judge()
    images, labels = digits("A").tensors()
    part_a = attributes.levels(attributes.measure(images))
    labels = labels.numpy()
    report: dict[str, dict[str, object]] = {}
    for name in attributes.ATTRIBUTES:
        for level, word in enumerate(attributes.WORDS[name]):
            if word is None:
                continue
            text = attribute_prompts(name, level, None)
            samples = _txt2img(txt2img, text, n, steps, guidance, seed)
            entry: dict[str, object] = {
                "prompt": text,
                "without_digit": round(attributes.agreement(attributes.measure(samples), name, level), 4),
            }
            per_digit, judged = {}, {}
            for label in range(10) if with_digits else ():
                if np.mean(part_a[name][labels == label] == level) < MIN_SHARE:
                    continue
                out = _txt2img(txt2img, attribute_prompts(name, level, label), n_per_digit, steps, guidance, seed + 1 + label)
                per_digit[CLASS_NAMES[label]] = round(attributes.agreement(attributes.measure(out), name, level), 4)
                judged[CLASS_NAMES[label]] = _rate(judge_images(out, model=net), torch.full((len(out),), label))
            entry["with_digit"] = per_digit
            entry["judged_as_digit"] = judged
            entry["digits"] = len(per_digit)
            entry["with_digit_mean"] = round(float(np.mean(list(per_digit.values()))), 4) if per_digit else None
            entry["with_digit_min"] = min(per_digit.values()) if per_digit else None
            report[word] = entry
            if log is None:
                continue
            log(
                f"[attributes] {word:>14}: without a digit {entry['without_digit']:.2f}, with one "
                f"{entry['with_digit_mean'] if entry['with_digit_mean'] is not None else float('nan'):.2f} "
                f"(min {entry['with_digit_min'] if entry['with_digit_min'] is not None else float('nan'):.2f}, "
                f"{len(per_digit)} digits)"
            )
    return report


def save_grid(
    rows: Sequence[torch.Tensor], path: str | Path, labels: Sequence[str] | None = None, zoom: int = 2
) -> Path:
    """Save a picture grid, one row per tensor of images (float ``(K, 3, H, W)`` in [0, 1]).

    Args:
        rows: the images of each row (rows may differ in length).
        path: the PNG file to write.
        labels: optional text drawn left of each row.
        zoom: nearest-neighbour magnification of every tile.

    Returns:
        The path written.
    """
    h, w = rows[0].shape[-2:]
    th, tw = h * zoom, w * zoom
    gap = 2
    margin = 48 if labels else 0
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (margin + cols * (tw + gap) + gap, len(rows) * (th + gap) + gap), (90, 90, 90))
    draw = ImageDraw.Draw(canvas)
    for r, images in enumerate(rows):
        y = gap + r * (th + gap)
        if labels:
            draw.text((4, y + th // 2 - 6), labels[r], fill=(255, 255, 255))
        for c, image in enumerate(images):
            array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (margin + gap + c * (tw + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _rate(pred: torch.Tensor, target: torch.Tensor) -> float:
    return round(float((pred == target).float().mean()), 4)


def evaluate(
    folder: str | Path | None = None,
    n: int = 64,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    grid: str | Path | None = "docs/img/pocket_samples.png",
    img2img_grid: str | Path | None = "docs/img/pocket_img2img.png",
    strengths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    parts: Sequence[str] = ("txt2img", "img2img", "attributes"),
) -> dict[str, object]:
    """Run the whole evaluation (or some of its parts).

    Args:
        folder: the pipeline folder (default: the shipped model).
        n: txt2img samples per digit.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        seed: the base seed of every generator.
        grid: where to write the txt2img grid (16 samples per digit), or None.
        img2img_grid: where to write the img2img grid (one part-B image per digit at each strength), or None.
        strengths: the img2img strengths measured with the image's own prompt.
        parts: which measurements to run: ``"txt2img"``, ``"img2img"``, ``"attributes"``.

    Returns:
        The report (rates in [0, 1], timings in seconds).
    """
    torch.set_num_threads(2)
    net = judge()
    img2img, txt2img = load_pipelines(folder)
    report: dict[str, object] = {"n_per_digit": n, "steps": steps, "guidance": guidance, "seed": seed}
    unknown = set(parts) - {"txt2img", "img2img", "attributes"}
    if unknown:
        raise ValueError(f"parts must be among 'txt2img', 'img2img', 'attributes', got {sorted(unknown)}")
    if "txt2img" in parts:
        _txt2img_part(report, txt2img, net, n, steps, guidance, seed, grid)
    if "img2img" in parts:
        _img2img_part(report, img2img, net, steps, guidance, seed, img2img_grid, strengths)
    if "attributes" in parts:
        t0 = time.perf_counter()
        report["attributes"] = attribute_report(txt2img, seed=seed, guidance=guidance, net=net)
        report["attributes_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _txt2img_part(report, txt2img, net, n, steps, guidance, seed, grid) -> None:
    t0 = time.perf_counter()
    samples, per_digit = [], {}
    for label in range(10):
        judged = judged_rates(txt2img, {label: prompt(label)}, n, steps=steps, guidance=guidance, seed=seed,
                              read=lambda x: judge_images(x, model=net), keep=16)
        samples.append(judged.images[label])
        per_digit[CLASS_NAMES[label]] = round(judged.rates[label], 4)
        print(f"[txt2img] {CLASS_NAMES[label]:>5}: {per_digit[CLASS_NAMES[label]]:.3f}", flush=True)
    report["txt2img_accuracy_per_digit"] = per_digit
    report["txt2img_accuracy_mean"] = round(float(np.mean(list(per_digit.values()))), 4)
    report["txt2img_accuracy_min"] = min(per_digit.values())
    report["txt2img_seconds"] = round(time.perf_counter() - t0, 1)
    if grid is not None:
        save_grid([s[:16] for s in samples], grid, labels=list(CLASS_NAMES))


def _img2img_part(report, img2img, net, steps, guidance, seed, img2img_grid, strengths) -> None:
    part_b = digits("B")
    xb, yb = part_b.tensors()
    own: dict[str, float] = {}
    by_strength: dict[float, torch.Tensor] = {}
    t0 = time.perf_counter()
    for strength in strengths:
        outputs = img2img_outputs(img2img, xb, yb.tolist(), strength, steps, guidance, seed)
        by_strength[strength] = outputs
        own[str(strength)] = _rate(judge_images(outputs, model=net), yb)
        print(f"[img2img own prompt] strength {strength}: class kept {own[str(strength)]:.3f}", flush=True)
    report["img2img_own_prompt_class_kept"] = own
    agnostic: dict[str, float] = {}
    for strength in (0.25, 0.5, 0.75):
        outputs = img2img_outputs(img2img, xb, [AGNOSTIC_PROMPT] * len(xb), strength, steps, guidance, seed)
        agnostic[str(strength)] = _rate(judge_images(outputs, model=net), yb)
        print(
            f"[img2img '{AGNOSTIC_PROMPT}'] strength {strength}: class kept {agnostic[str(strength)]:.3f}",
            flush=True,
        )
    report["img2img_agnostic_prompt_class_kept"] = agnostic
    shifted = (yb + 1) % 10
    other: dict[str, dict[str, float]] = {}
    for strength in (0.5, 1.0):
        pred = judge_images(
            img2img_outputs(img2img, xb, shifted.tolist(), strength, steps, guidance, seed), model=net
        )
        other[str(strength)] = {"is_prompted_digit": _rate(pred, shifted), "is_source_digit": _rate(pred, yb)}
        print(f"[img2img next-digit prompt] strength {strength}: {other[str(strength)]}", flush=True)
    report["img2img_next_digit_prompt"] = other
    report["img2img_seconds"] = round(time.perf_counter() - t0, 1)

    if img2img_grid is not None:
        first = [yb.tolist().index(label) for label in range(10)]
        rows = [torch.stack([xb[i]] + [by_strength[s][i] for s in strengths]) for i in first]
        save_grid(rows, img2img_grid, labels=list(CLASS_NAMES), zoom=3)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m dafusion_aug.pocket.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="pipeline folder (default: the shipped model)"
    )
    parser.add_argument("--n", type=int, default=64, help="txt2img samples per digit")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default="docs/img/pocket_samples.png", help="txt2img grid PNG ('' to skip)")
    parser.add_argument(
        "--img2img-grid", default="docs/img/pocket_img2img.png", help="img2img grid PNG ('' to skip)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    parser.add_argument(
        "--parts", nargs="+", default=["txt2img", "img2img", "attributes"],
        choices=["txt2img", "img2img", "attributes"], help="which measurements to run",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    report = evaluate(
        args.model, args.n, args.steps, args.guidance, args.seed, args.grid or None, args.img2img_grid or None,
        parts=args.parts,
    )
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
