"""Steps per second of ``fit_tokens`` vs the reference recipe: one textual-inversion run per class.

The reference does what the diffusers example (and DA-Fusion, which ran it once per class) does at every
step: encode the batch's images through the VAE and sample the latent, tokenize the prompts, run the text
encoder with the whole embedding matrix in AdamW, then copy the original rows back. Its image tensors are
prepared once per class (the example re-decodes and resizes every step; leaving that out favours it).
Both sides see the same model, the same images, batch size and total number of samples; each class gets
``steps // num_classes`` reference steps. Times include each side's setup (data, VAE encoding, copies).

Usage:
    python benchmarks/bench_fit.py --model tiny --steps 120
    python benchmarks/bench_fit.py --model pocket --steps 60
    python benchmarks/bench_fit.py --model sd15-arch --resolution 256 --batch-size 1 --classes 2 --steps 2 --repeats 1
    python benchmarks/bench_fit.py --model sdxl-arch --resolution 256 --batch-size 1 --classes 2 --per-class 1 --steps 4 --repeats 1

With ``--lora-rank R`` the comparison is instead ``fit_tokens(lora_rank=R)`` (tokens and a class LoRA, issue 32)
against token-only ``fit_tokens`` on the same run, alternating, and the LoRA's file size:

    python benchmarks/bench_fit.py --model sd15-arch --resolution 256 --batch-size 1 --classes 2 --steps 4 --repeats 2 --lora-rank 10

For SDXL (``sdxl-arch``: SDXL base's architecture with random weights, ``testing.full_size_pipeline``) the
reference trains both text encoders' whole embedding matrices per class and conditions the UNet as the
SDXL pipeline does (both encoders' penultimate states, encoder 2's pooled embedding, size ``time_ids``).
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dafusion_aug import fit_tokens
from dafusion_aug.fit import IMAGENET_TEMPLATES
from dafusion_aug.functional import native_resolution, to_batch
from dafusion_aug.tokens import token_for_class


def _data(model: str, classes: int, per_class: int):
    if model in ("pocket", "pocket-arch"):
        from dafusion_aug.pocket import CLASS_NAMES, digits

        ds = digits("B")
        items, seen = [], {}
        for i in range(len(ds)):
            image, label = ds[i]
            if label < classes and seen.get(label, 0) < per_class:
                items.append((image, int(label)))
                seen[label] = seen.get(label, 0) + 1
        return items, list(CLASS_NAMES[:classes])
    rng = np.random.default_rng(0)
    items = []
    for k in range(classes):
        for _ in range(per_class):
            a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            items.append((Image.fromarray(a), k))
    return items, [f"class {k}" for k in range(classes)]


def _sd15_arch():
    """Stable Diffusion 1.5's architecture (UNet 860M, VAE 84M, CLIP-L text encoder 123M) with random weights."""
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dafusion_aug.testing import tiny_components

    parts = tiny_components(0)
    tok = parts["tokenizer"]  # any CLIP tokenizer will do: only the speed is measured
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    parts["vae"] = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).eval()
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    parts["text_encoder"] = CLIPTextModel(config).eval()
    pipe = StableDiffusionImg2ImgPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline(model: str):
    if model == "pocket":
        from dafusion_aug import PipelineSpec

        return PipelineSpec("pocket", device="cpu").load()
    if model == "pocket-arch":
        from diffusers import StableDiffusionImg2ImgPipeline

        from dafusion_aug.pocket import arch

        torch.manual_seed(0)
        tok = arch.build_tokenizer()
        te = arch.build_text_encoder(tok)
        pipe = StableDiffusionImg2ImgPipeline(
            vae=arch.build_vae().eval(),
            text_encoder=te.eval(),
            tokenizer=tok,
            unet=arch.build_unet(te.config.hidden_size).eval(),
            scheduler=arch.build_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return pipe
    if model == "sd15-arch":
        return _sd15_arch()
    if model == "sdxl-arch":
        from dafusion_aug.testing import full_size_pipeline

        return full_size_pipeline("sdxl")
    from dafusion_aug.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


def reference_per_class(pipe, items, names, steps: int, batch_size: int, lr: float, size: int, seed: int = 0) -> list[tuple[float, float]]:
    """The per-class recipe; returns the (wall, CPU) clock after each step, starting with the clocks at the start."""
    from diffusers import DDPMScheduler

    clocks = [_clock()]
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    per = [steps // len(names) + (1 if k < steps % len(names) else 0) for k in range(len(names))]
    pairs = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if getattr(pipe, "text_encoder_2", None) is not None else [])
    for k, name in enumerate(names):
        token = token_for_class(name, k)
        encoders, embs, origs, keeps = [], [], [], []
        for tok_name, enc_name in pairs:
            tokenizer = copy.deepcopy(getattr(pipe, tok_name))
            text_encoder = copy.deepcopy(getattr(pipe, enc_name))
            tokenizer.add_tokens([token])
            token_id = tokenizer.convert_tokens_to_ids(token)
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            emb = text_encoder.get_input_embeddings().weight
            init_ids = tokenizer.encode(name, add_special_tokens=False)
            with torch.no_grad():
                emb[token_id] = emb[init_ids].mean(0)
            keep = torch.ones(len(tokenizer), dtype=torch.bool)
            keep[token_id] = False
            text_encoder.requires_grad_(False)
            emb.requires_grad_(True)
            encoders.append((tokenizer, text_encoder))
            embs.append(emb)
            origs.append(emb.detach().clone())
            keeps.append(keep)
        opt = torch.optim.AdamW(embs, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        pixels = to_batch([np.asarray(im.convert("RGB")) for im, y in items if y == k], size) * 2 - 1
        for _ in range(per[k]):
            x = pixels[torch.randint(len(pixels), (batch_size,), generator=g)]
            latents = pipe.vae.encode(x).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(sched.config.num_train_timesteps, (batch_size,), generator=g)
            prompts = [rnd.choice(IMAGENET_TEMPLATES).format(token) for _ in range(batch_size)]
            hidden, added = _condition(encoders, prompts, size)
            pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for emb, orig, keep in zip(embs, origs, keeps):
                    emb[keep] = orig[keep]
            clocks.append(_clock())
    return clocks


def _condition(encoders, prompts: list[str], size: int):
    """The UNet's text conditioning: one encoder's last states, or SDXL's (both encoders' penultimate states,
    encoder 2's pooled embedding, size time_ids), as the pipelines encode prompts."""
    ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
           for tok, _ in encoders]
    if len(encoders) == 1:
        return encoders[0][1](ids[0])[0], None
    outs = [enc(x, output_hidden_states=True) for (_, enc), x in zip(encoders, ids)]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), dtype=torch.float32)
    return torch.cat([o.hidden_states[-2] for o in outs], dim=-1), {"text_embeds": outs[-1][0], "time_ids": time_ids}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _summary(clocks: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """(total wall, total CPU, median wall per step, median CPU per step); the first step also holds the setup."""
    walls = [b[0] - a[0] for a, b in zip(clocks[1:], clocks[2:])]
    cpus = [b[1] - a[1] for a, b in zip(clocks[1:], clocks[2:])]
    return clocks[-1][0] - clocks[0][0], clocks[-1][1] - clocks[0][1], float(np.median(walls)), float(np.median(cpus))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "pocket", "pocket-arch", "sd15-arch", "sdxl-arch"], default="tiny")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's native size)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--project", type=int, default=1000, help="steps of the run to extrapolate end-to-end time to")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best time counts")
    ap.add_argument("--lora-rank", type=int, default=0, help="compare fit_tokens(lora_rank=R) with token-only fit_tokens instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = _pipeline(args.model)
    items, names = _data(args.model, args.classes, args.per_class)
    size = args.resolution or native_resolution(pipe)
    print(f"model={args.model} classes={len(names)} images={len(items)} steps={args.steps} batch={args.batch_size} size={size} threads={args.threads}")
    if args.lora_rank:
        return compare_lora(pipe, items, names, args, size)
    ours, ref = [], []
    for _ in range(args.repeats):
        clocks = [_clock()]
        fit_tokens(
            pipe, items, names, steps=args.steps, batch_size=args.batch_size, learning_rate=5e-3, resolution=size,
            progress=False, _on_step=lambda step, loss, clocks=clocks: clocks.append(_clock()),
        )
        ours.append(_summary(clocks))
        ref.append(_summary(reference_per_class(pipe, items, names, args.steps, args.batch_size, 5e-3, size)))
        print(
            f"  fit_tokens {ours[-1][0]:.2f} s wall ({ours[-1][1]:.2f} s CPU), step {ours[-1][2] * 1e3:.1f} ms   "
            f"reference {ref[-1][0]:.2f} s wall ({ref[-1][1]:.2f} s CPU), step {ref[-1][2] * 1e3:.1f} ms"
        )
    for i, what in ((0, "end to end, wall"), (1, "end to end, CPU"), (2, "per step, wall"), (3, "per step, CPU")):
        a, b = min(o[i] for o in ours), min(r[i] for r in ref)
        if i < 2:
            a, b = a / args.steps, b / args.steps
        print(f"{what:>18}: fit_tokens {1 / a:8.3g} steps/s   reference per-class loop {1 / b:8.3g} steps/s   ratio {b / a:.2f}x")
    # One-time costs (data, VAE encoding, per-class copies) weigh less in a real run: extrapolate to --project.
    best_o, best_r = min(ours, key=lambda o: o[0]), min(ref, key=lambda r: r[0])
    setup_o, setup_r = best_o[0] - args.steps * best_o[2], best_r[0] - args.steps * best_r[2]
    total_o, total_r = setup_o + args.project * best_o[2], setup_r + args.project * best_r[2]
    print(
        f"projected to {args.project} steps (wall): fit_tokens {total_o:.1f} s (setup {setup_o:.1f} s), "
        f"reference {total_r:.1f} s (setup {setup_r:.1f} s), ratio {total_r / total_o:.2f}x"
    )


def compare_lora(pipe, items, names, args, size: int) -> None:
    """Per-step CPU time of fit_tokens with a rank-R LoRA vs token-only (the same run otherwise), and the file size."""
    import tempfile
    from pathlib import Path

    runs: dict[int, list] = {0: [], args.lora_rank: []}
    lora = None
    for _ in range(args.repeats):
        for rank in runs:
            clocks = [_clock()]
            out = fit_tokens(pipe, items, names, steps=args.steps, batch_size=args.batch_size, learning_rate=5e-3, resolution=size,
                             progress=False, lora_rank=rank, _on_step=lambda step, loss, clocks=clocks: clocks.append(_clock()))
            runs[rank].append(_summary(clocks))
            lora = out.lora or lora
            print(f"  lora_rank={rank}: step {runs[rank][-1][3] * 1e3:.0f} ms CPU, {runs[rank][-1][2] * 1e3:.0f} ms wall")
    base, with_lora = (min(r[3] for r in runs[k]) for k in runs)
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = lora.save(Path(tmp) / "lora.safetensors").stat().st_size
    print(f"per step, CPU: tokens only {base * 1e3:.0f} ms, tokens + LoRA rank {args.lora_rank} {with_lora * 1e3:.0f} ms: "
          f"ratio {with_lora / base:.2f}x (mark <= 1.5x)")
    print(f"LoRA: {lora.num_parameters:,} parameters in {len(lora.layers)} layers, file {nbytes / 1e6:.2f} MB (mark <= 10 MB)")


if __name__ == "__main__":
    main()
