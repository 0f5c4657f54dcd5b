"""The pocket model's architecture: component builders, the tokenizer corpus and the captions.

Everything here is Stable Diffusion's layout at toy scale: an ``AutoencoderKL`` (32x32x3 images to
8x8x4 latents), a ``UNet2DConditionModel`` with cross-attention (so ``attn2`` layers exist for ESD), a
2-layer ``CLIPTextModel`` of width 64, a byte-level CLIP BPE ``CLIPTokenizer`` and SD's DDIM scheduler.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

from .data import CLASS_NAMES

__all__ = [
    "CLASS_TEMPLATES",
    "AGNOSTIC_CAPTIONS",
    "EVAL_TEMPLATE",
    "tokenizer_corpus",
    "build_tokenizer",
    "build_vae",
    "build_unet",
    "build_text_encoder",
    "build_scheduler",
    "scheduler_kwargs",
    "sample_caption",
    "all_captions",
]

#: Caption templates that name the digit; ``{}`` is the digit's word ("seven").
CLASS_TEMPLATES: tuple[str, ...] = (
    "a photo of a handwritten digit {}",
    "a handwritten digit {}",
    "a photo of a {}",
    "a {}",
    "{}",
    "the number {}",
    "a photo of the number {}",
    "a picture of a {}",
    "a drawing of the digit {}",
    "an image of a handwritten {}",
    "a scan of the digit {}",
    "a white {} on a black background",
)

#: Captions that do not name the digit (class-agnostic prompts still mean "some digit").
AGNOSTIC_CAPTIONS: tuple[str, ...] = (
    "a photo of a handwritten digit",
    "a handwritten digit",
    "a photo of a number",
    "a digit",
)

#: The prompt used by the evaluation and the docs.
EVAL_TEMPLATE = "a photo of a handwritten digit {}"

#: Probability of the empty caption during training (classifier-free guidance).
P_EMPTY = 0.1

#: Probability of a class-agnostic caption during training.
P_AGNOSTIC = 0.05

# Extra words so common prompt words are single tokens too (textual inversion adds its own tokens).
_EXTRA_WORDS = (
    "a an the of on in with and photo picture image drawing rendering scan sketch close up cropped "
    "bright dark small large good clean weird white black grey background handwritten digit number "
    "numeral written pen ink style"
)


def tokenizer_corpus() -> list[str]:
    """Return the sentences the pocket tokenizer's BPE merges are learned from."""
    corpus = [t.format(word) for t in CLASS_TEMPLATES for word in CLASS_NAMES]
    corpus += list(AGNOSTIC_CAPTIONS)
    corpus.append(_EXTRA_WORDS)
    return corpus


def build_tokenizer(save_to: str | os.PathLike | None = None):
    """Build the pocket ``CLIPTokenizer`` (every corpus word becomes one token; others fall back to characters).

    Args:
        save_to: optional folder to write ``vocab.json`` and ``merges.txt`` into.

    Returns:
        A ``transformers.CLIPTokenizer`` with ``model_max_length`` 77.
    """
    from .._bpe import build_clip_tokenizer

    return build_clip_tokenizer(tokenizer_corpus(), num_merges=1000, model_max_length=77, save_to=save_to)


def build_vae():
    """Return a fresh ``AutoencoderKL``: blocks 32-64-64, 4 latent channels, 32x32 -> 8x8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def build_unet(cross_attention_dim: int = 64):
    """Return a fresh ``UNet2DConditionModel`` on 4x8x8 latents.

    Blocks 64-128 with one resnet each; cross-attention in the 4x4 down block, the mid block and the
    first up block (8 heads of 8 channels at width 64, 16 heads at 128).

    Args:
        cross_attention_dim: width of the text encoder's hidden states.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_text_encoder(tokenizer, hidden_size: int = 64, num_layers: int = 2):
    """Return a fresh ``CLIPTextModel`` sized for ``tokenizer``.

    Args:
        tokenizer: the pocket tokenizer (its size, BOS, EOS and pad ids are used).
        hidden_size: the width (also the UNet's cross-attention width).
        num_layers: transformer layers.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=num_layers,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def scheduler_kwargs() -> dict[str, object]:
    """Stable Diffusion's noise schedule (shared by the DDIM sampler and the DDPM training loss)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def build_scheduler():
    """Return SD's ``DDIMScheduler`` (scaled_linear betas 0.00085..0.012, no clipping, offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_kwargs())


def all_captions() -> list[str]:
    """Every caption the training can draw, class captions first (index ``t * 10 + label``), then the rest."""
    captions = [t.format(word) for t in CLASS_TEMPLATES for word in CLASS_NAMES]
    return captions + list(AGNOSTIC_CAPTIONS) + [""]


def sample_caption(label: int, rng: random.Random) -> str:
    """Draw a training caption for ``label``: empty with P_EMPTY, class-agnostic with P_AGNOSTIC, else named.

    Args:
        label: the digit.
        rng: the random source.

    Returns:
        The caption.
    """
    u = rng.random()
    if u < P_EMPTY:
        return ""
    if u < P_EMPTY + P_AGNOSTIC:
        return rng.choice(AGNOSTIC_CAPTIONS)
    return rng.choice(CLASS_TEMPLATES).format(CLASS_NAMES[label])


def caption_ids(captions: Iterable[str], tokenizer):
    """Tokenize captions the way the SD pipelines do (padded to ``model_max_length``, truncated).

    Args:
        captions: the texts.
        tokenizer: the pocket tokenizer.

    Returns:
        ``LongTensor (N, model_max_length)``.
    """
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
