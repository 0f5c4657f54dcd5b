"""Generation at scale (issue: precompute / Ray). Every figure is a ratio measured in one run.

1. images/s of ``precompute`` (batch 16) vs one pipeline call per image, the reference recipe, on the tiny
   pipeline and on the pocket model (target >= 2.5x).
2. Ray Data backend with 2 CPU actors vs the local backend on the same machine: ratio and overhead.
3. On CUDA (when present): the pocket model's images/s in fp32 and fp16.

Run: ``python benchmarks/bench_generate.py [--quick] [--skip-ray] [--models tiny pocket] [--images N --rounds R]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import bench_core  # noqa: E402
from bench_core import bench_precompute, load, natural_images  # noqa: E402

from dafusion_aug import DiffusionAugment, PipelineSpec, precompute  # noqa: E402
from dafusion_aug.functional import native_resolution  # noqa: E402


def bench_ray(model: str, n_images: int, steps: int, batch: int) -> dict:
    import ray

    spec = PipelineSpec(model if model != "tiny" else _tiny_folder(), device="cpu")
    size = native_resolution(spec.load())
    data = [(Image.fromarray(a), i % 2) for i, a in enumerate(natural_images(size, n_images))]
    kwargs = dict(class_names=["cat", "dog"], num_inference_steps=steps, num_variants=2, p=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        local = precompute(DiffusionAugment(spec, cache=os.path.join(tmp, "l"), **kwargs), data, batch_size=batch, progress=False)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        remote = precompute(DiffusionAugment(spec, cache=os.path.join(tmp, "r"), **kwargs), data, backend="ray", batch_size=batch,
                            concurrency=2, progress=False)
        t_ray = time.perf_counter() - t0
        ray.shutdown()
    n = local["generated"]
    assert remote["generated"] == n
    return {"images": n, "local_img_s": n / t_local, "ray_img_s": n / t_ray, "ratio": t_local / t_ray,
            "ray_init_s": t_init, "overhead_s": t_ray - t_local}


_TINY = None


def _tiny_folder() -> str:
    global _TINY
    if _TINY is None:
        from dafusion_aug.testing import tiny_pipeline

        _TINY = tempfile.mkdtemp(prefix="tiny-model-")
        tiny_pipeline(0).save_pretrained(_TINY)
    return _TINY


def bench_cuda(model: str, steps: int, batch: int, n: int) -> list[dict]:
    rows = []
    for dtype in ("float32", "float16", "bfloat16"):
        pipe = load_on(model, "cuda", dtype)
        size = native_resolution(pipe)
        data = [(Image.fromarray(a), i % 2) for i, a in enumerate(natural_images(size, n))]
        with tempfile.TemporaryDirectory() as tmp:
            aug = DiffusionAugment(pipe, class_names=["cat", "dog"], num_inference_steps=steps, num_variants=1, p=1.0, cache=tmp)
            precompute(aug, data[:batch], batch_size=batch, progress=False)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = precompute(aug, data[batch:], batch_size=batch, progress=False)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        rows.append({"dtype": dtype, "img_s": res["generated"] / dt, "bad": res["bad_outputs"]})
    return rows


def load_on(model, device, dtype):
    from dafusion_aug import load_pipeline

    if model == "tiny":
        return load_pipeline(_tiny_folder(), device=device, dtype=dtype)
    return load_pipeline(model, device=device, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--models", nargs="+", default=["tiny", "pocket"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=None, help="source images per model (2 variants each; default 24, 8 with --quick)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate reference and precompute this many times (fresh caches) and report the median ratio")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time for the precompute ratio (loaded machines); Ray is always wall time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_core.CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# bench_generate: torch {torch.__version__}, threads={args.threads}, cpu={os.cpu_count()}, gpu={gpu}, clock={args.clock}")
    n = args.images or (8 if args.quick else 24)
    for model in args.models:
        try:
            pipe = load(model)
        except Exception as e:  # the pocket model may not be built on this machine
            print(f"{model}: skipped ({e})")
            continue
        p = bench_precompute(pipe, n_images=n, steps=args.steps, batch=16, rounds=args.rounds)
        rounds = f" (median of {p['rounds']} rounds: {', '.join(f'{r:.2f}x' for r in p['speedups'])})" if p["rounds"] > 1 else ""
        print(f"{model}: {p['images']} variants, {args.steps} steps: per-image calls {p['per_image_img_s']:.2f} img/s, "
              f"precompute(batch 16) {p['precompute_img_s']:.2f} img/s -> {p['speedup']:.2f}x{rounds} (target >= 2.5x)")
    if not args.skip_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print('ray: skipped (pip install "dafusion-aug[ray]")')
        else:
            for model in args.models:
                try:
                    r = bench_ray(model, n_images=n, steps=args.steps, batch=4)
                except Exception as e:
                    print(f"ray {model}: skipped ({type(e).__name__}: {e})")
                    continue
                print(f"ray {model}: {r['images']} variants, local {r['local_img_s']:.2f} img/s, ray 2 CPU actors "
                      f"{r['ray_img_s']:.2f} img/s -> ray/local speed {r['ratio']:.2f}x; overhead {r['overhead_s']:+.1f} s "
                      f"(+ ray.init {r['ray_init_s']:.1f} s)")
    if torch.cuda.is_available():
        for model in args.models:
            for row in bench_cuda(model, steps=args.steps, batch=16, n=64):
                print(f"cuda {model} {row['dtype']}: {row['img_s']:.1f} img/s (NaN/black: {row['bad']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
