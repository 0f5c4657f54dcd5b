"""Generation at scale (issues: precompute / Ray; "generation close to its limit"). Every figure is a ratio
measured in one run.

1. Mixed strengths (the default section). For each model (``tiny``, ``pocket``, ``sd15-arch``: Stable
   Diffusion 1.5's architecture with random weights, at a small resolution on the CPU) and batch size, the
   same variants (DA-Fusion's four strengths, ``--variants`` of them, class-name prompts, guidance 7.5)
   made four ways, images/s of each:
   - ``one-image``: the official DA-Fusion style, one pipeline call per variant (timed on
     ``--ref-per-strength`` variants of each strength and scaled to the set's strength counts: its cost per
     image does not depend on the set's size);
   - ``per-strength``: ``precompute(mixed_strengths=False)``: batches of one strength, one diffusers call each
     (the path before the mixed loop);
   - ``mixed``: ``precompute`` with the four strengths sharing every UNet batch (dafusion-aug's own loop);
   - ``UNet bound``: the same number of UNet evaluations (sum over variants of ``int(steps * strength)``,
     doubled for guidance) at the same batch size, with nothing else: the limit a pipeline can reach.
   ``efficiency`` = UNet-bound time / precompute time. Rounds alternate the paths on fresh caches; medians
   of the per-round ratios. The last round's mixed run at the first batch size also splits its time into
   UNet, VAE encoder, VAE decoder, text encoder and the rest (forward hooks, a few clock reads per call).
2. Ray Data backend with 2 CPU actors vs the local backend on the same machine (``--skip-ray`` to leave out).
3. On CUDA (when present): SD 1.5's architecture at 512 px in float16 and bfloat16, with SDPA,
   ``channels_last`` and ``torch.compile`` on and off: mixed precompute and per-strength images/s, the UNet
   bound and the efficiency, with the GPU's name.

Run (what docs/performance.md records, on a shared 2-core CPU):
``python benchmarks/bench_generate.py --clock cpu --threads 1 --skip-ray``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import bench_core  # noqa: E402
from bench_core import natural_images  # noqa: E402
from bench_fit import _pipeline  # noqa: E402

from dafusion_aug import AugmentationCache, DiffusionAugment, PipelineSpec, precompute  # noqa: E402
from dafusion_aug.functional import native_resolution, to_batch  # noqa: E402
from dafusion_aug.hashing import image_digest  # noqa: E402
from dafusion_aug.transform import DEFAULT_STRENGTHS  # noqa: E402

GUIDANCE = 7.5


def clock() -> float:
    return bench_core.CLOCK()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- the four ways of making the same variants ---------------------------------------------------------
class Workload:
    """``n_images`` images x ``num_variants`` variants of DA-Fusion's four strengths on one pipeline."""

    def __init__(self, pipe, n_variants: int, steps: int, size: int, num_variants: int = 10, device: str = "cpu") -> None:
        self.pipe, self.steps, self.size, self.device = pipe, steps, size, device
        n_images = max(1, math.ceil(n_variants / num_variants))
        imgs = natural_images(size, n_images)
        self.data = [(Image.fromarray(a), i % 2) for i, a in enumerate(imgs)]
        self.kwargs = dict(class_names=["cat", "dog"], strength=DEFAULT_STRENGTHS, guidance_scale=GUIDANCE,
                           num_inference_steps=steps, num_variants=num_variants, p=1.0,
                           resolution=None if size == native_resolution(pipe) else size)
        aug = self.augment(None)
        aug.fingerprint()  # hashes a loaded pipeline's weights once (memoised on the pipeline), outside any timing
        self.jobs = [(a, aug.variant(image_digest(a), i % 2, v)) for i, a in enumerate(imgs) for v in range(num_variants)]
        self.counts = {s: sum(var.strength == s for _, var in self.jobs) for s in DEFAULT_STRENGTHS}
        self.unet_steps = sum(min(int(steps * var.strength), steps) for _, var in self.jobs)

    def augment(self, cache: str | None) -> DiffusionAugment:
        return DiffusionAugment(self.pipe, cache=cache, **self.kwargs)

    def precompute(self, cache: str, batch: int, mixed: bool, spent: dict | None = None) -> float:
        """Seconds of one ``precompute`` into a fresh cache (mixed strengths or the per-strength path); with
        ``spent``, also the seconds spent in the UNet, the VAE's encoder and decoder and the text encoder."""
        aug = self.augment(cache)
        pipe = self.pipe
        modules = {"UNet": pipe.unet, "VAE encoder": pipe.vae.encoder, "VAE decoder": pipe.vae.decoder, "text encoder": pipe.text_encoder}
        with _timed_modules(modules if spent is not None else {}) as parts:
            _sync(self.device)
            t0 = clock()
            res = precompute(aug, self.data, batch_size=batch, progress=False, mixed_strengths=None if mixed else False)
            _sync(self.device)
            total = clock() - t0
        assert res["generated"] == len(self.jobs), res
        if spent is not None:
            spent.update({k: v / total for k, v in parts.items()})
            spent["the rest"] = 1.0 - sum(spent.values())
        return total

    def warm_up(self) -> None:
        """One variant through each path: first-call allocations and kernel choices, outside any timing."""
        aug = self.augment(None)
        a, var = self.jobs[0]
        aug.generate([a], [var], mixed_strengths=None)
        aug.generate([a], [var], mixed_strengths=False)

    def one_image(self, cache: str, per_strength: int) -> float:
        """Estimated seconds of the one-image loop over every variant, from ``per_strength`` of each strength."""
        store = AugmentationCache(cache)
        total = 0.0
        for s in DEFAULT_STRENGTHS:
            sample = [job for job in self.jobs if job[1].strength == s][:per_strength]
            if not sample:
                continue
            _sync(self.device)
            t0 = clock()
            for a, var in sample:
                out = self.pipe(prompt=[var.prompt], image=to_batch([a], self.size), strength=var.strength,
                                num_inference_steps=self.steps, guidance_scale=GUIDANCE,
                                generator=[torch.Generator().manual_seed(var.seed)], output_type="pt").images
                store.put(var.key, (out[0].float().permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
            _sync(self.device)
            total += (clock() - t0) / len(sample) * self.counts[s]
        return total

    def unet_bound(self, batch: int) -> float:
        """Seconds of the UNet alone: ``unet_steps`` sample-steps in calls of ``batch`` (x2 for guidance)."""
        unet = self.pipe.unet
        lat = self.size // self.pipe.vae_scale_factor
        g = torch.Generator().manual_seed(0)
        dtype = self.pipe.text_encoder.dtype
        x = torch.randn(2 * batch, unet.config.in_channels, lat, lat, generator=g).to(self.device, dtype)
        if getattr(self.pipe, "_bench_channels_last", False):
            x = x.to(memory_format=torch.channels_last)
        width = self.pipe.text_encoder.config.hidden_size
        states = torch.randn(2 * batch, self.pipe.tokenizer.model_max_length, width, generator=g).to(self.device, dtype)
        t = torch.randint(1, 1000, (2 * batch,), generator=g).to(self.device)
        full, rest = divmod(self.unet_steps, batch)
        if hasattr(unet, "_orig_mod") and rest:  # a compiled UNet runs the loop's tail padded to one shape
            full, rest = full + 1, 0
        _sync(self.device)
        t0 = clock()
        with torch.no_grad():
            for _ in range(full):
                unet(x, t, encoder_hidden_states=states, return_dict=False)
            if rest:
                unet(x[: 2 * rest], t[: 2 * rest], encoder_hidden_states=states[: 2 * rest], return_dict=False)
        _sync(self.device)
        return clock() - t0


def bench_mixed(work: Workload, batches: list[int], rounds: int, ref_per_strength: int, split: bool = True) -> dict:
    """Alternate the four paths ``rounds`` times on fresh caches; medians of times and per-round ratios.

    With ``split``, the last round's mixed run at ``batches[0]`` also records where its time went.
    """
    times: dict = {"one-image": []}
    for b in batches:
        for what in ("per-strength", "mixed", "UNet bound"):
            times[(what, b)] = []
    parts: dict | None = {} if split else None
    work.warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            times["one-image"].append(work.one_image(os.path.join(tmp, f"one{r}"), ref_per_strength))
            for b in batches:
                order = (("per-strength", False), ("mixed", True)) if r % 2 == 0 else (("mixed", True), ("per-strength", False))
                for what, mixed in order:
                    spent = parts if (mixed and r == rounds - 1 and b == batches[0]) else None
                    times[(what, b)].append(work.precompute(os.path.join(tmp, f"{what}{b}-{r}"), b, mixed, spent))
                times[("UNet bound", b)].append(work.unet_bound(b))
    n = len(work.jobs)
    out = {"variants": n, "unet_steps": work.unet_steps, "counts": work.counts, "one_image_img_s": n / statistics.median(times["one-image"]),
           "rounds": rounds, "batches": {}, "parts": parts}
    for b in batches:
        ref = times["one-image"]
        per, mix, bound = times[("per-strength", b)], times[("mixed", b)], times[("UNet bound", b)]
        out["batches"][b] = {
            "per_strength_img_s": n / statistics.median(per),
            "mixed_img_s": n / statistics.median(mix),
            "bound_img_s": n / statistics.median(bound),
            "mixed_vs_one": statistics.median(r / m for r, m in zip(ref, mix)),
            "per_vs_one": statistics.median(r / p for r, p in zip(ref, per)),
            "mixed_vs_per": statistics.median(p / m for p, m in zip(per, mix)),
            "efficiency": statistics.median(u / m for u, m in zip(bound, mix)),
            "per_efficiency": statistics.median(u / p for u, p in zip(bound, per)),
            "mixed_vs_one_rounds": [r / m for r, m in zip(ref, mix)],
        }
    return out


@contextlib.contextmanager
def _timed_modules(modules: dict):
    """Add up the time spent in each module's forward (outermost calls only)."""
    spent = dict.fromkeys(modules, 0.0)
    started: dict = {}
    handles = []
    for name, module in modules.items():
        def pre(mod, args, name=name):
            started[name] = clock()

        def post(mod, args, output, name=name):
            spent[name] += clock() - started.pop(name)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()


def print_mixed(model: str, size: int, steps: int, res: dict) -> None:
    counts = "/".join(str(res["counts"][s]) for s in DEFAULT_STRENGTHS)
    print(f"{model} ({size} px, {steps} steps): {res['variants']} variants, strengths 0.25/0.5/0.75/1.0 x {counts}, "
          f"{res['unet_steps']} UNet sample-steps (x2 with guidance), median of {res['rounds']} round(s)")
    print(f"  one-image loop          {res['one_image_img_s']:8.3f} img/s")
    for b, r in res["batches"].items():
        rounds = ", ".join(f"{x:.2f}x" for x in r["mixed_vs_one_rounds"])
        print(f"  batch {b:3d}: per-strength {r['per_strength_img_s']:8.3f} img/s ({r['per_vs_one']:.2f}x one-image), "
              f"mixed {r['mixed_img_s']:8.3f} img/s ({r['mixed_vs_one']:.2f}x one-image [{rounds}], {r['mixed_vs_per']:.2f}x per-strength), "
              f"UNet bound {r['bound_img_s']:8.3f} img/s -> efficiency {r['efficiency']:.2f} (per-strength {r['per_efficiency']:.2f})")
    if res["parts"]:
        print(f"  batch {list(res['batches'])[0]} mixed precompute time: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in res["parts"].items()))


# -- Ray -----------------------------------------------------------------------------------------------
_TINY = None


def _tiny_folder() -> str:
    global _TINY
    if _TINY is None:
        from dafusion_aug.testing import tiny_pipeline

        _TINY = tempfile.mkdtemp(prefix="tiny-model-")
        tiny_pipeline(0).save_pretrained(_TINY)
    return _TINY


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


# -- accelerators --------------------------------------------------------------------------------------
ACCEL_ROWS = {
    # name: (SDPA attention (else diffusers' classic AttnProcessor), channels_last, torch.compile of the UNet)
    "sdpa": (True, False, False),
    "sdpa+cl": (True, True, False),
    "classic+cl": (False, True, False),
    "sdpa+cl+compile": (True, True, True),
}


def _configure(pipe, sdpa: bool, channels_last: bool, compiled: bool, device: str):
    """Set attention, memory format and compilation on a pipeline; return the UNet to restore afterwards."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    pipe.unet = unet
    unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet.to(memory_format=fmt)
    pipe.vae.to(memory_format=fmt)
    pipe._bench_channels_last = channels_last
    if compiled:
        pipe.unet = torch.compile(unet, mode="reduce-overhead" if device.startswith("cuda") else "default")
    return unet


def bench_accel(model: str, device: str, dtypes: list[str], rows: list[str], size: int | None, n_variants: int, steps: int,
                batch: int, ref_per_strength: int) -> list[dict]:
    """Mixed and per-strength precompute, the UNet bound and the one-image loop on ``device`` per dtype and row."""
    out = []
    base = _pipeline(model)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        pipe = base.to(device, dtype)
        work = Workload(pipe, n_variants, steps, size or native_resolution(pipe), device=device)
        with tempfile.TemporaryDirectory() as tmp:
            one = work.one_image(os.path.join(tmp, "one"), ref_per_strength)
            for row in rows:
                _configure(pipe, *ACCEL_ROWS[row], device)
                work.precompute(os.path.join(tmp, f"warm-{row}"), batch, True)  # warm-up, and compilation: every shape
                work.precompute(os.path.join(tmp, f"warmp-{row}"), batch, False)
                mixed = work.precompute(os.path.join(tmp, f"m-{row}"), batch, True)
                per = work.precompute(os.path.join(tmp, f"p-{row}"), batch, False)
                bound = work.unet_bound(batch)
                n = len(work.jobs)
                out.append({"dtype": dtype_name, "row": row, "size": work.size, "mixed_img_s": n / mixed, "per_strength_img_s": n / per,
                            "bound_img_s": n / bound, "one_image_img_s": n / one, "efficiency": bound / mixed})
                _configure(pipe, True, False, False, device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["tiny", "pocket", "sd15-arch"], help="none: only the other sections")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--variants", type=int, default=160, help="variants per model (10 per image; tiny and pocket)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds on fresh caches (median ratios)")
    ap.add_argument("--ref-per-strength", type=int, default=8, help="one-image loop: variants timed per strength")
    ap.add_argument("--sd15-size", type=int, default=64, help="sd15-arch resolution on the CPU (512 on CUDA)")
    ap.add_argument("--sd15-variants", type=int, default=64, help="enough for the UNet calls to outnumber the longest sample's steps")
    ap.add_argument("--sd15-batches", type=int, nargs="+", default=[16])
    ap.add_argument("--sd15-rounds", type=int, default=1)
    ap.add_argument("--no-breakdown", action="store_true", help="do not split one mixed precompute run's time by module")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--ray-images", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (loaded machines; use with --threads 1); Ray and CUDA are always wall time")
    ap.add_argument("--accel-device", default="cuda" if torch.cuda.is_available() else None,
                    help="run the accelerator section on this device (default: cuda when present; 'cpu' smoke-tests it)")
    ap.add_argument("--accel-model", default="sd15-arch")
    ap.add_argument("--accel-size", type=int, default=None, help="default: the model's native size (512 for sd15-arch)")
    ap.add_argument("--accel-dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--accel-rows", nargs="+", default=list(ACCEL_ROWS), choices=list(ACCEL_ROWS))
    ap.add_argument("--accel-variants", type=int, default=64)
    ap.add_argument("--accel-batch", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_core.CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# bench_generate: torch {torch.__version__}, threads={args.threads}, cpu={os.cpu_count()}, gpu={gpu}, clock={args.clock}")
    for model in args.models:
        try:
            pipe = _pipeline(model)
        except Exception as e:  # the pocket model may not be built on this machine
            print(f"{model}: skipped ({type(e).__name__}: {e})")
            continue
        sd15 = model == "sd15-arch"
        size = args.sd15_size if sd15 else native_resolution(pipe)
        work = Workload(pipe, args.sd15_variants if sd15 else args.variants, args.steps, size)
        batches = args.sd15_batches if sd15 else args.batches
        res = bench_mixed(work, batches, args.sd15_rounds if sd15 else args.rounds, args.ref_per_strength if not sd15 else 1,
                          split=not args.no_breakdown)
        print_mixed(model, size, args.steps, res)
        del pipe, work
    if not args.skip_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print('ray: skipped (pip install "dafusion-aug[ray]")')
        else:
            for model in [m for m in args.models if m in ("tiny", "pocket")]:
                try:
                    r = bench_ray(model, n_images=args.ray_images, steps=args.steps, batch=4)
                except Exception as e:
                    print(f"ray {model}: skipped ({type(e).__name__}: {e})")
                    continue
                print(f"ray {model}: {r['images']} variants, local {r['local_img_s']:.2f} img/s, ray 2 CPU actors "
                      f"{r['ray_img_s']:.2f} img/s -> ray/local speed {r['ratio']:.2f}x; overhead {r['overhead_s']:+.1f} s "
                      f"(+ ray.init {r['ray_init_s']:.1f} s)")
    if args.accel_device:
        if args.accel_device.startswith("cuda"):
            bench_core.CLOCK = time.perf_counter
        name = torch.cuda.get_device_name(0) if args.accel_device.startswith("cuda") else args.accel_device
        for r in bench_accel(args.accel_model, args.accel_device, args.accel_dtypes, args.accel_rows, args.accel_size,
                             args.accel_variants, args.steps, args.accel_batch, ref_per_strength=2):
            print(f"{name} {args.accel_model} {r['size']} px {r['dtype']} [{r['row']}], batch {args.accel_batch}: mixed {r['mixed_img_s']:.2f} img/s, "
                  f"per-strength {r['per_strength_img_s']:.2f} img/s, one-image {r['one_image_img_s']:.2f} img/s, "
                  f"UNet bound {r['bound_img_s']:.2f} img/s -> efficiency {r['efficiency']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
