"""Can a digit erased from the pocket model still be drawn by *some* text conditioning? An upper bound for tokens.

Textual inversion can only change the text encoder's *input* at the token's positions. This probe skips the
text encoder: it takes the encoder output of "a photo of a the", frees every position from ``--first``
on (5 = the token's position and everything after it, the positions a token can influence through the
causal text encoder), and fits those output vectors directly on the denoising loss of the digit's
``--shots`` part-B images (the images ``eval_tokens.py`` uses), with the digit's ESD erasure applied. Then
``--samples`` txt2img samples from the fitted conditioning (guidance 7.5, 50 DDIM steps, the seeds of
``eval_tokens.py``) are read by the pocket judge. With the defaults this bounds what any token can do;
``--last`` (free only ``[first, last)``) and ``--through-final-norm`` restrict the conditioning further
and are no longer bounds (a token also moves the later positions).

A high rate means the erased model's cross-attention can still express the digit, so a low token rate
is a limit of reaching it through the text encoder, not of the sampler, the judge or the images.

Usage:
    python benchmarks/probe_erased.py --digits 6 0            # ~2 min per digit on one CPU thread
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval_erasure  # noqa: E402
from eval_tokens import ddim_sampler, img2img_pipeline, judged_rate  # noqa: E402

from dafusion_aug import PipelineSpec, few_shot_indices  # noqa: E402
from dafusion_aug.pocket import CLASS_NAMES, digits, judge  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", type=int, nargs="+", default=[6])
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--first", type=int, default=5, help="first free output position (0 = the whole sequence)")
    ap.add_argument("--last", type=int, default=None, help="free positions end before this one (default: all to the end)")
    ap.add_argument("--through-final-norm", action="store_true",
                    help="free the vectors *before* the encoder's final LayerNorm, so the conditioning keeps the norm "
                         "statistics every text-encoder output has")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--erasure-work", default="runs/eval_erasure")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    folder = str(PipelineSpec("pocket").local_path())
    judge_net = judge()
    data = digits("B")
    items = [data[i] for i in few_shot_indices(data.targets, a.shots, a.seed, num_classes=10)]
    erasure_args = eval_erasure.parse_args(["--work", a.erasure_work])
    # one pipeline for every digit: an erasure changes UNet tensors only, in place, and is restored after its block
    pipe = img2img_pipeline(folder)
    tok, te, unet, vae, sched = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler
    for m in (unet, te, vae):
        m.requires_grad_(False)
    sampler = ddim_sampler(pipe)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        ids = tok(["a photo of a the", ""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        enc = te(ids, output_hidden_states=True)
        base, empty = enc.last_hidden_state.chunk(2)
        pre = enc.hidden_states[-1][:1]  # the last layer's output, before final_layer_norm
    last = base.shape[1] if a.last is None else a.last
    norm = getattr(te, "text_model", te).final_layer_norm if a.through_final_norm else torch.nn.Identity()
    for d in a.digits:
        erasure, _, _ = eval_erasure.erasure_for(d, erasure_args)
        with torch.no_grad():
            x = torch.stack([
                torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32)).permute(2, 0, 1)
                for im, y in items if y == d
            ]) / 127.5 - 1
            dist = vae.encode(x).latent_dist
        free = torch.nn.Parameter((pre if a.through_final_norm else base)[:, a.first:last].clone())
        opt = torch.optim.Adam([free], lr=a.lr)
        gen = torch.Generator().manual_seed(a.seed)
        t0, losses = time.perf_counter(), []
        with erasure.applied(pipe):
            for _ in range(a.steps):
                sel = torch.randint(len(x), (a.batch_size,), generator=gen)
                eps = torch.randn(dist.mean[sel].shape, generator=gen)
                latents = (dist.mean[sel] + dist.std[sel] * eps) * vae.config.scaling_factor
                noise = torch.randn(latents.shape, generator=gen)
                t = torch.randint(sched.config.num_train_timesteps, (a.batch_size,), generator=gen)
                cond = torch.cat([base[:, : a.first], norm(free), base[:, last:]], 1).expand(a.batch_size, -1, -1)
                pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
                loss = F.mse_loss(pred, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            fitted = torch.cat([base[:, : a.first], norm(free).detach(), base[:, last:]], 1)
            drift = float((fitted - base).norm() / base.norm())
            kw = dict(prompt_embeds=fitted.expand(a.samples, -1, -1), negative_prompt_embeds=empty.expand(a.samples, -1, -1))
            rate, _ = judged_rate(sampler, None, d, a.samples, a.seed, judge_net, pipe_kwargs=kw)
        where = f"positions {a.first}-{last - 1}" + (" before the final norm" if a.through_final_norm else "")
        print(f"[erased {d} ({CLASS_NAMES[d]})] encoder output {where} fitted: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}, "
              f"drift {drift:.2f} of its norm, {time.perf_counter() - t0:.0f}s; judge reads {d} in {rate:.0%} of {a.samples}",
              flush=True)


if __name__ == "__main__":
    main()
