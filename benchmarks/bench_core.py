"""Core benchmarks (issue: core library). Every figure is a ratio measured in one run.

1. DiffusionAugment per-call overhead over calling the pipeline directly with the same inputs (target <= 5%).
2. Cache hit (read + decode + return) vs plain PIL open + decode of the same file (target <= 1.3x).
3. precompute at batch 16 vs one pipeline call per image (target >= 2x on the tiny pipeline).
4. Cache format: PNG compress_level=1 vs lossless WebP method=0, encode/decode time and size.

Run: ``python benchmarks/bench_core.py [--model tiny|pocket|PATH] [--quick]``
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from dafusion_aug import AugmentationCache, DiffusionAugment, precompute
from dafusion_aug.functional import native_resolution
from dafusion_aug.hashing import image_digest

# wall time by default; --clock cpu uses this process's CPU time, which other jobs on a shared machine
# barely disturb (use it with --threads 1, where no thread spins waiting for another)
CLOCK = time.perf_counter


def timeit(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeat: int) -> dict:
    """Median time of each function, alternating them so drift on a shared machine hits both alike."""
    for fn in fns.values():
        fn()
    samples: dict = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            samples[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def natural_images(size: int, n: int) -> list[np.ndarray]:
    """Real photographs bundled with scikit-learn (china, flower), cropped and resized; else smooth noise."""
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
    except Exception:  # scikit-learn missing: a smooth synthetic stand-in
        rng = np.random.default_rng(0)
        photos = [np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((640, 427), Image.BICUBIC))]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        off = (i * 37) % max(1, w - h)
        crop = Image.fromarray(p[:, off : off + h])
        out.append(np.asarray(crop.resize((size, size), Image.BICUBIC)))
    return out


def load(model: str):
    if model == "tiny":
        from dafusion_aug.testing import tiny_pipeline

        return tiny_pipeline(0)
    from dafusion_aug import load_pipeline

    return load_pipeline(model, device="cpu")


def bench_overhead(pipe, steps: int, repeat: int) -> dict:
    size = native_resolution(pipe)
    img = Image.fromarray(natural_images(size, 1)[0])
    aug = DiffusionAugment(pipe, class_names=["cat", "dog"], strength=0.5, num_inference_steps=steps, guidance_scale=7.5, num_variants=1, p=1.0, cache=None)
    arr = np.asarray(img)
    var = aug.variant(image_digest(arr), 0, 0)
    batch = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255

    def direct():
        pipe(prompt=[var.prompt], image=batch, strength=0.5, num_inference_steps=steps, guidance_scale=7.5,
             generator=[torch.Generator().manual_seed(var.seed)], output_type="pt")

    def through_aug():
        aug(img, 0)

    t = interleaved({"direct": direct, "augment": through_aug}, repeat)
    return {"direct_s": t["direct"], "augment_s": t["augment"], "overhead": t["augment"] / t["direct"] - 1}


def bench_cache_hit(pipe, size: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        aug = DiffusionAugment(pipe, class_names=["cat", "dog"], strength=0.5, num_inference_steps=4, num_variants=1, p=1.0, cache=tmp, on_miss="error")
        img = Image.fromarray(natural_images(size, 1)[0])
        arr = np.asarray(img)
        var = aug.variant(image_digest(arr), 0, 0)
        aug.cache.put(var.key, natural_images(size, 2)[1])
        path = str(aug.cache.path(var.key))

        def plain():
            with Image.open(path) as im:
                im.load()
                np.asarray(im)

        def hit():
            aug(img, 0)

        t = interleaved({"plain": plain, "hit": hit}, repeat)
    return {"size": size, "pil_open_decode_s": t["plain"], "cache_hit_s": t["hit"], "ratio": t["hit"] / t["plain"]}


def bench_precompute(pipe, n_images: int, steps: int, batch: int, rounds: int = 1) -> dict:
    """images/s of ``precompute`` vs one pipeline call per image, the same variants on both sides.

    With ``rounds > 1`` the two alternate (reference, precompute, reference, ...), each round into a fresh
    cache, and the ratio is the median of the per-round ratios, so drift on a shared machine hits both.
    """
    size = native_resolution(pipe)
    imgs = natural_images(size, n_images)
    data = [(Image.fromarray(a), i % 2) for i, a in enumerate(imgs)]
    kwargs = dict(class_names=["cat", "dog"], strength=(0.5, 1.0), num_inference_steps=steps, num_variants=2, p=1.0)
    ratios, t_refs, t_pres = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            aug = DiffusionAugment(pipe, cache=os.path.join(tmp, f"a{r}"), **kwargs)
            jobs = [(a, aug.variant(image_digest(a), i % 2, v)) for i, a in enumerate(imgs) for v in range(2)]
            ref_cache = AugmentationCache(os.path.join(tmp, f"ref{r}"))
            if r == 0:
                aug.generate([jobs[0][0]], [jobs[0][1]])  # warm up

            def per_image(jobs=jobs, ref_cache=ref_cache):
                for a, var in jobs:
                    batch_t = torch.from_numpy(a.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255
                    out = pipe(prompt=[var.prompt], image=batch_t, strength=var.strength, num_inference_steps=steps,
                               guidance_scale=7.5, generator=[torch.Generator().manual_seed(var.seed)], output_type="pt").images
                    ref_cache.put(var.key, (out[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy())

            t0 = CLOCK()
            per_image()
            t_refs.append(CLOCK() - t0)
            t0 = CLOCK()
            res = precompute(aug, data, batch_size=batch, progress=False)
            t_pres.append(CLOCK() - t0)
            ratios.append(t_refs[-1] / t_pres[-1])
    n = len(jobs)
    return {"images": n, "batch_size": batch, "rounds": rounds, "per_image_img_s": n / statistics.median(t_refs),
            "precompute_img_s": n / statistics.median(t_pres), "speedup": statistics.median(ratios),
            "speedups": ratios, "generated": res["generated"]}


def bench_formats(size: int, n: int, repeat: int) -> list[dict]:
    imgs = natural_images(size, n)
    rows = []
    for name, fmt, kw in [("png level 1", "PNG", {"compress_level": 1}), ("png level 6 (default)", "PNG", {}),
                          ("webp lossless method 0", "WEBP", {"lossless": True, "method": 0, "quality": 0})]:
        blobs = []

        def enc(blobs=blobs, fmt=fmt, kw=kw):
            blobs.clear()
            for a in imgs:
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format=fmt, **kw)
                blobs.append(buf.getvalue())

        t_enc = timeit(enc, repeat) / n

        def dec(blobs=blobs):
            for b in blobs:
                with Image.open(io.BytesIO(b)) as im:
                    im.load()

        t_dec = timeit(dec, repeat) / n
        assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), a) for b, a in zip(blobs, imgs))
        rows.append({"format": name, "encode_ms": 1e3 * t_enc, "decode_ms": 1e3 * t_dec, "kb": sum(map(len, blobs)) / n / 1024})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default), pocket, or a model folder")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (for loaded machines)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rep = 3 if args.quick else 15
    pipe = load(args.model)
    print(f"# bench_core: model={args.model}, torch {torch.__version__}, threads={args.threads}, cpu={os.cpu_count()}, clock={args.clock}")

    o = bench_overhead(pipe, steps=20, repeat=rep)
    print(f"overhead: pipeline {o['direct_s'] * 1e3:.1f} ms, DiffusionAugment {o['augment_s'] * 1e3:.1f} ms -> "
          f"overhead {100 * o['overhead']:+.1f}% (target <= 5%)")
    for size in (32, 512):
        h = bench_cache_hit(pipe, size, repeat=rep * 10)
        print(f"cache hit {size}px: PIL open+decode {h['pil_open_decode_s'] * 1e3:.3f} ms, cache hit {h['cache_hit_s'] * 1e3:.3f} ms "
              f"-> {h['ratio']:.2f}x (target <= 1.3x)")
    p = bench_precompute(pipe, n_images=8 if args.quick else 32, steps=10, batch=16)
    print(f"precompute: {p['images']} variants, per-image calls {p['per_image_img_s']:.2f} img/s, precompute(batch {p['batch_size']}) "
          f"{p['precompute_img_s']:.2f} img/s -> {p['speedup']:.2f}x (target >= 2x)")
    for r in bench_formats(512, 2 if args.quick else 6, repeat=2 if args.quick else 5):
        print(f"format 512px {r['format']:<24} encode {r['encode_ms']:6.1f} ms  decode {r['decode_ms']:5.1f} ms  size {r['kb']:6.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
