"""Peak memory of one img2img call (``diffuse``) per batch size, on the CPU in float32.

Each batch size runs in its own process: the pipeline is built (``sdxl-arch``: SDXL base's architecture with
random weights, ``testing.full_size_pipeline``; ``tiny-sdxl``: the tiny SDXL pipeline; ``sd15-arch``: SD 1.5's), its
resident memory measured at rest, then one ``diffuse`` call of ``batch`` images generates at ``--resolution``
while a thread samples the resident set size (``/proc/self/statm``) every 5 ms. The call's peak is that
maximum; "above the weights" is the peak minus the memory at rest (activations, latents, the VAE decode).

Usage:
    python benchmarks/bench_memory.py --model sdxl-arch --resolution 256 --batch-sizes 1 4
    python benchmarks/bench_memory.py --model tiny-sdxl --batch-sizes 1 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pipeline(model: str):
    if model == "sdxl-arch":
        from dafusion_aug.testing import full_size_pipeline

        return full_size_pipeline("sdxl")
    if model == "sd15-arch":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_fit import _sd15_arch

        return _sd15_arch()
    from dafusion_aug.testing import tiny_pipeline

    return tiny_pipeline(family="sdxl")


def child(model: str, batch: int, resolution: int, steps: int) -> dict:
    """Build the pipeline, then time and sample the memory of one ``diffuse`` call of ``batch`` images."""
    from dafusion_aug import diffuse

    t0 = time.perf_counter()
    pipe = _pipeline(model)
    build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(batch)]
    rest = _rss()
    peak, done = [rest], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    out = diffuse(pipe, images, ["a photo of a cat"] * batch, 1.0, list(range(batch)), num_inference_steps=steps,
                  guidance_scale=7.5, resolution=resolution)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    assert all(o is not None for o in out)
    return {"model": model, "batch": batch, "resolution": resolution, "steps": steps, "build_s": round(build, 1),
            "call_s": round(seconds, 2), "rest_gib": rest / 2**30, "peak_gib": peak[0] / 2**30,
            "above_weights_gib": (peak[0] - rest) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["sdxl-arch", "tiny-sdxl", "sd15-arch"], default="tiny-sdxl")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--resolution", type=int, default=None, help="generation size (default: 256 for the -arch models, else native)")
    ap.add_argument("--steps", type=int, default=2, help="scheduler steps at strength 1 (the peak does not depend on it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    resolution = args.resolution or (256 if args.model.endswith("-arch") else 64)
    if args.child is not None:
        print(json.dumps(child(args.model, args.child, resolution, args.steps)))
        return
    print(f"model={args.model} resolution={resolution} steps={args.steps} threads={args.threads} float32 CPU")
    print("| batch | weights at rest | peak during the call | above the weights | call |")
    print("| --- | --- | --- | --- | --- |")
    for batch in args.batch_sizes:
        cmd = [sys.executable, __file__, "--model", args.model, "--resolution", str(resolution), "--steps", str(args.steps),
               "--threads", str(args.threads), "--child", str(batch)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"| {batch} | {r['rest_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | {r['above_weights_gib']:.2f} GiB | {r['call_s']:.1f} s |")


if __name__ == "__main__":
    main()
