"""Erase each digit from the pocket model with ESD, then judge txt2img samples of every digit.

For every erased digit e (words "zero".."nine"): ``erase_concept("pocket", {word: [prompt(e), word]})``,
then, with the erasure applied, generate ``--samples`` images of each digit d from
"a photo of a handwritten digit {word(d)}" (same seeds as before erasing) and let the pocket judge read
them. Targets: the erased digit's rate falls below 20%; every other digit keeps >= 80% of its rate before.

    python benchmarks/eval_erasure.py                       # 10 digits, 32 samples, 25 DDIM steps
    python benchmarks/eval_erasure.py --quick               # 3 digits, 8 samples, 10 steps (smoke test)
    python benchmarks/eval_erasure.py --method esd-x-strict --steps 200 --lr 1e-3

Erasure files are kept under ``--work`` (named by a digest of the settings), so a rerun with the same
settings only re-generates. Writes a JSON report and prints the Markdown tables used in docs/erasure.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dafusion_aug import Erasure, PipelineSpec
from dafusion_aug.erase import ensure_erasure
from dafusion_aug.hashing import stable_digest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pocket")
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="digits to erase (one run each)")
    p.add_argument("--method", default="esd-x")
    p.add_argument("--steps", type=int, default=100, help="ESD optimisation steps per digit")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--negative-guidance", type=float, default=1.0)
    p.add_argument("--start-guidance", type=float, default=3.0)
    p.add_argument("--ddim-steps", type=int, default=10, help="DDIM schedule used to sample x_t during training")
    p.add_argument("--word-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="also train on the bare word ('seven') besides the full prompt")
    p.add_argument("--samples", type=int, default=32, help="txt2img samples per prompted digit")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the txt2img samples")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge", default=None, help="judge weights (default: the shipped judge.safetensors)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--batch-size", type=int, default=160)
    p.add_argument("--work", default="runs/eval_erasure", help="folder for erasure files and the report (git-ignored)")
    p.add_argument("--quick", action="store_true", help="3 digits, 8 samples, 10 sampler steps, 30 ESD steps")
    p.add_argument("--preserve-others", action="store_true",
                   help="each erasure keeps the other digits' prompts (erase_concept(preserve=...))")
    p.add_argument("--preserve-attributes", action="store_true",
                   help="each erasure also keeps the attribute-only prompts (pocket v2)")
    p.add_argument("--preserve-weight", type=float, default=1.0)
    p.add_argument("--attributes", type=int, default=0, metavar="N",
                   help="also check every attribute word without a digit, N samples each, before and under each "
                        "erasure (pocket v2; 0: skip)")
    args = p.parse_args(argv)
    if args.quick:
        args.digits, args.samples, args.sample_steps, args.steps = args.digits[:3], 8, 10, 30
    return args


def training_settings(args: argparse.Namespace) -> dict:
    """The ``erase_concept`` keyword arguments of ``args`` (they name the erasure files), without ``preserve``."""
    out = dict(method=args.method, steps=args.steps, learning_rate=args.lr, negative_guidance=args.negative_guidance,
               start_guidance=args.start_guidance, ddim_steps=args.ddim_steps, seed=args.seed)
    if getattr(args, "preserve_others", False) or getattr(args, "preserve_attributes", False):
        out["preserve_weight"] = args.preserve_weight
    return out


def preserved_prompts(digit: int, args: argparse.Namespace) -> list[str]:
    """The prompts the erasure of ``digit`` keeps: the other digits' (``--preserve-others``) and the
    attribute-only check prompts (``--preserve-attributes``)."""
    from dafusion_aug.pocket import CLASS_NAMES, prompt
    from dafusion_aug.pocket.evaluate import attribute_only_prompts

    kept = []
    if getattr(args, "preserve_others", False):
        kept += [p for d in range(10) if d != digit for p in (prompt(d), CLASS_NAMES[d])]
    if getattr(args, "preserve_attributes", False):
        kept += list(attribute_only_prompts())
    return kept


def erasure_for(digit: int, args: argparse.Namespace | None = None) -> tuple[Erasure, Path, float | None]:
    """The ESD erasure of ``digit`` under ``args`` (default: this script's defaults), loaded from ``args.work``
    or trained and saved there. Returns ``(erasure, path, training seconds or None when loaded)``.

    Other scripts use this to reuse the files this script writes:
    ``erasure_for(7, parse_args(["--work", "runs/eval_erasure"]))``.
    """
    from dafusion_aug.pocket import CLASS_NAMES, prompt

    args = args if args is not None else parse_args([])
    spec = PipelineSpec(args.model, device="cpu")
    train = training_settings(args)
    word = CLASS_NAMES[digit]
    concepts = {word: [prompt(digit), word] if args.word_prompt else [prompt(digit)]}
    kept = preserved_prompts(digit, args)
    named = (spec.fingerprint(), concepts, train) + ((kept,) if kept else ())
    path = Path(args.work) / f"erase-{word}-{stable_digest(*named)[:10]}.safetensors"
    seconds = ensure_erasure(path, spec, concepts, progress=False, preserve=kept or None, **train)
    return Erasure.load(path), path, None if seconds is None else round(seconds, 1)


def judged_rates(txt2img, judge, n: int, steps: int, guidance: float, seed: int, batch_size: int) -> list[float]:
    """Fraction of ``n`` samples per digit that the judge reads as the prompted digit (seeds fixed per digit)."""
    from dafusion_aug import pocket

    judged = pocket.judged_rates(txt2img, {d: pocket.prompt(d) for d in range(10)}, n, steps=steps, guidance=guidance,
                                 seed=seed, batch_size=batch_size, read=judge)
    return [round(judged.rates[d], 4) for d in range(10)]


def markdown(report: dict) -> str:
    from dafusion_aug.pocket import CLASS_NAMES

    before = report["before"]
    lines = [
        "| erased | its rate before | after | other digits: mean before -> after | worst other after/before | pass |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["runs"]:
        e = row["digit"]
        others = [d for d in range(10) if d != e]
        mb = sum(before[d] for d in others) / 9
        ma = sum(row["after"][d] for d in others) / 9
        lines.append(
            f"| {e} ({CLASS_NAMES[e]}) | {before[e]:.0%} | {row['after'][e]:.0%} | {mb:.0%} -> {ma:.0%} | "
            f"{row['worst_ratio']:.2f} (digit {row['worst_digit']}) | {'yes' if row['pass'] else 'no'} |"
        )
    lines += ["", "Rate of each prompted digit (columns) with each erasure (rows):", "",
              "| erased \\ prompted | " + " | ".join(str(d) for d in range(10)) + " |", "| --- |" + " --- |" * 10,
              "| none | " + " | ".join(f"{r:.0%}" for r in before) + " |"]
    for row in report["runs"]:
        cells = [f"**{r:.0%}**" if d == row["digit"] else f"{r:.0%}" for d, r in enumerate(row["after"])]
        lines.append(f"| {row['digit']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    from diffusers import StableDiffusionPipeline

    from dafusion_aug.pocket import judge, judge_images

    diffusers.utils.logging.set_verbosity_error()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = PipelineSpec(args.model, device="cpu")
    pipe = spec.load()
    txt2img = StableDiffusionPipeline(**pipe.components)
    txt2img.set_progress_bar_config(disable=True)
    net = judge(args.judge)

    def read(images: torch.Tensor) -> torch.Tensor:
        return judge_images(images, model=net)

    gen = dict(n=args.samples, steps=args.sample_steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    train = training_settings(args)
    t0 = time.perf_counter()
    before = judged_rates(txt2img, read, **gen)
    report = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "model_fingerprint": spec.fingerprint(), "generation": gen, "training": {**train, "word_prompt": args.word_prompt},
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "before": before, "runs": []}
    print(f"before: {before}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    attr = dict(n=args.attributes, steps=args.sample_steps, guidance=args.guidance, seed=args.seed, net=net,
                log=None, with_digits=False)
    if args.attributes:
        from dafusion_aug.pocket.evaluate import attribute_report

        report["attributes_before"] = {w: r["without_digit"] for w, r in attribute_report(txt2img, **attr).items()}
        print(f"attribute words before: {report['attributes_before']}", flush=True)
    for e in args.digits:
        erasure, path, trained_s = erasure_for(e, args)
        t2 = time.perf_counter()
        with erasure.applied(pipe):
            after = judged_rates(txt2img, read, **gen)
            words = {w: r["without_digit"] for w, r in attribute_report(txt2img, **attr).items()} if args.attributes else None
        ratios = {d: (after[d] / before[d] if before[d] else 1.0) for d in range(10) if d != e}
        worst = min(ratios, key=ratios.get)
        losses = erasure.metadata.get("losses", [])
        row = {"digit": e, "after": after, "worst_digit": worst, "worst_ratio": round(ratios[worst], 3),
               "pass": after[e] < 0.2 and ratios[worst] >= 0.8, "erasure": str(path), "train_s": trained_s,
               "generate_s": round(time.perf_counter() - t2, 1),
               "loss_first_last_20": [sum(losses[:20]) / max(1, len(losses[:20])), sum(losses[-20:]) / max(1, len(losses[-20:]))]}
        if words is not None:
            row["attributes_after"] = words
            row["attributes_worst"] = min(words, key=lambda w: words[w] - report["attributes_before"][w])
            print(f"  attribute words: mean {sum(words.values()) / len(words):.2f} (before "
                  f"{sum(report['attributes_before'].values()) / len(words):.2f}); largest drop "
                  f"{row['attributes_worst']}: {report['attributes_before'][row['attributes_worst']]:.2f} -> "
                  f"{words[row['attributes_worst']]:.2f}", flush=True)
        report["runs"].append(row)
        print(f"erase {e}: {after[e]:.0%} (was {before[e]:.0%}); worst other {worst}: {after[worst]:.0%} (was {before[worst]:.0%}); "
              f"train {trained_s}s, generate {row['generate_s']}s, pass={row['pass']}", flush=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    report["cpu_s"] = round(time.process_time(), 1)  # the machine may be shared: CPU seconds tell the cost
    report["all_pass"] = all(r["pass"] for r in report["runs"])
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\ntotal {report['total_s']}s wall, {report['cpu_s']}s CPU; all pass: {report['all_pass']}; report: {work / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
