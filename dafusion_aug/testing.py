"""Offline test helpers: a tiny, random Stable-Diffusion-layout img2img pipeline built from configs, and
:func:`check_transform`, the contract check every transform test runs.

Use the pipeline in your own tests the way diffusers' tests use ``get_dummy_components()``, but with no
network: the tokenizer is a small BPE vocabulary built on the spot. Use :func:`check_transform` the way
torchvision's tests use theirs, on your own transforms that hold a ``DiffusionAugment``.

Example:
    >>> from dafusion_aug.testing import tiny_pipeline
    >>> pipe = tiny_pipeline(seed=0)
    >>> pipe.unet.config.sample_size * pipe.vae_scale_factor
    32
"""

from __future__ import annotations

import copy
import functools
import pickle
from typing import Any

import torch

__all__ = ["tiny_pipeline", "tiny_components", "check_transform", "TINY_CORPUS"]

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


def check_transform(transform: Any, image: Any, label: Any = 1) -> Any:
    """Check the torchvision v2 sample contract of a transform, as torchvision's tests do.

    The transform is called on a tuple ``(image, label, junk)``, a list ``[image, label, junk]`` and a dict
    ``{"image", "label", "meta": {"junk", "name"}}``: the image comes back as the same type, the label and
    every other leaf as the very same objects, and the structure is rebuilt. Then the transform must be
    picklable (what DataLoader workers started with ``spawn`` receive), and a copy rebuilt from its pickled
    state must have the same :meth:`fingerprint` when it has one (so the copy reads the same cache entries).

    Args:
        transform: the transform to check (called with samples like the ones above).
        image: a picture it accepts (PIL image, tensor, ``tv_tensors.Image``).
        label: the sample's label.

    Returns:
        The transformed dict sample.

    Raises:
        AssertionError: a part of the contract does not hold.

    Example:
        >>> check_transform(DiffusionAugment(tiny_pipeline(), class_names=["a", "b"]), image)  # doctest: +SKIP
    """
    junk = object()
    out = transform(image, label, junk)
    assert isinstance(out, tuple) and len(out) == 3, f"a tuple sample must come back as a 3-tuple, got {type(out).__name__}"
    assert out[1] is label and out[2] is junk, "non-image leaves of a tuple sample must come back as the same objects"
    assert type(out[0]) is type(image), f"the image came back as {type(out[0]).__name__}, not {type(image).__name__}"
    out = transform([image, label, junk])
    assert isinstance(out, list) and out[1] is label and out[2] is junk, "a list sample must keep its other leaves"
    assert type(out[0]) is type(image), f"the image of a list sample came back as {type(out[0]).__name__}"
    sample = {"image": image, "label": label, "meta": {"junk": junk, "name": "x"}}
    out = transform(sample)
    assert out["label"] is label and out["meta"]["junk"] is junk and out["meta"]["name"] == "x", "dict leaves must be kept"
    assert type(out["image"]) is type(image), f"the image of a dict sample came back as {type(out['image']).__name__}"
    pickle.dumps(transform)  # picklable: no lambdas, loaded pipelines or open files in its state
    # the package never calls pickle.loads (test_package.py::test_no_pickle_loads); deepcopy rebuilds the copy
    # from the same __getstate__ / __reduce_ex__ state that a spawned worker unpickles
    again = copy.deepcopy(transform)
    if hasattr(transform, "fingerprint"):
        assert again.fingerprint() == transform.fingerprint(), "a pickled copy must have the same fingerprint"
    return out
