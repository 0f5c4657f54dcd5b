"""The scene world's ceiling: how much a perfect nuisance redraw adds over standard augmentation.

Runs the few-shot protocol on :func:`dafusion_aug.pocket.scenes.scenes` part B (few-shot subsets drawn
from it, tested on the rest) with two methods that need no diffusion model: ``baseline`` (standard
augmentation only) and ``oracle-scene`` (the same glyph at the same place in a freshly drawn scene, an
upper bound that reads the renderer), under two standard augmentations: affine only, and affine + colour
(channel shuffle, 30 % greyscale, brightness 0.7..1.3; what a practitioner would use on such pictures).
Classifiers only: minutes on a CPU.

Example:
    python benchmarks/scene_ceiling.py --out runs/scene-ceiling --shots 1 2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dafusion_aug.fewshot import run_fewshot
from dafusion_aug.fewshot.classifier import small_cnn
from dafusion_aug.fewshot.report import paired_differences
from dafusion_aug.pocket.scenes import scenes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scene-ceiling"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="classifier steps (the issue's calibration: 600)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-variants", type=int, default=10)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--augmentation", nargs="+", default=["colour", "affine"], choices=["colour", "affine"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pool = scenes("B")
    report = {}
    for aug in args.augmentation:
        spec = small_cnn(steps=args.steps, image_size=args.image_size, colour=aug == "colour")
        res = run_fewshot("pocket", pool, out=args.out / aug, methods=["baseline", "oracle-scene"], shots=args.shots, seeds=args.seeds,
                          classifier=spec, num_variants=args.num_variants, p=args.p, device="cpu", progress=True)
        diffs = paired_differences(res.rows, "oracle-scene", "baseline", 0.95)
        print(f"\n## standard augmentation: {aug}\n\n{res.table()}\noracle-scene minus baseline (points):")
        for d in diffs:
            print(f"  k={d['k']}: {d['mean'] * 100:+.1f} [{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}]")
        report[aug] = {"summary": res.summary, "oracle_minus_baseline": diffs}
    (args.out / "ceiling.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
