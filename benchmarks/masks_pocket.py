"""Masked edits on the pocket model: edit only each digit's ink, or only its background, and check the pixels.

    python benchmarks/masks_pocket.py --out docs/img/masks_pocket.png

For the first ``--per-class`` digits of each class (digits part B), the ink mask (grey level >= 128,
``dafusion_aug.fewshot.demo.ink_mask``) is grown by ``--grow`` pixels. Each image gets ``--variants``
variants per region ("all", "object", "background"; prompt "a photo of a {name}" with the class name,
strength ``--strength``). The script checks, for every variant, that the pixels outside the edited region
equal the real image's (tolerance 0; for "background" that covers all the ink, for "object" all the
background beyond the grown ink), counts changed pixels inside, asks the pocket judge which digit each
variant shows, and draws one row per digit: real, grown mask, then a variant per region.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dafusion_aug import DiffusionAugment
from dafusion_aug.fewshot.demo import ink_mask
from dafusion_aug.fewshot.report import augmentation_grid
from dafusion_aug.hashing import image_digest
from dafusion_aug.pocket import digits, judge_images
from dafusion_aug.regions import Region, edit_mask

REGIONS = ("all", "object", "background")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/img/masks_pocket.png")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--grow", type=int, default=1)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data = digits("B")
    names = data.class_names
    picked = [i for c in range(10) for i in [j for j, y in enumerate(data.targets) if y == c][: a.per_class]]
    augs = {r: DiffusionAugment("pocket", class_names=names, region=Region(r, grow=a.grow), strength=a.strength,
                                num_inference_steps=a.steps, num_variants=a.variants, p=1.0) for r in REGIONS}
    t0 = time.perf_counter()
    rows, judged, bad = [], {r: [] for r in REGIONS}, 0
    for i in picked:
        image, label = data[i]
        real = np.asarray(image)
        mask = ink_mask(image)
        row = [real, np.repeat(edit_mask(mask.numpy(), "object", a.grow)[..., None] * 255, 3, -1).astype(np.uint8)]
        for r, aug in augs.items():
            edit = aug.edit_masks((image, mask, label))[0]
            variants = [aug.variant(image_digest(real), label, v, edit) for v in range(a.variants)]
            made = aug.generate([real] * a.variants, variants, [label] * a.variants)
            for out in made:
                changed = (out != real).any(-1)
                keep = ~edit if edit is not None else np.zeros_like(changed)
                bad += int(changed[keep].sum())
                judged[r].append((out, label, float(changed[~keep].mean()) if (~keep).any() else 0.0))
            row.append(made[0])
        if len(rows) < 10 and (not rows or rows[-1][0] != names[label]):  # the grid: the first digit of each class
            rows.append((names[label], row))
    print(f"{len(picked)} digits x {a.variants} variants x {len(REGIONS)} regions in {time.perf_counter() - t0:.0f} s "
          f"(strength {a.strength}, {a.steps} steps, ink grown by {a.grow} px)")
    print(f"pixels outside the edited region that differ from the real image: {bad} (must be 0)")
    print("| region | variants | share of edited-region pixels changed | judged as their label |")
    print("| --- | --- | --- | --- |")
    for r in REGIONS:
        outs = [Image.fromarray(o) for o, _, _ in judged[r]]
        labels = torch.tensor([y for _, y, _ in judged[r]])
        fidelity = float((judge_images(outs) == labels).float().mean())
        print(f"| {r} | {len(outs)} | {np.mean([c for _, _, c in judged[r]]):.0%} | {fidelity:.0%} |")
    path = augmentation_grid(rows, ["real", f"ink +{a.grow}px", "all", "object", "background"], Path(a.out),
                             title=f"strength {a.strength}, ink grown by {a.grow} px")
    print(f"wrote {path}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
