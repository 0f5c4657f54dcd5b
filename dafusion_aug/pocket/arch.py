"""The pocket model's architecture: component builders, the tokenizer corpus and the captions.

Everything here is Stable Diffusion's layout at toy scale: an ``AutoencoderKL`` (32x32x3 images to
8x8x4 latents), a ``UNet2DConditionModel`` with cross-attention at both resolutions (so ``attn2`` layers
exist for ESD), a 4-layer ``CLIPTextModel`` of width 128 over 32 positions, a byte-level CLIP BPE
``CLIPTokenizer`` and SD's DDIM scheduler.

Captions (v2) describe what is visible: besides the class name they carry attribute words measured on
the picture itself (:mod:`dafusion_aug.pocket.attributes`, e.g. "a bold right-leaning handwritten digit
seven with a loop"), and some captions name attributes only, so that the model knows words shared by all
digits, as Stable Diffusion knows thousands of visual words beside its class names.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

from . import attributes, scenes
from .data import CLASS_NAMES

__all__ = [
    "CLASS_TEMPLATES",
    "AGNOSTIC_CAPTIONS",
    "EVAL_TEMPLATE",
    "WORLDS",
    "tokenizer_corpus",
    "build_tokenizer",
    "build_vae",
    "build_unet",
    "build_text_encoder",
    "build_scheduler",
    "scheduler_kwargs",
    "sample_caption",
    "attribute_caption",
    "all_captions",
    "MAX_LENGTH",
    "TEXT_WIDTH",
    "TEXT_LAYERS",
]

#: Tokens the text encoder reads (SD: 77); every pocket caption fits in 20.
MAX_LENGTH = 32
#: Width of the text encoder, and so the UNet's cross-attention width (SD 1.5: 768).
TEXT_WIDTH = 128
#: Transformer layers of the text encoder (SD 1.5: 12).
TEXT_LAYERS = 4

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

#: Probability of a caption that names the digit and some of its attributes.
P_CLASS_ATTRIBUTES = 0.3

#: Probability of a caption that names attributes only (no digit).
P_ATTRIBUTES_ONLY = 0.2

#: Templates of attribute captions: ``{adj}`` is the adjectives with their article ("a bold right-leaning"),
#: ``{name}`` the digit's word, ``{suffix}`` the loop phrase (" with a loop") or nothing.
ATTRIBUTE_CLASS_TEMPLATES: tuple[str, ...] = (
    "a photo of {adj} handwritten digit {name}{suffix}",
    "{adj} handwritten digit {name}{suffix}",
    "{adj} {name}{suffix}",
    "a photo of {adj} {name}{suffix}",
)
ATTRIBUTE_ONLY_TEMPLATES: tuple[str, ...] = (
    "a photo of {adj} handwritten digit{suffix}",
    "{adj} handwritten digit{suffix}",
    "{adj} digit{suffix}",
    "a photo of {adj} number{suffix}",
)

# Extra words so common prompt words are single tokens too (textual inversion adds its own tokens).
_EXTRA_WORDS = (
    "a an the of on in with and photo picture image drawing rendering scan sketch close up cropped "
    "bright dark small large good clean weird white black grey background handwritten digit number "
    "numeral written pen ink style"
)


#: The worlds a pocket model is trained on: v2's grey digits, v3's scenes (:mod:`dafusion_aug.pocket.scenes`).
WORLDS = ("digits", "scenes")


def _check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"world must be one of {list(WORLDS)}, got {world!r}")
    return world


def tokenizer_corpus(world: str = "digits") -> list[str]:
    """Return the sentences the pocket tokenizer's BPE merges are learned from (``world="scenes"``: v2's and
    every word of the v3 captions)."""
    corpus = [t.format(word) for t in CLASS_TEMPLATES for word in CLASS_NAMES]
    corpus += list(AGNOSTIC_CAPTIONS)
    corpus.append(_EXTRA_WORDS)
    corpus += [" ".join(attributes.attribute_words())] * 20  # every attribute word becomes one token
    if _check_world(world) == "scenes":
        corpus += [t.format(word) for t in scenes.CLASS_ONLY for word in CLASS_NAMES] + list(scenes.AGNOSTIC)
        corpus += [" ".join(scenes.vocabulary())] * 20
    return corpus


def build_tokenizer(save_to: str | os.PathLike | None = None, world: str = "digits"):
    """Build the pocket ``CLIPTokenizer`` (every corpus word becomes one token; others fall back to characters).

    Args:
        save_to: optional folder to write ``vocab.json`` and ``merges.txt`` into.
        world: ``"digits"`` (v2) or ``"scenes"`` (v3: the scene words too).

    Returns:
        A ``transformers.CLIPTokenizer`` with ``model_max_length`` :data:`MAX_LENGTH`.
    """
    from .._bpe import build_clip_tokenizer

    return build_clip_tokenizer(tokenizer_corpus(world), num_merges=1000, model_max_length=MAX_LENGTH, save_to=save_to)


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


def build_unet(cross_attention_dim: int = TEXT_WIDTH):
    """Return a fresh ``UNet2DConditionModel`` on 4x8x8 latents.

    Blocks 64-128 with one resnet each; cross-attention in every down and up block (8x8 and 4x4) and the
    mid block, as SD has it at three of its four resolutions (8 heads of 8 channels at width 64, 16 heads
    at 128).

    Args:
        cross_attention_dim: width of the text encoder's hidden states.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_text_encoder(tokenizer, hidden_size: int = TEXT_WIDTH, num_layers: int = TEXT_LAYERS):
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


def attribute_caption(
    level: dict[str, int], label: int | None, rng: random.Random, keep: float = 0.5
) -> str:
    """Write a caption that names some of a picture's attributes, with or without its digit.

    Each attribute that has a word at its level is named with probability ``keep``; at least one is.

    Args:
        level: the picture's attribute levels (:func:`dafusion_aug.pocket.attributes.levels`).
        label: the digit to name, or None for an attribute-only caption.
        rng: the random source.
        keep: the probability of naming each attribute.

    Returns:
        The caption, e.g. "a photo of a thin upright handwritten digit four with a loop".
    """
    adjectives, suffix = attributes.describe(level, rng, keep)
    if not adjectives and not suffix:
        adjectives, suffix = attributes.describe(level, rng, keep=1.0)
        named = adjectives + ([suffix] if suffix else [])
        pick = rng.choice(named) if named else ""
        adjectives, suffix = ([], pick) if pick.startswith("with") else ([pick] if pick else [], "")
    words = " ".join(adjectives)
    article = "an" if words[:1] in tuple("aeiou") else "a"
    adj = f"{article} {words}" if words else "a"
    suffix = f" {suffix}" if suffix else ""
    if label is None:
        return rng.choice(ATTRIBUTE_ONLY_TEMPLATES).format(adj=adj, suffix=suffix)
    return rng.choice(ATTRIBUTE_CLASS_TEMPLATES).format(adj=adj, name=CLASS_NAMES[label], suffix=suffix)


def sample_caption(label: int, rng: random.Random, level: dict[str, int] | None = None) -> str:
    """Draw a training caption for a picture of ``label`` with attribute levels ``level``.

    Empty with P_EMPTY, class-agnostic with P_AGNOSTIC, digit and attributes with P_CLASS_ATTRIBUTES,
    attributes only with P_ATTRIBUTES_ONLY, else one of :data:`CLASS_TEMPLATES` (the digit only). Without
    ``level`` the attribute captions are replaced by digit-only ones.

    Args:
        label: the digit.
        rng: the random source.
        level: the picture's attribute levels, or None.

    Returns:
        The caption.
    """
    u = rng.random()
    if u < P_EMPTY:
        return ""
    if u < P_EMPTY + P_AGNOSTIC:
        return rng.choice(AGNOSTIC_CAPTIONS)
    if level is not None:
        if u < P_EMPTY + P_AGNOSTIC + P_CLASS_ATTRIBUTES:
            return attribute_caption(level, label, rng)
        if u < P_EMPTY + P_AGNOSTIC + P_CLASS_ATTRIBUTES + P_ATTRIBUTES_ONLY:
            return attribute_caption(level, None, rng)
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
