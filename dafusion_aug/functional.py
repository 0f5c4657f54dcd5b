"""The one stateless, deterministic, batched generation path.

:func:`diffuse` resizes each image to the model's native resolution, runs img2img (SDEdit) with one
``torch.Generator`` per sample (seeded on the CPU, so a sample's noise does not depend on its batch or
device), and resizes the result back to the input's size. Batches are grouped by strength, because a
diffusers img2img call takes one strength.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["diffuse", "native_resolution", "check_strengths", "to_batch"]


def native_resolution(pipe) -> int:
    """The image size the pipeline's UNet was trained at (512 for SD 1.5, 32 for the pocket model)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def check_strengths(strengths: Sequence[float], num_inference_steps: int, name: str = "strength") -> None:
    """Every strength in (0, 1] must leave at least one denoising step: ``int(steps * strength) >= 1``."""
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < float(s) <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {s!r}")
        if int(num_inference_steps * float(s)) < 1:
            raise ValueError(
                f"{name}={s} with num_inference_steps={num_inference_steps} runs int({num_inference_steps} * {s}) = 0 "
                "denoising steps; raise num_inference_steps or the strength"
            )


def to_batch(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` arrays as one float ``(N, 3, size, size)`` batch in [0, 1] (bicubic, antialiased).

    This is the model input of :func:`diffuse` (and of the VAE encoding in :func:`~dafusion_aug.fit_tokens`).
    """
    out = []
    for img in images:
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        out.append(t)
    return torch.cat(out)


def _from_output(images: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    images = images.detach().to("cpu", torch.float32)
    out = []
    for img, (h, w) in zip(images, sizes):
        t = img.unsqueeze(0)
        if t.shape[-2:] != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        arr = t[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        out.append(np.ascontiguousarray(arr))
    return out


def _as_list(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per image ({n}), got {len(value)}")
        return list(value)
    return [value] * n


def diffuse(
    pipe,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    strengths: float | Sequence[float],
    seeds: Sequence[int],
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    negative_prompt: str | Sequence[str] | None = None,
    resolution: int | None = None,
    batch_size: int | None = None,
    fallback_fp32: bool = True,
) -> list[np.ndarray | None]:
    """Run img2img on a batch, deterministically, grouping calls by strength.

    Args:
        pipe: a diffusers ``StableDiffusionImg2ImgPipeline`` (or compatible).
        images: RGB uint8 arrays ``(H, W, 3)``; sizes may differ.
        prompts: one prompt per image.
        strengths: one strength for all, or one per image, each in (0, 1].
        seeds: one generator seed per image.
        guidance_scale: classifier-free guidance scale.
        num_inference_steps: scheduler steps for strength 1 (``int(steps * strength)`` run).
        negative_prompt: one for all, or one per image.
        resolution: generation size; default the model's native size.
        batch_size: most images per pipeline call; default all of a strength group at once.
        fallback_fp32: when a float16/bfloat16 pipeline returns NaN or all-black images, redo those
            samples in float32.

    Returns:
        RGB uint8 arrays, one per input, each at its input's size, in input order; ``None`` for a sample
        whose output stayed NaN or black (never cache it).

    Raises:
        ValueError: the lists differ in length (never silently truncated), or a strength is invalid.
    """
    n = len(images)
    if len(prompts) != n or len(seeds) != n:
        raise ValueError(f"images, prompts and seeds must have the same length, got {n}, {len(prompts)}, {len(seeds)}")
    if n == 0:
        return []
    strengths_l = [float(s) for s in _as_list(strengths, n, "strengths")]
    negatives = _as_list(negative_prompt, n, "negative_prompt")
    check_strengths(sorted(set(strengths_l)), num_inference_steps, "strengths")
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"images[{i}] must be an (H, W, 3) uint8 array, got {getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
    size = int(resolution) if resolution is not None else native_resolution(pipe)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    groups: dict[float, list[int]] = defaultdict(list)
    for i, s in enumerate(strengths_l):
        groups[s].append(i)
    results: list[np.ndarray | None] = [None] * n
    for strength in sorted(groups):
        idx = groups[strength]
        step = batch_size or len(idx)
        for start in range(0, len(idx), step):
            chunk = idx[start : start + step]

            def run(members: list[int], strength: float = strength) -> torch.Tensor:
                negs = [negatives[i] for i in members]
                return pipe(
                    prompt=[prompts[i] for i in members],
                    negative_prompt=None if all(x is None for x in negs) else [x or "" for x in negs],
                    image=to_batch([images[i] for i in members], size),
                    strength=strength,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(int(seeds[i])) for i in members],
                    output_type="pt",
                ).images

            out = run(chunk)
            bad = [j for j in range(len(chunk)) if _is_bad(out[j])]
            if bad and fallback_fp32 and _low_precision(pipe):
                # fp16 VAEs can overflow into NaN or black images: redo just those samples in fp32
                with _in_float32(pipe):
                    redo = run([chunk[j] for j in bad])
                out = out.clone().float()
                for j, img in zip(bad, redo):
                    out[j] = img.to(out.device, out.dtype)
                bad = [j for j in bad if _is_bad(out[j])]
            for j, (i, arr) in enumerate(zip(chunk, _from_output(out, [images[i].shape[:2] for i in chunk]))):
                results[i] = None if j in bad else arr
    return results


def _is_bad(image: torch.Tensor) -> bool:
    """NaN/inf anywhere, or an all-black picture (what an fp16 overflow or a safety checker gives)."""
    return bool(not torch.isfinite(image).all() or image.max() <= 0)


def _low_precision(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    return unet is not None and unet.dtype in (torch.float16, torch.bfloat16)


class _in_float32:
    """Temporarily run a pipeline in float32 (weights round-trip fp16 -> fp32 -> fp16 exactly)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.dtype = pipe.unet.dtype

    def __enter__(self):
        self.pipe.to(torch.float32)
        return self.pipe

    def __exit__(self, *exc) -> None:
        self.pipe.to(self.dtype)
