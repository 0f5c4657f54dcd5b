"""Evidence that ``fit_tokens`` learns classes: tokens fitted on a few images per digit drive txt2img.

For each digit, ``--shots`` images of part B (never seen by the pocket model or its judge) are drawn with
``few_shot_indices``; one ``fit_tokens`` run learns all ten tokens jointly. Then ``--samples`` txt2img
samples per digit ("a photo of a {token}", guidance 7.5, 50 DDIM steps) are read by the pocket judge.
Rows, for each initializer: the untrained start (the initializer word itself in the prompt, which is
exactly what the token holds before training) and the learned tokens.

Usage:
    python benchmarks/eval_tokens.py                      # the shipped pocket model
    python benchmarks/eval_tokens.py --model FOLDER --steps 300 --samples 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dafusion_aug import PipelineSpec, few_shot_indices, fit_tokens
from dafusion_aug.pocket import CLASS_NAMES, digits, judge, judge_images


def _txt2img(folder: str, tokens=None):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    if tokens is not None:
        tokens.apply(img2img)
    pipe = StableDiffusionPipeline(**img2img.components)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _accuracy(pipe, prompts: list[str], samples: int, seed: int, judge_net, batch_size: int = 64) -> list[float]:
    """Per digit: the fraction of ``samples`` images from ``prompts[digit]`` that the judge reads as that digit."""
    out = []
    for label, text in enumerate(prompts):
        hits = 0
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            gens = [torch.Generator().manual_seed(seed * 100_000 + label * 1_000 + start + i) for i in range(n)]
            images = pipe([text] * n, num_inference_steps=50, guidance_scale=7.5, generator=gens, output_type="pt").images
            hits += int((judge_images(images.float().clamp(0, 1), model=judge_net) == label).sum())
        out.append(hits / samples)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pocket", help="'pocket' or a pocket-layout model folder")
    ap.add_argument("--shots", type=int, default=4, help="training images per digit (part B)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scale-lr", action="store_true")
    ap.add_argument("--initializers", nargs="+", default=["the", "class_name"])
    ap.add_argument("--samples", type=int, default=64, help="txt2img samples per digit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = str(PipelineSpec(args.model).local_path())
    judge_net = judge(args.judge)
    data = digits("B")
    items = [data[i] for i in few_shot_indices(data.targets, args.shots, args.seed, num_classes=10)]
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
            learning_rate=args.lr, scale_lr=args.scale_lr, seed=args.seed, device="cpu",
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
