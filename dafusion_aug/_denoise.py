"""dafusion-aug's own img2img denoising loop: every sample at its own timestep, so strengths share batches.

diffusers' ``StableDiffusionImg2ImgPipeline`` takes one ``strength`` per call, so DA-Fusion's four strengths
make four calls, each with its own leftover batch and its own fixed costs. With img2img, a sample of
strength ``s`` runs the last ``int(steps * s)`` steps of the same timestep grid, so nothing ties it to the
other samples of its call but the scheduler's bookkeeping. This loop keeps that bookkeeping per sample:

1. the prompts are encoded once per distinct text (conditional and negative), not once per image;
2. the images are VAE-encoded in batches; each sample's posterior noise and starting noise come from its
   own CPU generator, in the pipeline's order, so a sample's noise does not depend on its batch;
3. continuous batching: a queue of samples, longest first; each UNet call takes up to ``batch_size``
   samples, each at its own timestep (a ``(B,)`` timestep tensor), with classifier-free guidance as a
   doubled batch; a finished sample leaves and the next one joins, so every call but the last few is full;
4. a per-sample scheduler step (:class:`DDIMStep`, :class:`EulerStep`), exact to the diffusers scheduler's
   ``step`` for each sample (Euler-ancestral's per-step noise comes from each sample's generator);
5. the final latents are VAE-decoded in batches (:func:`decode`).

Schedulers with multistep state (PNDM, DPM-Solver++, UniPC) cannot step samples that joined at different
times in one call; :func:`loop_unsupported` says why, and :func:`dafusion_aug.functional.diffuse` then
falls back to one diffusers call per strength.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

__all__ = ["DDIMStep", "EulerStep", "MIXED_SCHEDULERS", "decode", "denoise", "loop_unsupported", "scheduler_mixes"]

#: Scheduler classes whose step the loop reproduces per sample.
MIXED_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def scheduler_mixes(class_name: str | None) -> bool:
    """Whether a scheduler class (by name, e.g. ``"DDIMScheduler"``) can run mixed strengths in one batch.

    With :meth:`~dafusion_aug.PipelineSpec.scheduler_class` it answers for a spec without loading it.
    """
    return class_name in MIXED_SCHEDULERS


def loop_unsupported(pipe) -> str | None:
    """Why :func:`denoise` cannot stand in for ``pipe(...)``, or ``None`` when it can.

    The loop reproduces diffusers' ``StableDiffusionImg2ImgPipeline.__call__`` as :func:`diffuse` calls it
    (no IP-Adapter, no guidance-embedding UNet) with a scheduler of :data:`MIXED_SCHEDULERS`. Any other
    object, including wrappers and subclasses that override ``__call__``, is called as a pipeline.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    exact = isinstance(pipe, StableDiffusionImg2ImgPipeline) and type(pipe).__call__ is StableDiffusionImg2ImgPipeline.__call__
    if not exact:
        return f"{type(pipe).__name__} is not diffusers' StableDiffusionImg2ImgPipeline"
    scheduler = type(pipe.scheduler).__name__
    if not scheduler_mixes(scheduler):
        return f"{scheduler} keeps multistep state or is not one of {MIXED_SCHEDULERS}"
    config = pipe.scheduler.config
    if getattr(config, "thresholding", False):
        return f"{scheduler} with thresholding=True"
    if scheduler == "EulerAncestralDiscreteScheduler" and config.prediction_type not in ("epsilon", "v_prediction"):
        return f"{scheduler} with prediction_type={config.prediction_type!r}"
    config = pipe.unet.config
    if getattr(config, "time_cond_proj_dim", None) is not None or getattr(config, "addition_embed_type", None) is not None:
        return "the UNet needs extra conditioning (guidance embedding or added embeddings)"
    if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
        return "an IP-Adapter is loaded"
    return None


def _col(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample float32 scalars as a ``(B, 1, 1, 1)`` column in ``like``'s dtype: what type promotion does
    with a 0-d float32 tensor meeting ``like``, sample by sample."""
    return x.view(-1, 1, 1, 1).to(like.device, like.dtype)


class DDIMStep:
    """``DDIMScheduler.step`` (eta = 0, as the img2img pipeline calls it) for a batch of samples, each at
    its own position in the timestep grid.

    The per-sample coefficients are computed in float32, as the scheduler computes its scalars, and cast
    to the sample's dtype before they meet it, as PyTorch's type promotion does with the scheduler's 0-d
    tensors: each sample gets the same arithmetic as in its own diffusers call.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` (its ``set_timesteps`` is called here).
        num_inference_steps: the grid's length (strength 1 runs all of it).
    """

    def __init__(self, scheduler, num_inference_steps: int) -> None:
        scheduler.set_timesteps(num_inference_steps)
        self.scheduler = scheduler
        self.num_steps = int(num_inference_steps)
        self.grid = scheduler.timesteps.to("cpu", torch.int64)
        self.alphas = scheduler.alphas_cumprod.to("cpu", torch.float32)
        self.final = scheduler.final_alpha_cumprod.to("cpu", torch.float32)
        self.stride = scheduler.config.num_train_timesteps // self.num_steps

    def start(self, strength: float) -> int:
        """The grid position a sample of ``strength`` starts at (the pipeline's ``get_timesteps``)."""
        init = min(int(self.num_steps * strength), self.num_steps)
        return max(self.num_steps - init, 0)

    def timesteps(self, positions: Sequence[int]) -> torch.Tensor:
        """The timestep of each grid position, ``(B,)`` int64 on the CPU."""
        return self.grid[torch.as_tensor(list(positions), dtype=torch.int64)]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Noise clean latents to each sample's starting timestep (the scheduler's own ``add_noise``)."""
        return self.scheduler.add_noise(latents, noise, self.timesteps(positions).to(latents.device))

    def scale(self, sample: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """DDIM does not scale the model input."""
        return sample

    def step(self, model_output: torch.Tensor, positions: Sequence[int], sample: torch.Tensor,
             generators: Sequence[torch.Generator] = ()) -> torch.Tensor:
        """One denoising step per sample: ``x_t -> x_{t-1}`` at each sample's own ``t`` (no noise: eta = 0)."""
        t = self.timesteps(positions)
        prev = t - self.stride
        alpha_t = self.alphas[t]
        alpha_prev = torch.where(prev >= 0, self.alphas[prev.clamp(min=0)], self.final)
        beta_t = 1 - alpha_t

        def col(x: torch.Tensor) -> torch.Tensor:
            return _col(x, sample)

        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            pred_original = (sample - col(beta_t**0.5) * model_output) / col(alpha_t**0.5)
            pred_epsilon = model_output
        elif kind == "sample":
            pred_original = model_output
            pred_epsilon = (sample - col(alpha_t**0.5) * pred_original) / col(beta_t**0.5)
        elif kind == "v_prediction":
            pred_original = col(alpha_t**0.5) * sample - col(beta_t**0.5) * model_output
            pred_epsilon = col(alpha_t**0.5) * model_output + col(beta_t**0.5) * sample
        else:
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {kind!r}")
        if self.scheduler.config.clip_sample:
            limit = self.scheduler.config.clip_sample_range
            pred_original = pred_original.clamp(-limit, limit)
        direction = col((1 - alpha_prev) ** 0.5) * pred_epsilon
        return col(alpha_prev**0.5) * pred_original + direction


class EulerStep:
    """``EulerDiscreteScheduler.step`` (no churn, as the img2img pipeline calls it) or, with ``ancestral``,
    ``EulerAncestralDiscreteScheduler.step``, for samples at their own positions in the sigma schedule.

    The sample is stepped in float32 and cast back, as the schedulers do; an ancestral step draws each
    sample's noise from that sample's generator, so its noise sequence is the one of its own diffusers call.

    Args:
        scheduler: a diffusers ``EulerDiscreteScheduler`` or ``EulerAncestralDiscreteScheduler``.
        num_inference_steps: the grid's length (strength 1 runs all of it).
    """

    def __init__(self, scheduler, num_inference_steps: int) -> None:
        scheduler.set_timesteps(num_inference_steps)
        self.scheduler = scheduler
        self.num_steps = int(num_inference_steps)
        self.grid = scheduler.timesteps.to("cpu")
        self.sigmas = scheduler.sigmas.to("cpu", torch.float32)
        self.ancestral = type(scheduler).__name__ == "EulerAncestralDiscreteScheduler"

    start = DDIMStep.start

    def timesteps(self, positions: Sequence[int]) -> torch.Tensor:
        """The timestep of each grid position, ``(B,)`` on the CPU."""
        return self.grid[torch.as_tensor(list(positions), dtype=torch.int64)]

    def _sigma(self, positions: Sequence[int], offset: int = 0) -> torch.Tensor:
        return self.sigmas[torch.as_tensor(list(positions), dtype=torch.int64) + offset]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """``latents + noise * sigma`` at each sample's start (the schedulers' ``add_noise`` with a begin index)."""
        sigma = self.sigmas.to(latents.device, latents.dtype)[torch.as_tensor(list(positions), dtype=torch.int64)]
        return latents + noise * sigma.view(-1, 1, 1, 1)

    def scale(self, sample: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)`` per sample."""
        return sample / _col((self._sigma(positions) ** 2 + 1) ** 0.5, sample)

    def step(self, model_output: torch.Tensor, positions: Sequence[int], sample: torch.Tensor,
             generators: Sequence[torch.Generator] = ()) -> torch.Tensor:
        """One Euler (or Euler-ancestral) step per sample; ``generators``: one per sample (ancestral only)."""
        from diffusers.utils.torch_utils import randn_tensor

        sigma, sigma_next = self._sigma(positions), self._sigma(positions, 1)
        if not self.ancestral:
            sigma = sigma * (0.0 + 1)  # sigma_hat with no churn, as the scheduler computes it
        sample = sample.to(torch.float32)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            pred_original = sample - _col(sigma, model_output) * model_output
        elif kind == "v_prediction":
            pred_original = (model_output * _col(-sigma / (sigma**2 + 1) ** 0.5, model_output)
                             + (sample / _col(sigma**2 + 1, sample)))
        elif kind in ("sample", "original_sample"):
            pred_original = model_output
        else:
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {kind!r}")
        derivative = (sample - pred_original) / _col(sigma, sample)
        if not self.ancestral:
            return (sample + derivative * _col(sigma_next - sigma, sample)).to(model_output.dtype)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        prev = sample + derivative * _col(sigma_down - sigma, sample)
        shape = (1, *model_output.shape[1:])
        device, dtype = model_output.device, model_output.dtype
        noise = torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])
        return (prev + noise * _col(sigma_up, noise)).to(model_output.dtype)


_STEPS = {"DDIMScheduler": DDIMStep, "EulerDiscreteScheduler": EulerStep, "EulerAncestralDiscreteScheduler": EulerStep}


def _encode_texts(pipe, texts: list[str], device) -> torch.Tensor:
    """Text-encoder states of each distinct text, ``(len(texts), L, D)``, as the pipeline encodes them."""
    states, _ = pipe.encode_prompt(texts, device, 1, False)
    return states


def _start_latents(pipe, pixels: Callable[[list[int]], torch.Tensor], members: list[int], generators: list[torch.Generator],
                   step, positions: list[int], device, dtype) -> torch.Tensor:
    """VAE-encode ``members``'s images (one batch) and noise them to their start; the pipeline's
    ``prepare_latents``, with one generator per sample drawn in the same order (posterior, then noise)."""
    from diffusers.utils.torch_utils import randn_tensor

    image = pipe.image_processor.preprocess(pixels(members)).to(device=device, dtype=dtype)
    dist = pipe.vae.encode(image).latent_dist
    shape = (1, *dist.mean.shape[1:])
    posterior = torch.cat([randn_tensor(shape, generator=g, device=dist.parameters.device, dtype=dist.parameters.dtype)
                           for g in generators])
    clean = pipe.vae.config.scaling_factor * (dist.mean + dist.std * posterior)
    noise = torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])
    return step.add_noise(clean, noise, positions)


@torch.no_grad()
def denoise(
    pipe,
    pixels: Callable[[list[int]], torch.Tensor],
    prompts: Sequence[str],
    negatives: Sequence[str | None],
    strengths: Sequence[float],
    seeds: Sequence[int],
    *,
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int,
    fixed_shape: bool = False,
) -> torch.Tensor:
    """Run img2img for every sample with continuous batching; return the final latents ``(N, C, h, w)``.

    Args:
        pipe: a pipeline :func:`loop_unsupported` accepts.
        pixels: ``members -> (len(members), 3, S, S)`` float images in [0, 1] (called once per VAE batch,
            so a large call never holds every image as floats at once).
        prompts: one prompt per sample.
        negatives: one negative prompt per sample (``None``: the empty prompt, as the pipeline does).
        strengths: one strength per sample, each in (0, 1] with at least one step (checked by the caller).
        seeds: one CPU generator seed per sample.
        guidance_scale: classifier-free guidance scale (guidance runs when > 1, as in the pipeline).
        num_inference_steps: scheduler steps at strength 1.
        batch_size: most samples per UNet call (the UNet sees twice as many with guidance) and per VAE batch.
        fixed_shape: pad every UNet call to ``min(batch_size, N)`` samples (copies of the last one, whose
            outputs are dropped), so a compiled UNet sees one shape; on by default for compiled UNets
            (see :func:`dafusion_aug.functional.diffuse`).

    Returns:
        The denoised latents on the pipeline's device, in input order; decode them with :func:`decode`.

    Raises:
        ValueError: the pipeline cannot run this loop (see :func:`loop_unsupported`).
    """
    reason = loop_unsupported(pipe)
    if reason is not None:
        raise ValueError(f"the denoising loop cannot run this pipeline: {reason}")
    n = len(prompts)
    device = pipe._execution_device
    step = _STEPS[type(pipe.scheduler).__name__](pipe.scheduler, num_inference_steps)
    guided = guidance_scale > 1.0
    texts = {t: i for i, t in enumerate(sorted(set(prompts)))}  # a class's prompt is encoded once, not per image
    cond = _encode_texts(pipe, list(texts), device)
    cond_of = torch.as_tensor([texts[p] for p in prompts])
    dtype = cond.dtype
    if guided:
        neg_texts = {t: i for i, t in enumerate(sorted({x or "" for x in negatives}))}
        uncond = _encode_texts(pipe, list(neg_texts), device)
        uncond_of = torch.as_tensor([neg_texts[x or ""] for x in negatives])
    start = [step.start(float(s)) for s in strengths]
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = torch.cat([
        _start_latents(pipe, pixels, list(range(a, min(a + batch_size, n))), generators[a : a + batch_size], step,
                       start[a : a + batch_size], device, dtype)
        for a in range(0, n, batch_size)
    ])
    position = list(start)
    queue = deque(sorted(range(n), key=lambda i: (start[i], i)))  # longest first: short ones fill the tail
    active: list[int] = []
    width = min(batch_size, n)
    while queue or active:
        while queue and len(active) < batch_size:
            active.append(queue.popleft())
        rows = active + active[-1:] * (width - len(active)) if fixed_shape else active
        idx = torch.as_tensor(rows)
        where = [position[i] for i in rows]
        sample = latents[idx]
        t = step.timesteps(where).to(device)
        model_in = step.scale(sample, where)
        if guided:
            states = torch.cat([uncond[uncond_of[idx]], cond[cond_of[idx]]])
            model_in, t = torch.cat([model_in, model_in]), torch.cat([t, t])
        else:
            states = cond[cond_of[idx]]
        out = pipe.unet(model_in, t, encoder_hidden_states=states, return_dict=False)[0]
        if guided:
            out_uncond, out_text = out.chunk(2)
            out = out_uncond + guidance_scale * (out_text - out_uncond)
        k = len(active)  # padded rows, if any, come last and are dropped
        latents[idx[:k]] = step.step(out[:k], where[:k], sample[:k], [generators[i] for i in active])
        for i in active:
            position[i] += 1
        active = [i for i in active if position[i] < step.num_steps]
    return latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1], ``(B, 3, H, W)``, as the pipeline's ``output_type="pt"``."""
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")
