"""Offline test helpers: a tiny, random Stable-Diffusion-layout img2img pipeline built from configs.

Use it in your own tests the way diffusers' tests use ``get_dummy_components()``, but with no network:
the tokenizer is a small BPE vocabulary built on the spot.

Example:
    >>> from dafusion_aug.testing import tiny_pipeline
    >>> pipe = tiny_pipeline(seed=0)
    >>> pipe.unet.config.sample_size * pipe.vae_scale_factor
    32
"""

from __future__ import annotations

import functools

import torch

__all__ = ["tiny_pipeline", "tiny_components", "TINY_CORPUS"]

#: Sentences the tiny tokenizer's merges are learned from.
TINY_CORPUS = (
    "a photo of a cat",
    "a photo of a dog",
    "a photo of a zebra",
    "a photo of a handwritten digit",
    "a rendering of a",
    "a picture of the",
    "zero one two three four five six seven eight nine",
)


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> tuple[dict, str]:
    from ._bpe import _vocab_and_merges

    return _vocab_and_merges(TINY_CORPUS, 60)


def _tiny_tokenizer():
    import json
    import os
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = _tokenizer_files()
    with tempfile.TemporaryDirectory() as tmp:
        vf, mf = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vf, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(mf, "w", encoding="utf-8") as f:
            f.write(merges)
        return CLIPTokenizer(vf, mf, model_max_length=77, pad_token="<|endoftext|>")


def tiny_components(seed: int = 0) -> dict:
    """The components of :func:`tiny_pipeline`, as keyword arguments for the pipeline class."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=32,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def tiny_pipeline(seed: int = 0):
    """A random tiny ``StableDiffusionImg2ImgPipeline`` (32x32 images, 4x8x8 latents), built offline.

    The weights are random (seeded), so the images it makes are noise; it exists to test code paths fast.

    Args:
        seed: seeds the weight initialisation; the global torch RNG is left untouched.

    Returns:
        A ``StableDiffusionImg2ImgPipeline`` on the CPU in float32 with its progress bar disabled.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_components(seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
