"""Samples of a pocket v3 candidate: txt2img of every digit ("a {digit}", 8 each, judged) and of scene prompts.

Example:
    python -m dafusion_aug.pocket.train --world scenes --out runs/v3-pilot --vae-steps 1500 --unet-steps 1000
    python benchmarks/scene_samples.py runs/v3-pilot runs/pilot_digits.png runs/pilot_scenes.png
    python benchmarks/scene_samples.py runs/v3b runs/v3b_digits.png runs/v3b_scenes.png 32   # + 32 per digit, judged
"""

import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from dafusion_aug.pocket.data import CLASS_NAMES
from dafusion_aug.pocket.judge import judge

torch.set_num_threads(2)
pipe = StableDiffusionPipeline.from_pretrained(f"{sys.argv[1]}/model", safety_checker=None)
pipe.set_progress_bar_config(disable=True)
net = judge(f"{sys.argv[1]}/judge.safetensors")
def gen(prompts, seed):
    g = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, generator=g, output_type="np").images
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()
rows = []
correct = total = 0
for d in range(10):
    x = gen([f"a {CLASS_NAMES[d]}"] * 8, 100 * d)
    pred = net(x).argmax(1)
    correct += int((pred == d).sum())
    total += 8
    rows.append(x)
print("txt2img 'a {digit}' judged", correct / total)
scene_prompts = ["a pink seven on a blue and green striped background", "a yellow three on a plain purple background",
                 "a white two on a red and cyan checkered background with a small green disc", "a cyan five on a grey and orange dotted background",
                 "a green and blue striped background", "a white four on a plain black background", "a red digit", "a blue eight on a pink and yellow blotchy background"]
sc = [gen([p] * 8, 7) for p in scene_prompts]
for p, x in zip(scene_prompts, sc):
    print(p, "->", net(x).argmax(1).tolist())
def sheet(batches, path):
    arr = torch.cat([torch.cat(list(b), 2) for b in batches], 1).permute(1, 2, 0).numpy()
    Image.fromarray((arr * 255).round().astype(np.uint8)).resize((arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST).save(path)
sheet(rows, sys.argv[2])
sheet(sc, sys.argv[3])
if len(sys.argv) > 4:  # per-digit rates with more samples, for two class-only templates of the v3 captions
    n = int(sys.argv[4])
    for template in ("a {}", "a photo of a {}"):
        rates = []
        for d in range(10):
            x = gen([template.format(CLASS_NAMES[d])] * n, 10000 * d)
            rates.append(float((net(x).argmax(1) == d).float().mean()))
        print(f"{template!r}: per digit {[round(r, 2) for r in rates]}, mean {sum(rates) / 10:.3f}")
