"""Soak test (issue 8, not a CI test): many epochs of cache hits across DataLoader workers.

1. Fill a cache with ``precompute`` on the tiny pipeline: ``--images`` images x 1 variant (p=1, so every
   read is a hit).
2. Read it for ``--epochs`` epochs through ``--workers`` persistent DataLoader workers with
   ``on_miss="error"`` (a miss would stop the run).
3. Report, per epoch: seconds, cache-hit throughput (images/s), and each worker's peak RSS (VmHWM, which
   counts pages shared with the parent) and private memory (smaps_rollup, sampled every 100 samples). Throughput and RSS should stay flat: no leak, no slow-down.

Run (what docs/reliability.md quotes):
``nice -n 19 python benchmarks/soak.py --images 2000 --epochs 20 --workers 4``
``--json FILE`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from dafusion_aug import DiffusionAugment, precompute
from dafusion_aug.testing import tiny_pipeline

CLASSES = [f"class {i}" for i in range(10)]


def peak_rss_kib() -> int:
    """VmHWM: this process's peak resident set in KiB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def private_kib() -> int:
    """Private_Clean + Private_Dirty in KiB: the memory this process alone holds (Linux >= 4.14).

    A forked worker's resident set starts with the pages it shares with its parent (torch, the model);
    its private memory is what the worker itself allocated, the number a leak would grow.
    """
    total = 0
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


class Synthetic:
    """``n`` deterministic random images (``size`` x ``size`` RGB), label ``i % 10``; nothing stored on disk."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)), i % len(CLASSES)


class Probe:
    """Applies the transform and reports the worker's id and memory with every sample."""

    def __init__(self, data: Synthetic, augment: DiffusionAugment) -> None:
        self.data, self.augment = data, augment
        self.to_tensor = v2.PILToTensor()
        self.calls, self.private = 0, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, label = self.augment(self.data[i])
        info = torch.utils.data.get_worker_info()
        if self.calls % 100 == 0:  # smaps_rollup costs about a millisecond: sample it
            self.private = private_kib()
        self.calls += 1
        return self.to_tensor(image), label, info.id if info is not None else -1, peak_rss_kib(), self.private


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="side of the real images (the tiny model generates at 32)")
    parser.add_argument("--context", default="fork", choices=["fork", "spawn", "forkserver"])
    parser.add_argument("--cache", default=None, help="cache folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores, on purpose
    tmp = tempfile.TemporaryDirectory(prefix="dafusion-soak-") if args.cache is None else None
    cache = args.cache or tmp.name
    data = Synthetic(args.images, args.size)
    common = dict(class_names=CLASSES, num_inference_steps=2, strength=1.0, guidance_scale=2.0, num_variants=1, p=1.0, cache=cache)
    pipe = tiny_pipeline(seed=0)

    t0 = time.perf_counter()
    filled = precompute(DiffusionAugment(pipe, **common), data, batch_size=64, progress=False)
    fill_s = time.perf_counter() - t0
    print(f"fill: {filled['generated']} generated, {filled['skipped']} already cached, {fill_s:.1f} s "
          f"({filled['images_per_second']:.1f} img/s)", flush=True)

    reader = DiffusionAugment(pipe, on_miss="error", **common)  # pickled without the pipeline: workers only read
    loader = DataLoader(
        Probe(data, reader),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        multiprocessing_context=args.context if args.workers else None,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    epochs = []
    header = f"{'epoch':>5} {'s':>7} {'img/s':>8}  " + " ".join(f"w{w} peak/own MiB".rjust(18) for w in range(max(args.workers, 1)))
    print(header, flush=True)
    for epoch in range(args.epochs):
        t = time.perf_counter()
        seen = 0
        peak: dict[int, int] = {}
        now: dict[int, int] = {}
        for images, _labels, worker, hwm, rss in loader:
            seen += len(images)
            for w, h, r in zip(worker.tolist(), hwm.tolist(), rss.tolist()):
                peak[w] = max(peak.get(w, 0), h)
                now[w] = r
        seconds = time.perf_counter() - t
        row = {
            "epoch": epoch,
            "seconds": round(seconds, 3),
            "images": seen,
            "images_per_second": round(seen / seconds, 1),
            "peak_rss_mib": {w: round(peak[w] / 1024, 1) for w in sorted(peak)},
            "private_mib": {w: round(now[w] / 1024, 1) for w in sorted(now)},
        }
        epochs.append(row)
        cells = " ".join(f"{row['peak_rss_mib'][w]:>8.1f}/{row['private_mib'][w]:<8.1f}".rjust(18) for w in sorted(peak))
        print(f"{epoch:>5} {seconds:>7.2f} {row['images_per_second']:>8.1f}  {cells}", flush=True)
    rates = [e["images_per_second"] for e in epochs]
    summary = {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "images": args.images,
        "epochs": args.epochs,
        "workers": args.workers,
        "context": args.context,
        "fill_seconds": round(fill_s, 1),
        "fill_images_per_second": filled["images_per_second"],
        "epochs_detail": epochs,
        "throughput_first_last_min_max": [rates[0], rates[-1], min(rates), max(rates)],
        "main_peak_rss_mib": round(peak_rss_kib() / 1024, 1),
        "cache_files": sum(1 for _ in reader.cache.keys()),
    }
    print(f"throughput img/s: first {rates[0]}, last {rates[-1]}, min {min(rates)}, max {max(rates)}; "
          f"main process peak RSS {summary['main_peak_rss_mib']} MiB; {summary['cache_files']} cache files", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
