"""The one stateless, deterministic, batched generation path.

:func:`diffuse` resizes each image to the model's native resolution, runs img2img (SDEdit) with one
``torch.Generator`` per sample (seeded on the CPU, so a sample's noise does not depend on its batch or
device), and resizes the result back to the input's size. With a one-step scheduler (DDIM, Euler,
Euler-ancestral), samples of every strength share UNet batches (dafusion-aug's own loop,
:mod:`dafusion_aug._denoise`); with schedulers that keep multistep state, the batch is grouped by
strength, because a diffusers img2img call takes one strength.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ._denoise import decode, denoise, loop_unsupported
from .regions import generation_masks, paste_outside

__all__ = ["diffuse", "native_resolution", "check_resolution", "check_strengths", "to_batch", "inpaint_pipeline"]


def native_resolution(pipe) -> int:
    """The image size the pipeline's UNet was trained at: 512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL,
    32 for the pocket model."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def check_resolution(pipe, resolution: int | None, name: str = "resolution") -> int:
    """The generation size: ``resolution``, which must be a positive multiple of the VAE's factor (8 for every
    Stable Diffusion; diffusers would silently round it), or the model's :func:`native_resolution`."""
    if resolution is None:
        return native_resolution(pipe)
    factor = int(getattr(pipe, "vae_scale_factor", 1) or 1)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < factor or resolution % factor:
        raise ValueError(f"{name} must be a positive multiple of the VAE's scale factor {factor}, got {resolution!r}")
    return resolution


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


def inpaint_pipeline(pipe):
    """The inpainting pipeline of ``pipe``'s family on the same components (no copy of any weights).

    An inpainting pipeline is returned as it is; an img2img pipeline gets diffusers'
    ``AutoPipelineForInpainting.from_pipe`` (``StableDiffusionInpaintPipeline`` for SD 1.x/2.x), made once
    and kept on ``pipe``. That pipeline runs an inpainting checkpoint's own 9-channel UNet, and an ordinary
    4-channel UNet by blending the real latents back outside the mask at every step, as the official
    DA-Fusion code did with the ordinary SD weights. Tokens and erasures applied to ``pipe`` are shared.

    Raises:
        ValueError: diffusers has no inpainting pipeline for this pipeline's class.
    """
    if "Inpaint" in type(pipe).__name__:
        return pipe
    made = getattr(pipe, "_dafusion_inpaint", None)
    if made is None:
        from diffusers import AutoPipelineForInpainting

        try:
            made = AutoPipelineForInpainting.from_pipe(pipe)
        except Exception as e:
            raise ValueError(f"region edits need an inpainting pipeline, and diffusers has none for "
                             f"{type(pipe).__name__}: {e}") from e
        made.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
        pipe._dafusion_inpaint = made
    return made


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
    mixed_strengths: bool | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> list[np.ndarray | None]:
    """Run img2img on a batch, deterministically, with every strength in the same UNet batches.

    With a one-step scheduler (DDIM, the pocket model's and the tiny pipeline's, Euler, Euler-ancestral),
    samples of different strengths share UNet calls: each runs from its own start step, and a finished
    sample makes room for the next (see ``docs/design.md``). Other schedulers keep multistep state, and
    the batch is then split into one diffusers call per strength, as before.

    Args:
        pipe: a diffusers ``StableDiffusionImg2ImgPipeline`` (or compatible).
        images: RGB uint8 arrays ``(H, W, 3)``; sizes may differ.
        prompts: one prompt per image.
        strengths: one strength for all, or one per image, each in (0, 1].
        seeds: one generator seed per image.
        guidance_scale: classifier-free guidance scale.
        num_inference_steps: scheduler steps for strength 1 (``int(steps * strength)`` run).
        negative_prompt: one for all, or one per image.
        resolution: generation size, a multiple of the VAE's factor; default the model's native size.
        batch_size: most images per UNet call (per pipeline call on the per-strength path); default all.
        fallback_fp32: when a float16/bfloat16 pipeline returns NaN or all-black images, redo those
            samples in float32.
        mixed_strengths: ``None`` (default): strengths share batches whenever the pipeline allows it;
            ``False``: one diffusers pipeline call per strength group (the path of earlier versions, kept
            for comparison); ``True``: require the shared batches.
        masks: edit masks (masked edits, see :mod:`dafusion_aug.regions`): one bool ``(H, W)`` array per
            image at its size, ``True`` where it may change, or ``None`` for a plain img2img edit. Masked
            samples run through :func:`inpaint_pipeline` (one call per strength), and the real pixels are
            pasted back outside the mask: there the output *equals* the input.

    Returns:
        RGB uint8 arrays, one per input, each at its input's size, in input order; ``None`` for a sample
        whose output stayed NaN or black (never cache it).

    Raises:
        ValueError: the lists differ in length (never silently truncated), a strength or the resolution is
            invalid, or ``mixed_strengths=True`` with a pipeline or scheduler that cannot mix strengths.

    Examples:
        >>> from dafusion_aug.testing import tiny_pipeline
        >>> img = np.zeros((32, 32, 3), np.uint8)
        >>> out = diffuse(tiny_pipeline(), [img, img], ["a cat", "a dog"], [0.5, 1.0], [1, 2], num_inference_steps=4)
        >>> [o.shape for o in out]
        [(32, 32, 3), (32, 32, 3)]
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
    size = check_resolution(pipe, resolution)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if mixed_strengths not in (None, True, False):
        raise ValueError(f"mixed_strengths must be None, True or False, got {mixed_strengths!r}")
    why_not = loop_unsupported(pipe) if mixed_strengths is not False else "mixed_strengths=False"
    if mixed_strengths and why_not is not None:
        raise ValueError(f"mixed_strengths=True cannot run on this pipeline: {why_not}")
    if masks is not None and any(m is not None for m in masks):
        return _diffuse_masked(pipe, images, list(prompts), negatives, strengths_l, list(seeds), _check_masks(masks, images),
                               dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, resolution=size,
                                    batch_size=batch_size, fallback_fp32=fallback_fp32, mixed_strengths=mixed_strengths))
    if getattr(getattr(pipe, "unet", None), "config", {}).get("in_channels", 4) == 9:
        raise ValueError("this model is an inpainting checkpoint (a 9-channel UNet): it edits only masked regions, so "
                         "every sample needs a mask (DiffusionAugment(region='object' or 'background') with a Mask in the sample)")
    job = _Job(pipe, images, list(prompts), negatives, strengths_l, list(seeds), size, guidance_scale, num_inference_steps)
    results: list[np.ndarray | None] = [None] * n
    if why_not is None:
        step = batch_size or n
        latents = _denoise_members(job, list(range(n)), step)
        rerun = functools.partial(_run_mixed, job, batch_size=step)
        for a in range(0, n, step):
            chunk = list(range(a, min(a + step, n)))
            for i, arr in zip(chunk, _checked(job, chunk, decode(pipe, latents[a : a + step]), rerun, fallback_fp32)):
                results[i] = arr
        return results
    run = functools.partial(_run_pipeline, job)
    groups: dict[tuple, list[int]] = defaultdict(list)
    sized = _size_conditioned(pipe)
    for i, s in enumerate(strengths_l):
        groups[(s, images[i].shape[:2] if sized else None)].append(i)
    for key in sorted(groups):
        idx = groups[key]
        step = batch_size or len(idx)
        for a in range(0, len(idx), step):
            chunk = idx[a : a + step]
            for i, arr in zip(chunk, _checked(job, chunk, run(chunk), run, fallback_fp32)):
                results[i] = arr
    return results


def _check_masks(masks: Sequence[np.ndarray | None], images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
    if len(masks) != len(images):
        raise ValueError(f"masks must have one entry per image ({len(images)}), got {len(masks)}")
    for i, (m, img) in enumerate(zip(masks, images)):
        if m is not None and (not isinstance(m, np.ndarray) or m.dtype != bool or m.shape != img.shape[:2]):
            raise ValueError(f"masks[{i}] must be a bool array of the image's size {img.shape[:2]}, "
                             f"got {getattr(m, 'dtype', type(m))} {getattr(m, 'shape', '')}")
    return list(masks)


def _diffuse_masked(pipe, images, prompts, negatives, strengths, seeds, masks, kwargs) -> list[np.ndarray | None]:
    """``diffuse`` with some samples masked: the unmasked ones as usual, the masked ones through the
    inpainting pipeline per strength, each pasted onto its real image outside its mask."""
    n = len(images)
    plain = [i for i in range(n) if masks[i] is None]
    results: list[np.ndarray | None] = [None] * n
    if plain:
        made = diffuse(pipe, [images[i] for i in plain], [prompts[i] for i in plain], [strengths[i] for i in plain],
                       [seeds[i] for i in plain], negative_prompt=[negatives[i] for i in plain], **kwargs)
        for i, arr in zip(plain, made):
            results[i] = arr
    inpaint = inpaint_pipeline(pipe)
    job = _Job(inpaint, images, prompts, negatives, strengths, seeds, kwargs["resolution"], kwargs["guidance_scale"],
               kwargs["num_inference_steps"], masks)
    run = functools.partial(_run_pipeline, job)
    groups: dict[float, list[int]] = defaultdict(list)
    for i in range(n):
        if masks[i] is not None:
            groups[strengths[i]].append(i)
    for strength in sorted(groups):
        idx = groups[strength]
        step = kwargs["batch_size"] or len(idx)
        for a in range(0, len(idx), step):
            chunk = idx[a : a + step]
            for i, arr in zip(chunk, _checked(job, chunk, run(chunk), run, kwargs["fallback_fp32"])):
                results[i] = None if arr is None else paste_outside(arr, images[i], masks[i])
    return results


class _Job(NamedTuple):
    """Everything one ``diffuse`` call generates from, indexed by sample."""

    pipe: Any
    images: Sequence[np.ndarray]
    prompts: list[str]
    negatives: list[str | None]
    strengths: list[float]
    seeds: list[int]
    size: int
    guidance_scale: float
    num_inference_steps: int
    masks: list[np.ndarray | None] | None = None

    def pixels(self, members: list[int]) -> torch.Tensor:
        return to_batch([self.images[i] for i in members], self.size)


def _size_conditioned(pipe) -> bool:
    """Whether the UNet takes SDXL's size and crop conditioning (``text_time`` added embeddings)."""
    return getattr(getattr(pipe, "unet", None), "config", {}).get("addition_embed_type") == "text_time"


def _run_pipeline(job: _Job, members: list[int]) -> torch.Tensor:
    """One diffusers img2img call for ``members`` (all of one strength, and for SDXL of one input size):
    images in [0, 1]."""
    negs = [job.negatives[i] for i in members]
    masked = {} if job.masks is None else dict(
        mask_image=generation_masks([job.masks[i] for i in members], job.size), height=job.size, width=job.size)
    extra: dict[str, Any] = {}
    if _size_conditioned(job.pipe):
        # SDXL: the real image's size is the original size, uncropped, resized to the generation size
        h, w = job.images[members[0]].shape[:2]
        extra = dict(original_size=(int(h), int(w)), target_size=(job.size, job.size), crops_coords_top_left=(0, 0))
    return job.pipe(
        **masked,
        prompt=[job.prompts[i] for i in members],
        negative_prompt=None if all(x is None for x in negs) else [x or "" for x in negs],
        image=job.pixels(members),
        strength=job.strengths[members[0]],
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(int(job.seeds[i])) for i in members],
        output_type="pt",
        **extra,
    ).images


def _denoise_members(job: _Job, members: list[int], batch_size: int) -> torch.Tensor:
    """dafusion-aug's denoising loop over ``members`` (any strengths): their final latents."""
    return denoise(
        job.pipe,
        lambda sub: job.pixels([members[j] for j in sub]),
        [job.prompts[i] for i in members],
        [job.negatives[i] for i in members],
        [job.strengths[i] for i in members],
        [job.seeds[i] for i in members],
        guidance_scale=job.guidance_scale,
        num_inference_steps=job.num_inference_steps,
        batch_size=batch_size,
        fixed_shape=hasattr(job.pipe.unet, "_orig_mod"),  # torch.compile'd: one shape, no recompiles in the tail
    )


def _run_mixed(job: _Job, members: list[int], batch_size: int) -> torch.Tensor:
    """The loop over ``members``, decoded in batches: images in [0, 1]."""
    latents = _denoise_members(job, members, batch_size)
    return torch.cat([decode(job.pipe, latents[a : a + batch_size]) for a in range(0, len(members), batch_size)])


def _checked(job: _Job, chunk: list[int], out: torch.Tensor, rerun: Callable[[list[int]], torch.Tensor],
             fallback_fp32: bool) -> list[np.ndarray | None]:
    """``out`` (images in [0, 1] of ``chunk``) as uint8 arrays at the inputs' sizes; NaN or black samples
    of a half-precision pipeline are redone with ``rerun`` in float32, and ``None`` where still bad."""
    bad = [j for j in range(len(chunk)) if _is_bad(out[j])]
    if bad and fallback_fp32 and _low_precision(job.pipe):
        # fp16 VAEs can overflow into NaN or black images: redo just those samples in fp32
        with _in_float32(job.pipe):
            redo = rerun([chunk[j] for j in bad])
        out = out.clone().float()
        for j, img in zip(bad, redo):
            out[j] = img.to(out.device, out.dtype)
        bad = [j for j in bad if _is_bad(out[j])]
    arrays = _from_output(out, [job.images[i].shape[:2] for i in chunk])
    return [None if j in bad else arr for j, arr in enumerate(arrays)]


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
