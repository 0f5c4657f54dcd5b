"""Filters in the leakage-free few-shot protocol on the pocket model: no filter, a leakage-free filter, the judge.

    python benchmarks/filter_fewshot.py --out runs/filters --erasures runs/demo/erasures --shots 1 --seeds 0 1 2 3 4

Three :func:`~dafusion_aug.fewshot.run_fewshot` runs with the demo's quick per-run settings (small CNN,
M = 5, p = 0.5, strengths 0.25-1.0, 15 steps; for ``da-fusion`` the demo's leakage-free token recipe) and ``erase=True`` (class c augmented by the model with c
erased; the ten erasure files of ``dafusion-aug demo --build-erasures``, built if missing), sharing one
variant cache:

- ``none``: no filter;
- ``subset``: ``filter="subset"``, a classifier trained on the k real images only (leakage-free);
- ``judge``: the pocket judge as a ``ClassifierFilter`` (**leaks**: it was trained on every digit; an upper
  bound, not a method).

Each filter keeps a variant whose label probability is >= ``--threshold`` (0.5), up to 4 tries, else the
real image. Prints the accuracy table of each run, the filtered runs minus the unfiltered one paired by
seed (95% t interval), and the fidelity of the variants each run trains on: the share the pocket judge
reads as their label (read back from the cache; fallbacks are real images and count as such), and the share
that fell back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from dafusion_aug import PipelineSpec, few_shot_indices
from dafusion_aug.fewshot import QUICK, build_erasures, method_transform, run_fewshot
from dafusion_aug.fewshot.demo import ERASURE_PROMPTS, ERASURE_SETTINGS, demo_filter
from dafusion_aug.fewshot.erasures import resolve_erasures
from dafusion_aug.fewshot.methods import subset_filter
from dafusion_aug.fewshot.report import format_table, paired_differences, summarize
from dafusion_aug.hashing import image_digest
from dafusion_aug.pocket import digits, judge_images


def _settings(cfg, args) -> dict:
    recipe = cfg.token_recipe(erase=True)  # da-fusion's tokens: the demo's leakage-free recipe
    return dict(shots=args.shots, seeds=args.seeds, methods=["baseline", *args.methods], num_variants=cfg.num_variants, p=cfg.p,
                fit_steps=recipe["fit_steps"], fit_learning_rate=recipe["fit_learning_rate"], num_vectors=recipe["num_vectors"],
                strength=cfg.strength, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                classifier=cfg.classifier())


def fidelity(run_filter, data, names, erasures, kw, cache, threshold, token_files=None) -> dict[str, tuple[float, float, int]]:
    """Per method: (share judged as their label, share fallen back, n) of the cached variants of every subset;
    ``token_files`` maps (k, seed) to the token file each da-fusion run used."""
    spec = PipelineSpec("pocket")
    out = {}
    for method in kw["methods"][1:]:
        images, labels, fallen = [], [], 0
        for k in kw["shots"]:
            for seed in kw["seeds"]:
                subset = [data[i] for i in few_shot_indices(data.targets, k, seed, num_classes=len(names))]
                extra = {}
                if run_filter == "subset":
                    extra = dict(filter=subset_filter(kw["classifier"], subset, len(names), k=k, seed=seed, threshold=threshold),
                                 filter_threshold=threshold)
                elif run_filter == "judge":
                    extra = dict(filter=demo_filter("judge", threshold), filter_threshold=threshold)
                if method == "da-fusion":
                    extra["tokens"] = token_files[(k, seed)]
                aug = method_transform(method, spec, names, class_erasures=dict(enumerate(erasures)), num_variants=kw["num_variants"],
                                       p=kw["p"], strength=tuple(kw["strength"]), num_inference_steps=kw["num_inference_steps"],
                                       guidance_scale=kw["guidance_scale"], cache=cache, on_miss="error", **extra)
                for image, y in subset:
                    real = __import__("numpy").asarray(image)
                    for v in range(aug.num_variants):
                        arr = aug.cache.get(aug.cache_key(image_digest(real), y, v))
                        fallen += bool((arr == real).all())
                        images.append(Image.fromarray(arr))
                        labels.append(y)
        judged = float((judge_images(images) == torch.tensor(labels)).float().mean())
        out[method] = (judged, fallen / len(images), len(images))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--erasures", required=True, help="folder of the ten per-class erasures (built if missing)")
    p.add_argument("--shots", type=int, nargs="+", default=[1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["real-guidance", "real-guidance-agnostic"])
    p.add_argument("--filters", nargs="+", default=["none", "subset", "judge"])
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--cache", default=None, help="variant cache (default: OUT/cache); the demo's cache reuses its unfiltered variants")
    p.add_argument("--tokens", default=None, help="folder of fitted tokens (default: OUT/tokens)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data, spec, out = digits("B"), PipelineSpec("pocket"), Path(a.out)
    names = data.class_names
    files = build_erasures(spec, names, a.erasures, prompts=ERASURE_PROMPTS, progress=False, **ERASURE_SETTINGS)
    erasures = resolve_erasures(files, names)
    kw = _settings(QUICK, a)
    cache = Path(a.cache) if a.cache else out / "cache"
    tokens = Path(a.tokens) if a.tokens else out / "tokens"
    rows, fid = [], {}
    for name in a.filters:
        f = None if name == "none" else ("subset" if name == "subset" else demo_filter("judge", a.threshold))
        res = run_fewshot(spec, data, None, out=out / name, cache=cache, tokens_dir=tokens, erase=True, erasures=files,
                          filter=f, filter_threshold=None if f is None else a.threshold, progress=False, **kw)
        print(f"\n## filter: {name}\n\n{res.table()}")
        rows += [dict(r, method=f"{r['method']} / {name}") for r in res.rows]
        used = {(r["k"], r["seed"]): tokens / r["tokens"] for r in res.rows if r["method"] == "da-fusion"}
        fid[name] = fidelity(None if name == "none" else name, data, names, erasures, kw, cache, a.threshold, used)
    print("\n## filtered minus unfiltered, paired by seed (accuracy points, 95% t interval)\n")
    print("| method | filter | k | difference | low | high |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for m in a.methods:
        for name in a.filters[1:]:
            for d in paired_differences(rows, f"{m} / {name}", f"{m} / none"):
                print(f"| {m} | {name} | {d['k']} | {100 * d['mean']:+.1f} | {100 * d['ci_low']:+.1f} | {100 * d['ci_high']:+.1f} |")
    print("\n## fidelity of the variants trained on (pocket judge), share fallen back to the real image\n")
    print("| method | filter | judged as their label | fell back | variants |\n| --- | --- | ---: | ---: | ---: |")
    for name, per in fid.items():
        for m, (judged, fallen, n) in per.items():
            print(f"| {m} | {name} | {judged:.0%} | {fallen:.0%} | {n} |")
    print("\n" + format_table(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
