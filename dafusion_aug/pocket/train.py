"""Rebuild the pocket model and its judge from scratch: ``python -m dafusion_aug.pocket.train``.

Stages (all seeded, CPU, part A of :func:`dafusion_aug.pocket.digits` only):

1. the judge CNN (``judge.safetensors``);
2. the VAE (L1 + MSE reconstruction, a small KL term), then its latent scaling factor;
3. the UNet and the text encoder together: DDPM noise-prediction MSE with SD's betas, random captions
   from :mod:`dafusion_aug.pocket.arch` (10% empty for classifier-free guidance; half of the others name
   attributes measured on the augmented picture itself, :mod:`dafusion_aug.pocket.attributes`), EMA
   weights;
4. ``StableDiffusionImg2ImgPipeline.save_pretrained(OUT/model)`` (UNet and VAE in float16, the small
   text encoder in float32, so a plain ``from_pretrained`` loads everything in float32).

Example:
    python -m dafusion_aug.pocket.train                  # writes into the package (about an hour on 2 cores)
    python -m dafusion_aug.pocket.train --out /tmp/pocket --quick   # a smoke run (about 15 s)

On a CPU shared with other processes, run it with ``OMP_WAIT_POLICY=PASSIVE`` (or ``--threads 1``):
OpenMP's default busy-waiting made the two training threads several times slower under contention.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import arch, attributes
from .bank import scene_bank
from .data import digits, random_affine
from .judge import judge_accuracy, save_judge, train_judge
from .scenes import scenes

__all__ = [
    "TrainConfig",
    "train_vae",
    "encode_latents",
    "encode_bank",
    "glyph_weights",
    "train_diffusion",
    "save_pipeline",
    "write_vocab_files",
    "run",
    "main",
]

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    """Hyper-parameters of the whole rebuild (the defaults made the shipped weights).

    ``world="scenes"`` trains pocket v3 on :func:`~dafusion_aug.pocket.bank.scene_bank` (``latent_copies``
    pictures per part-A digit, ``grey_copies`` of them grey-world ones) instead of v2's grey digits with
    affine copies and attribute captions. ``glyph_weight`` (scenes only) weights the noise-prediction error
    of the latent cells that touch the glyph ``1 + glyph_weight`` times (see :func:`glyph_weights`).
    """

    seed: int = 0
    judge_steps: int = 300
    vae_steps: int = 300
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    latent_copies: int = 16
    unet_steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    threads: int = 2
    world: str = "digits"
    grey_copies: int = 3
    glyph_weight: float = 0.0

    @classmethod
    def quick(cls) -> TrainConfig:
        """A few-steps configuration for smoke tests (the result makes noise, not digits)."""
        return cls(
            judge_steps=5,
            vae_steps=5,
            vae_batch_size=16,
            latent_copies=2,
            grey_copies=1,
            unet_steps=5,
            batch_size=16,
            warmup_steps=1,
        )


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor`` times the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_vae(images: torch.Tensor, cfg: TrainConfig, progress: bool = True, affine: bool = True):
    """Train the pocket ``AutoencoderKL`` on augmented part-A images.

    Args:
        images: float ``(N, 3, 32, 32)`` in [0, 1].
        cfg: the hyper-parameters (``vae_*``, ``seed``).
        progress: show a tqdm bar.
        affine: augment every batch with the mild random affine (its black borders suit grey digits only;
            a scene bank brings its own variety).

    Returns:
        The trained VAE in eval mode (its ``scaling_factor`` is still the default; see :func:`encode_latents`).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae = arch.build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine(s, cfg.vae_steps, max(1, cfg.vae_steps // 20))
    )
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress, mininterval=10.0)
    for _ in bar:
        idx = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=gen)
        x = (random_affine(images[idx], gen) if affine else images[idx]) * 2.0 - 1.0
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
    return vae.eval()


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode (posterior mean) and decode images in [0, 1]; returns images in [0, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size] * 2.0 - 1.0
        out.append(vae.decode(vae.encode(x).latent_dist.mean).sample)
    return (torch.cat(out) / 2.0 + 0.5).clamp(0.0, 1.0)


@torch.no_grad()
def encode_latents(
    vae, images: torch.Tensor, copies: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, np.ndarray]]:
    """Encode ``copies`` augmented versions of every image (the first one unaugmented) and set the scale.

    The attributes of every augmented version are measured on its pixels (a rotation changes the slant),
    so each latent's captions describe that latent.

    The VAE's ``scaling_factor`` is set to ``1 / std`` of sampled latents, as SD's 0.18215 was chosen.

    Args:
        vae: the trained VAE (eval mode); its config is updated in place.
        images: float ``(N, 3, 32, 32)`` in [0, 1].
        copies: versions per image.
        seed: seeds the augmentation and the posterior samples.

    Returns:
        ``(means, stds, scaling_factor, levels)``: posterior means and standard deviations
        ``(N * copies, 4, 8, 8)``, unscaled, and every latent's attribute levels ``{name: (N * copies,)}``.
    """
    gen = torch.Generator().manual_seed(seed + 2)
    means, stds, measured = [], [], []
    for c in range(copies):
        batch = images if c == 0 else random_affine(images, gen)
        measured.append(attributes.levels(attributes.measure(batch)))
        for i in range(0, len(batch), 256):
            dist = vae.encode(batch[i : i + 256] * 2.0 - 1.0).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    samples = mean + std * torch.randn(mean.shape, generator=gen)
    scaling = float(1.0 / samples.std())
    vae.register_to_config(scaling_factor=scaling)
    levels = {name: np.concatenate([m[name] for m in measured]) for name in attributes.ATTRIBUTES}
    return mean, std, scaling, levels


@torch.no_grad()
def encode_bank(vae, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode every picture once (a scene bank holds its copies already) and set the scaling factor.

    Returns:
        ``(means, stds, scaling_factor)``, as :func:`encode_latents` gives them.
    """
    gen = torch.Generator().manual_seed(seed + 2)
    means, stds = [], []
    for i in range(0, len(images), 256):
        dist = vae.encode(images[i : i + 256] * 2.0 - 1.0).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scaling)
    return mean, std, scaling


def glyph_weights(alphas: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-latent-cell loss weights: ``1 + weight`` on the 8x8 cells whose 4x4 pixels touch the glyph.

    A scene's background covers most of its latent, and a plain noise-prediction loss spends the
    UNet's few steps on it; the glyph, the class, is a quarter of the cells. Weighting them is the
    masked loss of subject-driven fine-tuning, with the renderer's opacity as the mask.

    Args:
        alphas: glyph opacity, ``(N, 1, 32, 32)`` in [0, 1].
        weight: the extra weight (0: every cell weighs 1).

    Returns:
        ``(N, 1, 8, 8)`` float weights.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < math.inf:
        raise ValueError(f"glyph_weight must be a finite number >= 0, got {weight!r}")
    touched = (nn.functional.max_pool2d(alphas.float(), 4) > 0.25).float()
    return 1.0 + float(weight) * touched


def train_diffusion(
    means: torch.Tensor,
    stds: torch.Tensor,
    labels: torch.Tensor,
    scaling: float,
    tokenizer,
    cfg: TrainConfig,
    progress: bool = True,
    levels: dict[str, np.ndarray] | None = None,
    captions: Callable[[int, random.Random], str] | None = None,
    weights: torch.Tensor | None = None,
):
    """Train the UNet and the text encoder jointly with DDPM noise prediction (SD's betas).

    Args:
        means, stds: posterior statistics of the training latents (unscaled), ``(M, 4, 8, 8)``.
        labels: the digit of each latent, ``(M,)``.
        scaling: the VAE's scaling factor.
        tokenizer: the pocket tokenizer.
        cfg: the hyper-parameters (``unet_steps``, ``batch_size``, ``lr``, ``warmup_steps``, ``ema_decay``).
        progress: show a tqdm bar.
        levels: every latent's attribute levels (``{name: (M,)}``) for the attribute captions; None
            trains on digit-only captions.
        captions: ``captions(i, rng)`` draws latent i's caption instead (pocket v3's scene captions).
        weights: per-latent-cell loss weights ``(M, 1, 8, 8)`` (:func:`glyph_weights`); the loss is the
            weighted mean of the squared error. None: the plain mean.

    Returns:
        ``(unet, text_encoder, losses)``: the EMA copies of both models in eval mode, and the mean loss of
        every block of 100 steps.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    rng = random.Random(cfg.seed + 3)
    unet = arch.build_unet().train()
    text_encoder = arch.build_text_encoder(tokenizer).train()
    noise_sched = DDPMScheduler(
        **{k: v for k, v in arch.scheduler_kwargs().items() if k != "set_alpha_to_one"}
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.unet_steps, cfg.warmup_steps))
    losses: list[float] = []
    window: list[float] = []
    bar = tqdm(range(cfg.unet_steps), desc="unet+text", disable=not progress, mininterval=10.0)
    for step in bar:
        idx = torch.randint(0, len(means), (cfg.batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        texts = [
            captions(int(i), rng) if captions is not None else
            arch.sample_caption(int(labels[i]), rng, None if levels is None else {k: int(v[i]) for k, v in levels.items()})
            for i in idx
        ]
        unique = sorted(set(texts))  # encode each distinct caption once, then gather
        where = torch.tensor([unique.index(c) for c in texts])
        hidden = text_encoder(arch.caption_ids(unique, tokenizer))[0][where]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        if weights is None:
            loss = nn.functional.mse_loss(pred, noise)
        else:
            w = weights[idx]
            loss = ((pred - noise).pow(2) * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p.detach(), 1.0 - decay)
        window.append(loss.item())
        if len(window) == 100 or step == cfg.unet_steps - 1:
            losses.append(sum(window) / len(window))
            window = []
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema_unet, ema_text, losses


def save_pipeline(vae, unet, text_encoder, tokenizer, folder: str | Path, world: str = "digits") -> Path:
    """Save the pocket model as a ``StableDiffusionImg2ImgPipeline`` folder.

    The UNet and VAE weights are stored in float16 (half the size); the text encoder stays float32 so
    that transformers' automatic dtype loads it in float32, like diffusers does for the others.

    Args:
        vae, unet, text_encoder, tokenizer: the trained components.
        folder: the output folder (replaced files, others kept).
        world: the world the tokenizer was built for (:data:`arch.WORLDS`).

    Returns:
        The folder.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    # nn.Module.to: a plain cast (diffusers' own .to warns about modules to keep in float32; none here).
    pipe = StableDiffusionImg2ImgPipeline(
        vae=nn.Module.to(copy.deepcopy(vae), torch.float16),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=nn.Module.to(copy.deepcopy(unet), torch.float16),
        scheduler=arch.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_vocab_files(tokenizer, folder / "tokenizer", world)
    return folder


def write_vocab_files(tokenizer, folder: str | Path, world: str = "digits") -> None:
    """Add ``vocab.json`` and ``merges.txt`` next to ``tokenizer.json`` (older transformers need them).

    Args:
        tokenizer: the pocket tokenizer that was saved (built by :func:`arch.build_tokenizer`).
        folder: the saved tokenizer folder.
        world: the world it was built for.

    Raises:
        ValueError: when ``tokenizer`` is not the pocket tokenizer (its vocabulary differs).
    """
    rebuilt = arch.build_tokenizer(save_to=folder, world=world)
    if rebuilt.get_vocab() != tokenizer.get_vocab():
        raise ValueError("the tokenizer differs from the pocket tokenizer; cannot write its vocab files")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(cfg: TrainConfig, out: Path, progress: bool = True) -> dict[str, object]:
    """Run every stage and write ``OUT/judge.safetensors``, ``OUT/model/`` and ``OUT/training.json``.

    Args:
        cfg: the hyper-parameters.
        out: the output folder.
        progress: show tqdm bars.

    Returns:
        The report written to ``training.json`` (timings, parameter counts, losses, checks).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, progress)
    finally:  # the caller's thread count is the caller's (a test run in-process must not change the next test's sums)
        torch.set_num_threads(previous)


def _run(cfg: TrainConfig, out: Path, progress: bool) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "pocket_version": 3 if arch._check_world(cfg.world) == "scenes" else 2,
        "config": asdict(cfg),
        "torch": torch.__version__,
        "timings_s": {},
    }
    timings: dict[str, float] = report["timings_s"]  # type: ignore[assignment]
    start = time.perf_counter()
    bank = scene_bank(cfg.latent_copies, cfg.grey_copies, cfg.seed) if cfg.world == "scenes" else None
    xa, ya = digits("A").tensors() if bank is None else (bank.images, bank.labels)
    xb, yb = (digits("B") if bank is None else scenes("B")).tensors()
    if bank is not None:
        report["bank"] = {"pictures": len(bank), "grey_share": round(bank.grey_share(), 4)}

    t0 = time.perf_counter()
    net = train_judge(xa, ya, steps=cfg.judge_steps, seed=cfg.seed, progress=progress)
    timings["judge"] = time.perf_counter() - t0
    report["judge_accuracy_part_b"] = judge_accuracy(net, xb, yb)
    if bank is not None:  # the v3 judge reads both worlds
        report["judge_accuracy_grey_part_b"] = judge_accuracy(net, *digits("B").tensors())
    save_judge(
        net,
        out / "judge.safetensors",
        {"trained_on": "pocket digits part A", "steps": cfg.judge_steps, "seed": cfg.seed},
    )
    print(
        f"[judge] {timings['judge']:.0f}s, accuracy on part B {report['judge_accuracy_part_b']:.4f}",
        flush=True,
    )

    t0 = time.perf_counter()
    vae = train_vae(xa, cfg, progress=progress, affine=bank is None)
    timings["vae"] = time.perf_counter() - t0
    recon_b = reconstruct(vae, xb)
    report["vae_mse_part_b"] = float((recon_b - xb).pow(2).mean())
    report["judge_accuracy_vae_recon_part_b"] = judge_accuracy(net, recon_b, yb)
    print(
        f"[vae] {timings['vae']:.0f}s, part B reconstruction MSE {report['vae_mse_part_b']:.5f}, "
        f"judged correctly {report['judge_accuracy_vae_recon_part_b']:.4f}",
        flush=True,
    )

    t0 = time.perf_counter()
    if bank is None:
        means, stds, scaling, levels = encode_latents(vae, xa, cfg.latent_copies, cfg.seed)
        labels = ya.repeat(cfg.latent_copies)
    else:  # the bank's pictures are the copies already; their captions come from their scenes
        means, stds, scaling = encode_bank(vae, xa, cfg.seed)
        labels, levels = ya, None
    timings["encode"] = time.perf_counter() - t0
    report["vae_scaling_factor"] = scaling
    print(
        f"[latents] {len(means)} latents in {timings['encode']:.0f}s, scaling factor {scaling:.4f}",
        flush=True,
    )

    t0 = time.perf_counter()
    tokenizer = arch.build_tokenizer(world=cfg.world)
    unet, text_encoder, losses = train_diffusion(
        means, stds, labels, scaling, tokenizer, cfg, progress=progress, levels=levels,
        captions=None if bank is None else bank.caption,
        weights=None if bank is None or not cfg.glyph_weight else glyph_weights(bank.alphas, cfg.glyph_weight),
    )
    timings["unet_text"] = time.perf_counter() - t0
    report["diffusion_loss_per_100_steps"] = [round(v, 5) for v in losses]
    print(f"[unet+text] {timings['unet_text']:.0f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)

    folder = save_pipeline(vae, unet, text_encoder, tokenizer, out / "model", world=cfg.world)
    timings["total"] = time.perf_counter() - start
    report["parameters"] = {
        "vae": _count(vae),
        "unet": _count(unet),
        "text_encoder": _count(text_encoder),
        "judge": _count(net),
    }
    report["vocab_size"] = len(tokenizer)
    report["weights_bytes"] = (
        sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        + (out / "judge.safetensors").stat().st_size
    )
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"[done] {timings['total'] / 60:.1f} min in all; weights {report['weights_bytes'] / 1e6:.2f} MB in {out}",
        flush=True,
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see ``--help``."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m dafusion_aug.pocket.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=PACKAGE_DIR, help="output folder (default: the package folder)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of each stage (smoke test; makes noise)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--judge-steps", type=int, default=None)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--glyph-weight", type=float, default=None,
                        help="scenes: extra loss weight of the latent cells that touch the glyph (default 0)")
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--world", choices=arch.WORLDS, default=defaults.world,
                        help="digits: pocket v2's grey digits (the shipped model); scenes: pocket v3's scene world")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    args = parser.parse_args(argv)
    cfg = TrainConfig.quick() if args.quick else TrainConfig()
    cfg.seed, cfg.threads, cfg.world = args.seed, args.threads, args.world
    for name in ("judge_steps", "vae_steps", "unet_steps", "batch_size", "lr", "glyph_weight"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    run(cfg, args.out, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
