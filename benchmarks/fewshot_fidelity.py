"""How often do the demo's cached variants still show their class? The pocket judge reads them, per strength.

    python benchmarks/fewshot_fidelity.py --demo dafusion-demo/quick --cache dafusion-demo/cache --tokens dafusion-demo/tokens

Several result folders (each with its own token folder, same order) are pooled into one table:

    python benchmarks/fewshot_fidelity.py --demo runs/erase-k1 runs/erase-k1-s2 --tokens runs/erase-k1/tokens \
        runs/erase-k1-s2/tokens --cache runs/cache --erasures runs/erasures

For each (k, seed) of the demo run (read from its ``results.json``), every variant of every training image
is read back from the cache (nothing is generated) for each generative method and scored by
``dafusion_aug.pocket.judge_images``: the share the judge reads as the image's own label, per strength.
A low share means label noise: the variant shows another digit (or none) under the real image's label.
The LoRA methods of issue 32 are read too: ``da-fusion-lora`` like da-fusion, and ``diff-mix``, whose
variants are drawn towards another class, by the share the judge reads as that *target* class, and
``diff-mix-no-lora`` (the same edits with da-fusion's tokens alone) likewise. Two more tables pair the runs
over (k, seed): da-fusion-lora minus da-fusion, and diff-mix minus diff-mix-no-lora, the LoRA's gain in
judged fidelity per strength (mean and 95 % t interval).
A second table gives how far the variants move from their real image: the mean absolute grey-level
difference, in percent of the full range (0 = a copy), per strength; a faithful variant that is also a near
copy adds little that the standard augmentation does not.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dafusion_aug import ClassTokens, PipelineSpec, few_shot_indices
from dafusion_aug.fewshot import LORA_METHODS, method_transform
from dafusion_aug.fewshot.report import mean_confidence_interval
from dafusion_aug.hashing import image_digest
from dafusion_aug.pocket import digits, judge_images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, nargs="+", help="demo result folders (with results.json), pooled")
    p.add_argument("--cache", required=True)
    p.add_argument("--tokens", required=True, nargs="+", help="folder of the fitted tokens: one, or one per --demo folder")
    p.add_argument("--shots", type=int, nargs="+", default=None, help="default: the run's")
    p.add_argument("--erasures", default=None, help="folder of per-class erasures, for runs made with --erase")
    a = p.parse_args(argv)
    if len(a.tokens) not in (1, len(a.demo)):
        p.error(f"--tokens takes one folder or one per --demo folder ({len(a.demo)}), got {len(a.tokens)}")
    torch.set_num_threads(1)
    totals: dict[tuple[str, int], dict[float, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    change: dict[tuple[str, int], dict[float, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    per_seed: dict[tuple[str, int, int], dict[float, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for demo, tokens in zip(a.demo, a.tokens * len(a.demo) if len(a.tokens) == 1 else a.tokens):
        score_run(Path(demo), Path(tokens), a, totals, change, per_seed)
    strengths = sorted({s for per in totals.values() for s in per})  # every strength any pooled run used
    for title, table, fmt in (("share of variants the judge reads as their label", totals, lambda v: f"{100 * np.mean(v):.0f}%"),
                              ("mean absolute change from the real image (% of the grey range)", change, lambda v: f"{np.mean(v):.1f}")):
        print(f"\n{title}\n")
        print("| method | k | " + " | ".join(f"strength {s:g}" for s in strengths) + " | all |")
        print("| --- | ---: |" + " ---: |" * (len(strengths) + 1))
        for (method, k), per in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            cells = [fmt(per[s]) if per.get(s) else "" for s in strengths]
            every = [h for hs in per.values() for h in hs]
            print(f"| {method} | {k} | " + " | ".join(cells) + f" | {fmt(every)} (n={len(every)}) |")
    paired_table(per_seed, strengths)
    paired_table(per_seed, strengths, "diff-mix", "diff-mix-no-lora")


def paired_table(per_seed: dict, strengths: list[float], method: str = "da-fusion-lora", reference: str = "da-fusion") -> None:
    """``method``'s judged share minus ``reference``'s, per strength, paired over every (k, seed) both ran."""
    pairs = sorted((k, s) for (m, k, s) in per_seed if m == method and (reference, k, s) in per_seed)
    if not pairs:
        return
    print(f"\n{method} minus {reference}: judged share, paired over {len(pairs)} (k, seed) runs (points, mean [95% CI])\n")
    print("| strength | " + " | ".join(f"{x:g}" for x in strengths) + " |")
    print("| --- |" + " ---: |" * len(strengths))
    cells = []
    for x in strengths:
        d = [100 * (np.mean(per_seed[(method, k, s)][x]) - np.mean(per_seed[(reference, k, s)][x]))
             for k, s in pairs if per_seed[(method, k, s)].get(x) and per_seed[(reference, k, s)].get(x)]
        if not d:
            cells.append("")
            continue
        mean, low, high = mean_confidence_interval(d)
        cells.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]" if len(d) > 1 else f"{mean:+.1f}")
    print(f"| {method} - {reference} | " + " | ".join(cells) + " |")


def score_run(demo: Path, tokens: Path, a: argparse.Namespace, totals: dict, change: dict, per_seed: dict) -> None:
    """Add one result folder's variants to ``totals`` (judge hits), ``change`` and ``per_seed``."""
    results = json.loads((demo / "results.json").read_text())
    settings = results["settings"]
    # the token file each da-fusion row used (runs before it was recorded: every file of that k and seed)
    used = {(r["k"], r["seed"]): r["tokens"] for r in results["rows"] if r["method"] == "da-fusion" and r.get("tokens")}
    used_lora = {(r["k"], r["seed"]): r["tokens"] for r in results["rows"] if r["method"] in LORA_METHODS and r.get("tokens")}
    lora_methods = sorted({r["method"] for r in results["rows"] if r["method"] in LORA_METHODS})
    present = {r["method"] for r in results["rows"]}
    gen = settings["generation"]
    data = digits("B")
    names = data.class_names
    spec = PipelineSpec("pocket")
    erasures = None
    if settings["erase"]:
        files = sorted(glob.glob(str(Path(a.erasures) / "erase-*.safetensors")))
        erasures = dict(enumerate(files))
    # run_fewshot's own transforms (same cache keys), reading the cache only
    common = dict(
        prompt=gen["prompt"], agnostic_prompt=gen["agnostic_prompt"], class_erasures=erasures, num_variants=gen["num_variants"],
        p=gen["p"], strength=tuple(gen["strength"]), num_inference_steps=gen["num_inference_steps"],
        guidance_scale=gen["guidance_scale"], cache=a.cache, on_miss="real",
    )
    for k in a.shots or settings["shots"]:
        for seed in settings["seeds"]:
            subset = [data[i] for i in few_shot_indices(data.targets, k, seed, len(names))]
            augs = {m: method_transform(m, spec, names, **common) for m in ("real-guidance", "real-guidance-agnostic")}
            if (k, seed) in used:
                augs["da-fusion"] = method_transform("da-fusion", spec, names, tokens=tokens / used[(k, seed)], **common)
            else:
                candidates = []
                for path in sorted(glob.glob(str(tokens / f"k{k}-seed{seed}-*.safetensors"))):
                    try:
                        aug = method_transform("da-fusion", spec, names, tokens=path, **common)
                        aug.cache_key(image_digest(np.asarray(subset[0][0])), subset[0][1], 0)
                    except Exception:  # noqa: BLE001 - a token file of other settings: skip it
                        continue
                    candidates.append((path, aug))
                if len(candidates) > 1:
                    sys.exit(f"k={k} seed={seed}: {len(candidates)} token files fit and results.json does not say which "
                             f"one the run used ({', '.join(Path(p).name for p, _ in candidates)}); rerun the demo to record it")
                if candidates:
                    augs["da-fusion"] = candidates[0][1]
            if "diff-mix-no-lora" in present and "da-fusion" in augs:  # inter-class edits with da-fusion's tokens
                augs["diff-mix-no-lora"] = method_transform("diff-mix-no-lora", spec, names, tokens=augs["da-fusion"].tokens, **common)
            if (k, seed) in used_lora:
                path = tokens / used_lora[(k, seed)]
                lora_tokens = ClassTokens.load(path, lora=path.with_name(path.stem + ".lora.safetensors"))
                for m in lora_methods:
                    augs[m] = method_transform(m, spec, names, tokens=lora_tokens, **common)
            for method, aug in augs.items():
                found, labels = [], []
                strengths, moved = [], []
                for image, label in subset:
                    real = np.asarray(image.convert("RGB"), dtype=np.float32)
                    digest = image_digest(np.asarray(image))
                    for v in range(aug.num_variants):
                        var = aug.variant(digest, label, v)
                        arr = aug.cache.get(var.key)
                        if arr is not None:
                            found.append(torch.from_numpy(np.array(arr)).permute(2, 0, 1))
                            labels.append(label if var.target is None else var.target)  # diff-mix: its target class
                            strengths.append(var.strength)
                            moved.append(100 * float(np.abs(np.asarray(arr, dtype=np.float32) - real).mean()) / 255)
                if not found:
                    continue
                ok = (judge_images(torch.stack(found)) == torch.tensor(labels)).tolist()
                for s, hit, d in zip(strengths, ok, moved):
                    totals[(method, k)][s].append(int(hit))
                    change[(method, k)][s].append(d)
                    per_seed[(method, k, seed)][s].append(int(hit))


if __name__ == "__main__":
    main()
