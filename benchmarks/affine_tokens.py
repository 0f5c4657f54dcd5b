"""Run another benchmark with every ``fit_tokens`` call fitted on random-affine copies of its images.

An ablation of the leakage-free protocol (docs/results.md, docs/tokens.md): does a token fitted on an
image *and* ``COPIES`` randomly rotated, shifted, scaled and sheared copies of it (the classifier's kind of
augmentation, made once per fit, so the cached latents stay fixed) generalise past the instance it was
fitted on? The benchmark itself runs unchanged; only ``dafusion_aug.fit_tokens`` is wrapped, wherever the
benchmark or the library reaches it. The copies are drawn from torch's global generator seeded with
``1000 + seed`` (the fit's ``seed``) inside ``torch.random.fork_rng``, so a run is deterministic and the
benchmark's own draws are untouched.

Token files do not record the copies: give the wrapped benchmark a token folder of its own (``--tokens``).

Usage::

    python benchmarks/affine_tokens.py 15 benchmarks/fewshot_sweep.py --out runs/s8 --erasures runs/demo-v2/erasures \\
        --name aug15-k1-s0 --erase --shots 1 --seeds 0 --methods baseline da-fusion --threads 1 --tokens runs/s8/tokens-aug15
    python benchmarks/affine_tokens.py 15 benchmarks/eval_tokens.py --erased --num-vectors 4 --scale-lr --seed 0 ...
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Any

import torch
from torchvision.transforms import v2

import dafusion_aug
import dafusion_aug.fit as _fit
from dafusion_aug.data import ImageList

#: The copies' augmentation: wider than the classifier's ``fewshot.classifier.random_affine`` (±10°, 0.9-1.1, shift 0.1)
#: and with a shear, which that batched-tensor twin lacks (digits on black: fill 0).
AFFINE = v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.85, 1.15), shear=(-15, 15), fill=0)


def with_copies(data: Any, copies: int, seed: int) -> list[tuple[Any, int]]:
    """``(image, label)`` items of ``data``, each followed by ``copies`` affine copies of its image."""
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(1000 + int(seed))
        for i in range(len(data)):
            item = data[i]
            image, label = item[0], int(item[-1])
            out.append((image, label))
            out.extend((AFFINE(image), label) for _ in range(copies))
    return out


def install(copies: int) -> None:
    """Wrap ``fit_tokens`` in the library's modules (those imported later pick up the wrapper too)."""
    original = _fit.fit_tokens

    def fit_tokens(pipeline: Any, data: Any, class_names: Any = None, **kw: Any) -> Any:
        names = class_names if class_names is not None else getattr(data, "class_names", None)
        items = with_copies(data, copies, kw.get("seed", 0))
        print(f"[affine_tokens] fit_tokens on {len(data)} images + {copies} copies each = {len(items)}", flush=True)
        return original(pipeline, ImageList(items, names), names, **kw)

    _fit.fit_tokens = fit_tokens
    dafusion_aug.fit_tokens = fit_tokens
    for name, module in list(sys.modules.items()):
        if name.startswith("dafusion_aug") and module.__dict__.get("fit_tokens") is original:
            module.fit_tokens = fit_tokens


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit(f"usage: python {sys.argv[0]} COPIES SCRIPT [ARGS...] (got {argv!r})")
    copies, script = int(argv[0]), argv[1]
    install(copies)
    sys.argv = argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
