"""Evidence that ``fit_tokens`` learns classes: tokens fitted on a few images per digit drive txt2img.

For each digit, ``--shots`` images of part B (never seen by the pocket model or its judge) are drawn with
``few_shot_indices``; one ``fit_tokens`` run learns all ten tokens jointly. Then ``--samples`` txt2img
samples per digit ("a photo of a {token}", guidance 7.5, 50 DDIM steps) are read by the pocket judge.
Rows, for each initializer: the untrained start (the initializer word itself in the prompt, which is
exactly what the token holds before training) and the learned tokens.

With ``--erased``, each digit d is first erased with ``erase_concept`` (the files and default settings of
benchmarks/eval_erasure.py, reused from ``--erasure-work`` or built there). With that erasure applied,
the plain prompt "a photo of a {word(d)}" is judged (the erased model should have lost the digit), then
d's token is fitted on the d-erased model from d's images alone (``--fit alone``, the default: one run per
class, as ``run_fewshot(erase=True)`` and DA-Fusion do; ``--fit joint`` fits all ten tokens together on
it), initializer "the" by default, and judged with the erasure still applied. Each cell is a digit's
rate under its own erasure.

Usage:
    python benchmarks/eval_tokens.py                      # the shipped pocket model
    python benchmarks/eval_tokens.py --model FOLDER --steps 300 --samples 16
    python benchmarks/eval_tokens.py --erased --steps 20 --samples 4 --digits 3 7 --grid grid.png  # smoke test
    python benchmarks/eval_tokens.py --erased --num-vectors 4 --scale-lr   # the recipe docs/tokens.md recommends
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from dafusion_aug import Erasure, PipelineSpec, few_shot_indices, fit_tokens
from dafusion_aug.pipeline import PipelineSource
from dafusion_aug.pocket import CLASS_NAMES, digits, judge, judge_images, judged_rates


def img2img_pipeline(folder: str):
    """A private copy of the img2img pipeline of a pocket-layout model folder, in float32.

    Loaded the library's way (safetensors only, quietly); fresh, because callers add tokens or erase.
    """
    return PipelineSource(spec=PipelineSpec(folder, dtype="float32")).load(fresh=True)


def ddim_sampler(img2img):
    """A DDIM txt2img pipeline sharing ``img2img``'s modules (so its tokens and erased weights too)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**img2img.components)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _txt2img(folder: str, tokens=None):
    img2img = img2img_pipeline(folder)
    if tokens is not None:
        tokens.apply(img2img)
    return ddim_sampler(img2img)


def judged_rate(pipe, text: str | None, label: int, samples: int, seed: int, judge_net, batch_size: int = 64, keep: int = 0,
                pipe_kwargs: dict | None = None):
    """``(fraction of samples the judge reads as label, the first keep images)``: ``dafusion_aug.pocket.judged_rates``
    for one label (50 DDIM steps, guidance 7.5, seeds fixed per label).

    ``pipe_kwargs`` (e.g. ``prompt_embeds``, with ``text=None``): tensors of ``samples`` rows, sliced per batch.
    """
    judged = judged_rates(pipe, {label: text}, samples, seed=seed, batch_size=batch_size, keep=keep, pipe_kwargs=pipe_kwargs,
                          read=lambda images: judge_images(images, model=judge_net))
    return judged.rates[label], list(judged.images[label])


def _accuracy(pipe, prompts: list[str], samples: int, seed: int, judge_net, batch_size: int = 64) -> list[float]:
    """Per digit: the fraction of ``samples`` images from ``prompts[digit]`` that the judge reads as that digit."""
    return [judged_rate(pipe, text, label, samples, seed, judge_net, batch_size)[0] for label, text in enumerate(prompts)]


def _erased(args, folder: str, items, judge_net, rows: dict, report: dict) -> list:
    """The ``--erased`` rows: per digit, its own erasure applied to the pipeline that fits and that samples."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import eval_erasure

    erasure_args = eval_erasure.parse_args(["--model", args.model, "--work", args.erasure_work, *args.erasure_args])
    grid = []
    report["erasures"] = {}
    for d in args.digits:
        t0 = time.perf_counter()
        erasure, path, trained_s = eval_erasure.erasure_for(d, erasure_args)
        info = report["erasures"][CLASS_NAMES[d]] = {"file": str(path), "erase_s": trained_s, "fit": {}}
        print(f"[erased {d}] {path} ({'loaded' if trained_s is None else f'trained in {trained_s}s'})", flush=True)
        for k, init in enumerate(args.initializers):
            img2img = img2img_pipeline(folder)  # fresh per fit: no tokens of an earlier digit in its vocabulary
            with erasure.applied(img2img):
                if k == 0:
                    rate, images = judged_rate(ddim_sampler(img2img), f"a photo of a {CLASS_NAMES[d]}", d, args.samples, args.seed,
                                         judge_net, keep=args.grid_samples)
                    rows.setdefault("erased d, 'a photo of a {word}'", {})[d] = rate
                    grid.append(images)
                    print(f"[erased {d}] 'a photo of a {CLASS_NAMES[d]}': {rate:.0%}", flush=True)
                t1 = time.perf_counter()
                if args.fit == "alone":  # d's token alone, from d's images: what run_fewshot(erase=True) does
                    fit_items, fit_names, label = [(im, 0) for im, y in items if y == d], [CLASS_NAMES[d]], 0
                else:
                    fit_items, fit_names, label = items, list(CLASS_NAMES), d
                tokens = fit_tokens(
                    img2img, fit_items, fit_names, initializer=init, steps=args.steps, batch_size=args.batch_size,
                    learning_rate=args.lr, scale_lr=args.scale_lr, num_vectors=args.num_vectors, seed=args.seed, progress=False,
                    templates=args.templates,
                )
                fit_s = time.perf_counter() - t1
                assert Erasure.active(img2img) is erasure  # fit_tokens must not have undone the erasure
                tokens.apply(img2img)
                sampler = ddim_sampler(img2img)  # built after apply: load_textual_inversion resizes the embeddings
                assert sampler.unet is img2img.unet and sampler.text_encoder is img2img.text_encoder
                token = tokens.token_for(label)
                rate, images = judged_rate(sampler, f"a photo of a {token}", d, args.samples, args.seed, judge_net,
                                     keep=args.grid_samples)
            name = "erased d, learned token" + (f" (initializer {init!r})" if len(args.initializers) > 1 else "")
            rows.setdefault(name, {})[d] = rate
            grid.append(images)
            info["fit"][init] = {"final_loss": tokens.metadata["final_loss"], "fit_s": round(fit_s, 1),
                                 "base_model": tokens.metadata["base_model"], "token": token}
            print(f"[erased {d}] {init!r} final loss {tokens.metadata['final_loss']:.4f}, fit {fit_s:.0f}s; "
                  f"'a photo of a {token}': {rate:.0%} ({time.perf_counter() - t0:.0f}s for this digit)", flush=True)
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pocket", help="'pocket' or a pocket-layout model folder")
    ap.add_argument("--shots", type=int, default=4, help="training images per digit (part B)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scale-lr", action="store_true")
    ap.add_argument("--num-vectors", type=int, default=1, help="vectors per token")
    ap.add_argument("--templates", nargs="+", default=None,
                    help="fit_tokens templates (default: the textual-inversion list); the samples use 'a photo of a {}'")
    ap.add_argument("--initializers", nargs="+", default=None,
                    help="default: 'the' and 'class_name'; with --erased only 'the'")
    ap.add_argument("--samples", type=int, default=64, help="txt2img samples per digit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--erased", action="store_true", help="erase each digit first (see above)")
    ap.add_argument("--fit", choices=["alone", "joint"], default="alone",
                    help="--erased: fit d's token alone from d's images on the d-erased model (as run_fewshot(erase=True)"
                         " does), or all ten tokens jointly on it")
    ap.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="digits to erase (--erased only)")
    ap.add_argument("--erasure-work", default="runs/eval_erasure",
                    help="erasure files of benchmarks/eval_erasure.py (--erased only)")
    ap.add_argument("--erasure-args", nargs=argparse.REMAINDER, default=[],
                    help="--erased: the rest of the line goes to eval_erasure.py as its options (e.g. --lr 1e-3 for a "
                         "milder erasure; its files are named by their settings)")
    ap.add_argument("--grid", default=None, help="--erased: save a PNG of the first samples, two rows per digit")
    ap.add_argument("--grid-samples", type=int, default=8, help="samples per row of --grid")
    args = ap.parse_args()
    if args.initializers is None:
        args.initializers = ["the"] if args.erased else ["the", "class_name"]
    torch.set_num_threads(args.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # the loading bars of one pipeline per fit
    wall0, cpu0 = time.perf_counter(), time.process_time()
    folder = str(PipelineSpec(args.model).local_path())
    judge_net = judge(args.judge)
    data = digits("B")
    items = [data[i] for i in few_shot_indices(data.targets, args.shots, args.seed, num_classes=10)]
    if args.erased:
        erased_rows: dict[str, dict[int, float]] = {}
        report = {"args": vars(args), "rows": erased_rows}
        grid = _erased(args, folder, items, judge_net, erased_rows, report)
        report["wall_s"] = round(time.perf_counter() - wall0, 1)
        report["cpu_s"] = round(time.process_time() - cpu0, 1)  # the machine may be shared: CPU seconds tell the cost
        print("| prompt | " + " | ".join(f"{d} ({CLASS_NAMES[d]})" for d in args.digits) + " | mean |")
        print("|" + " --- |" * (len(args.digits) + 2))
        for name, accs in erased_rows.items():
            vals = [accs[d] for d in args.digits]
            print(f"| {name} | " + " | ".join(f"{100 * a:.0f}" for a in vals) + f" | {100 * sum(vals) / len(vals):.1f} |")
        print(f"\ntotal {report['wall_s']}s wall, {report['cpu_s']}s CPU (this process)")
        if args.grid and grid:
            from torchvision.utils import save_image

            per_row = max(len(g) for g in grid)
            save_image(torch.stack([im for g in grid for im in g]), args.grid, nrow=per_row, padding=1)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        return
    rows: dict[str, list[float]] = {}
    report = {"args": vars(args), "rows": rows, "fit": {}}
    for init in args.initializers:
        start_words = list(CLASS_NAMES) if init == "class_name" else [init] * 10
        t0 = time.perf_counter()
        rows[f"untrained start ({init!r}): 'a photo of a {{word}}'"] = _accuracy(
            _txt2img(folder), [f"a photo of a {w}" for w in start_words], args.samples, args.seed, judge_net
        )
        tokens = fit_tokens(
            args.model, items, list(CLASS_NAMES), initializer=init, steps=args.steps, batch_size=args.batch_size,
            learning_rate=args.lr, scale_lr=args.scale_lr, num_vectors=args.num_vectors, seed=args.seed, device="cpu",
            templates=args.templates,
        )
        fit_s = time.perf_counter() - t0
        rows[f"fit_tokens (initializer {init!r}): 'a photo of a {{token}}'"] = _accuracy(
            _txt2img(folder, tokens), [f"a photo of a {t}" for t in tokens.tokens], args.samples, args.seed, judge_net
        )
        report["fit"][init] = {"final_loss": tokens.metadata["final_loss"], "seconds_incl_untrained_eval": round(fit_s, 1)}
        print(f"[{init}] final loss {tokens.metadata['final_loss']:.4f}", flush=True)
    header = "| prompt | " + " | ".join(CLASS_NAMES) + " | mean |"
    print(header)
    print("|" + " --- |" * (len(CLASS_NAMES) + 2))
    for name, accs in rows.items():
        cells = " | ".join(f"{100 * a:.0f}" for a in accs)
        print(f"| {name} | {cells} | {100 * sum(accs) / len(accs):.1f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
