"""Do a pocket v3 candidate's scene words draw what they say? Measured on pixels by the scene judge.

For every glyph colour ("a pink seven" / "a pink digit") and every background family ("a seven on a blue
and green striped background" / "a blue and green striped background", colours drawn per sample), ``n``
txt2img samples (20 steps, guidance 7.5) with and without a digit; the scene judge
(:mod:`dafusion_aug.pocket.scene_judge`) reads each sample, and a sample counts when it shows the word.
The judge's own accuracy on part B's rendered scenes and on their VAE reconstructions is printed first
(an instrument is only as good as that).

Example:
    python benchmarks/scene_words.py runs/v3b --judge runs/scene_judge.safetensors --json runs/v3b_words.json
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from dafusion_aug.pocket.data import CLASS_NAMES
from dafusion_aug.pocket.scene_judge import (
    HEADS,
    load_scene_judge,
    read_scenes,
    save_scene_judge,
    scene_judge_accuracy,
    train_scene_judge,
)
from dafusion_aug.pocket.scenes import BACKGROUND_COLOURS, BACKGROUNDS, GLYPH_COLOURS, scenes
from dafusion_aug.pocket.train import reconstruct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training output folder (its model/)")
    parser.add_argument("--judge", type=Path, default=Path("runs/scene_judge.safetensors"),
                        help="scene judge weights (trained and written there when missing)")
    parser.add_argument("--n", type=int, default=16, help="samples per word, with and without a digit each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not args.judge.is_file():
        save_scene_judge(train_scene_judge(), args.judge)
    net = load_scene_judge(args.judge)
    pipe = StableDiffusionPipeline.from_pretrained(str(args.run / "model"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    part_b = scenes("B")
    xb, _ = part_b.tensors()
    truth = [part_b.scene(i) for i in range(len(part_b))]
    report = {"judge_on_part_b": scene_judge_accuracy(net, xb, truth),
              "judge_on_vae_reconstructions": scene_judge_accuracy(net, reconstruct(pipe.vae, xb), truth)}
    print("scene judge on part B:", report["judge_on_part_b"])
    print("scene judge on part B through the VAE:", report["judge_on_vae_reconstructions"])
    rng = random.Random(0)

    def sample(prompts, seed):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        out = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, generator=gens, output_type="np").images
        return read_scenes(net, torch.from_numpy(out).permute(0, 3, 1, 2).float())

    words: dict[str, dict[str, float]] = {}
    for w, colour in enumerate(GLYPH_COLOURS):
        row = {}
        for with_digit in (True, False):
            prompts = [f"a {colour} {CLASS_NAMES[i % 10] if with_digit else 'digit'}" for i in range(args.n)]
            read = sample(prompts, 1000 * w + 500 * with_digit)
            row["with digit" if with_digit else "without"] = round(float((read["glyph"] == HEADS["glyph"][0].index(colour)).float().mean()), 4)
        words[f"glyph {colour}"] = row
        print(f"glyph {colour:>7}: {row}", flush=True)
    names = list(BACKGROUND_COLOURS)
    for w, family in enumerate(BACKGROUNDS):
        row = {}
        for with_digit in (True, False):
            pairs = [rng.sample(names, 2) for _ in range(args.n)]
            phrases = [f"a plain {a} background" if family == "plain" else f"a {a} and {b} {family} background" for a, b in pairs]
            prompts = [f"a {CLASS_NAMES[i % 10]} on {p}" if with_digit else p for i, p in enumerate(phrases)]
            read = sample(prompts, 50_000 + 1000 * w + 500 * with_digit)
            fam = (read["background"] == BACKGROUNDS.index(family)).float()
            cols = torch.tensor([all(read["colours"][i, names.index(c)] for c in (pairs[i][:1] if family == "plain" else pairs[i]))
                                 for i in range(args.n)]).float()
            key = "with digit" if with_digit else "without"
            row[key] = round(float(fam.mean()), 4)
            row[key + ", colours named"] = round(float(cols.mean()), 4)
        words[f"background {family}"] = row
        print(f"background {family:>9}: {row}", flush=True)
    report["words"] = words
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(f"[done] {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
