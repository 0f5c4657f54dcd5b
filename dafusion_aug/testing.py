"""Offline test helpers: tiny, random img2img pipelines of each model family (SD 1.x, 2.x, SDXL) built from configs, and
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
import os
import pickle
from typing import Any

import torch

__all__ = ["tiny_pipeline", "tiny_components", "tiny_clip", "full_size_unet", "full_size_pipeline", "check_transform",
           "TINY_CORPUS"]

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


_FAMILIES = ("sd1", "sd2", "sdxl")


def _tiny_text_encoder(tokenizer, *, hidden_act: str = "quick_gelu", projection: bool = False):
    """A 2-layer CLIP text encoder of width 32 (``projection``: with the pooled projection, SDXL's encoder 2)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
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
        hidden_act=hidden_act,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_unet(family: str):
    """The UNet of each family's tiny pipeline, with that family's traits (see :func:`tiny_components`)."""
    from diffusers import UNet2DConditionModel

    common = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    if family == "sd1":
        return UNet2DConditionModel(sample_size=8, cross_attention_dim=32, attention_head_dim=8, **common)
    if family == "sd2":  # linear projections and per-block head counts, as SD 2.x's UNet
        return UNet2DConditionModel(sample_size=12, cross_attention_dim=32, attention_head_dim=(2, 4),
                                    use_linear_projection=True, **common)
    # SDXL: text_time added conditioning (pooled embedding of encoder 2 + six size/crop numbers), 2 encoders
    return UNet2DConditionModel(sample_size=16, cross_attention_dim=64, attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                                transformer_layers_per_block=(1, 2), **common)


def _tiny_scheduler(family: str):
    """Each family's real scheduler (DDIM for 1.x, DDIM with v-prediction for 2.x, Euler for SDXL), tiny or not."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if family == "sdxl":
        return EulerDiscreteScheduler(timestep_spacing="leading", **betas)
    extra = {"prediction_type": "v_prediction"} if family == "sd2" else {}
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **betas, **extra)


def tiny_components(seed: int = 0, family: str = "sd1") -> dict:
    """The components of :func:`tiny_pipeline`, as keyword arguments for the family's pipeline class."""
    from diffusers import AutoencoderKL

    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {_FAMILIES}, got {family!r}")
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(family)
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
            **({"scaling_factor": 0.13025, "force_upcast": True} if family == "sdxl" else {}),
        )
        text_encoder = _tiny_text_encoder(tokenizer, hidden_act="quick_gelu" if family == "sd1" else "gelu")
        text_encoder_2 = _tiny_text_encoder(tokenizer, hidden_act="gelu", projection=True) if family == "sdxl" else None
    models = [unet, vae, text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    for model in models:
        model.eval()
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                  "scheduler": _tiny_scheduler(family)}
    if family == "sdxl":
        return {**components, "text_encoder_2": text_encoder_2, "tokenizer_2": _tiny_tokenizer()}
    return {**components, "safety_checker": None, "feature_extractor": None}


def tiny_pipeline(seed: int = 0, family: str = "sd1"):
    """A random tiny img2img pipeline of a model family, built offline from configs.

    ``"sd1"`` (default): a ``StableDiffusionImg2ImgPipeline``, 32x32 images, 4x8x8 latents, DDIM.
    ``"sd2"``: the same class with SD 2.x's traits: linear-projection transformers, a GELU text encoder, DDIM
    with v-prediction; 48x48 images. ``"sdxl"``: a ``StableDiffusionXLImg2ImgPipeline`` with two text
    encoders (the second with a pooled projection), ``text_time`` added conditioning, SDXL's VAE scaling
    and Euler scheduler; 64x64 images. Save one with ``pipe.save_pretrained(folder)`` and load it by path
    like any model folder.

    The weights are random (seeded), so the images it makes are noise; it exists to test code paths fast.

    Args:
        seed: seeds the weight initialisation; the global torch RNG is left untouched.
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.

    Returns:
        The pipeline, on the CPU in float32 with its progress bar disabled.
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    components = tiny_components(seed, family)
    if family == "sdxl":
        pipe = StableDiffusionXLImg2ImgPipeline(**components, add_watermarker=False)
    else:
        pipe = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_text(tokenizer, hidden: int, layers: int, heads: int, act: str, projection: int, with_projection: bool = False):
    """A full-size CLIP text encoder (49,408-row embedding), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads,
                            num_hidden_layers=layers, hidden_act=act, projection_dim=projection, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def full_size_unet(family: str):
    """The UNet of ``stabilityai/stable-diffusion-2-1`` (``"sd2"``, 866M parameters) or of
    ``stabilityai/stable-diffusion-xl-base-1.0`` (``"sdxl"``, 2.57B), from their configs, with random weights
    (build it under ``torch.device("meta")`` to count parameters without memory)."""
    from diffusers import UNet2DConditionModel

    if family == "sd2":
        return UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    if family == "sdxl":
        return UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    raise ValueError(f"family must be 'sd2' or 'sdxl', got {family!r}")


def full_size_pipeline(family: str = "sdxl", seed: int = 0):
    """A pipeline with a real model's architecture and random weights, for speed and memory benchmarks.

    ``"sd2"``: Stable Diffusion 2.1 (UNet 866M with linear projections, OpenCLIP ViT-H text encoder of 23
    layers, DDIM with v-prediction, 768 px); ``"sdxl"``: SDXL base 1.0 (UNet 2.6B with ``text_time``
    conditioning, CLIP ViT-L and OpenCLIP ViT-bigG text encoders, Euler, 1024 px). The configs are those of
    ``stabilityai/stable-diffusion-2-1`` and ``stabilityai/stable-diffusion-xl-base-1.0``; the tokenizers are the
    tiny pipeline's (only speed and memory are measured, so the vocabulary does not matter). Random weights
    do not change the cost; SDXL takes about 14 GB in float32.

    Args:
        family: ``"sd2"`` or ``"sdxl"``.
        seed: seeds the weight initialisation; the global torch RNG is left untouched.

    Returns:
        The img2img pipeline on the CPU in float32.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    if family not in ("sd2", "sdxl"):
        raise ValueError(f"family must be 'sd2' or 'sdxl', got {family!r}")
    tokenizer = _tiny_tokenizer()
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            **({"scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024} if family == "sdxl" else {"sample_size": 768})).eval()
        if family == "sd2":
            unet = full_size_unet("sd2").eval()
            pipe = StableDiffusionImg2ImgPipeline(
                unet=unet, vae=vae, text_encoder=_clip_text(tokenizer, 1024, 23, 16, "gelu", 512), tokenizer=tokenizer,
                scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction", **betas),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            unet = full_size_unet("sdxl").eval()
            pipe = StableDiffusionXLImg2ImgPipeline(
                unet=unet, vae=vae, text_encoder=_clip_text(tokenizer, 768, 12, 12, "quick_gelu", 768), tokenizer=tokenizer,
                text_encoder_2=_clip_text(tokenizer, 1280, 32, 20, "gelu", 1280, with_projection=True), tokenizer_2=_tiny_tokenizer(),
                scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **betas), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip(folder: str | os.PathLike, seed: int = 0) -> str:
    """Save a random tiny ``CLIPModel`` and its processor (32 px images, the tiny BPE tokenizer) into ``folder``,
    built offline from configs: a local model for :class:`~dafusion_aug.CLIPFilter` in tests.

    Returns:
        The folder, as a str.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return os.fspath(folder)


def _pictures(image: Any) -> tuple[int, tuple[int, ...], int, int]:
    """``(picture count, leading batch dims, height, width)`` of a PIL image or a ``(..., C, H, W)`` tensor."""
    if isinstance(image, torch.Tensor):
        lead = tuple(image.shape[:-3])
        return int(torch.Size(lead).numel()), lead, int(image.shape[-2]), int(image.shape[-1])
    return 1, (), image.height, image.width


def _samples(image: Any, label: Any, needs_class: bool) -> dict[str, Any]:
    """The sample structures :func:`check_transform` runs, by name (see there)."""
    import pathlib

    import numpy as np
    from PIL import Image
    from torchvision import tv_tensors

    count, lead, h, w = _pictures(image)
    mask = tv_tensors.Mask(torch.zeros(*lead, h, w, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0, 0, w, h], [0, 0, max(1, w // 2), max(1, h // 2)]]),
                                     format="XYXY", canvas_size=(h, w))
    junk = {"int": 0, "float": 0.5, "bool": True, "none": None, "str": "str", "path": pathlib.Path("x.png"),
            "object": object(), "tensor": torch.arange(5), "array": np.arange(5)}
    # torchvision's big sample: the image under test next to unbatched images, a video, masks, boxes, junk
    big = {"input": image, "image_pil": Image.new("RGB", (w, h), (90, 30, 200)),
           "image_tv_tensor": tv_tensors.Image(torch.full((3, h, w), 77, dtype=torch.uint8)),
           "video_tv_tensor": tv_tensors.Video(torch.rand(2, 3, h, w)), "mask": mask, "boxes": boxes, **junk}
    samples: dict[str, Any] = {
        "tuple": (image, label, junk["object"]),
        "list": [image, label, junk["object"]],
        "dict": {"image": image, "label": label, "meta": {"junk": junk["object"], "name": "x"}},
        "segmentation tuple (image, Mask, label)": (image, mask, label),
        "segmentation dict": {"image": image, "mask": mask, "label": label},
    }
    if count == 1 or type(image) is not torch.Tensor:  # next to images, a plain tensor is no image: its labels fit none
        samples["torchvision sample with a label"] = {**big, "label": label}
    if count == 1:
        one = torch.tensor([label]) if isinstance(label, int) and not isinstance(label, bool) else [label]
        samples["detection (image, target) with one object"] = (image, {"boxes": boxes[:1], "labels": one})
    if needs_class:
        return samples
    samples.update({"bare image": image, "segmentation (image, Mask)": (image, mask), "torchvision sample": big,
                    # torchvision's smoke test also passes its big sample as a list and a tuple (item [1] no label)
                    "torchvision sample as a list": list(big.values()), "torchvision sample as a tuple": tuple(big.values())})
    if count == 1:
        several = torch.tensor([label, label]) if isinstance(label, int) and not isinstance(label, bool) else [label, label]
        samples["detection (image, target) with several objects"] = (image, {"boxes": boxes, "labels": several})
        samples["detection dict with several objects"] = {"image": image, "boxes": boxes, "labels": several}
    return samples


def _image_leaves(flat: list[Any]) -> list[int]:
    """torchvision's rule, stated independently of the package: PIL images and ``tv_tensors.Image`` leaves,
    or else the first plain tensor of three or more dimensions."""
    from PIL import Image
    from torchvision import tv_tensors

    idx = [i for i, x in enumerate(flat) if isinstance(x, (Image.Image, tv_tensors.Image))]
    if idx:
        return idx
    return next(([i] for i, x in enumerate(flat) if type(x) is torch.Tensor and x.ndim >= 3), [])


def _check_image(before: Any, after: Any, where: str) -> None:
    """An image leaf keeps its type, mode, size, shape, dtype, device and value range."""
    assert type(after) is type(before), f"{where}: the image came back as {type(after).__name__}, not {type(before).__name__}"
    if isinstance(before, torch.Tensor):
        assert after.shape == before.shape, f"{where}: shape {tuple(after.shape)} is not {tuple(before.shape)}"
        assert after.dtype == before.dtype and after.device == before.device, f"{where}: dtype or device changed"
        if before.is_floating_point() and before.numel() and 0 <= float(before.min()) and float(before.max()) <= 1:
            assert 0 <= float(after.min()) and float(after.max()) <= 1, f"{where}: values left [0, 1]"
    else:
        assert (after.mode, after.size) == (before.mode, before.size), f"{where}: {after.mode} {after.size} is not {before.mode} {before.size}"


def _check_sample(sample: Any, out: Any, where: str) -> list[Any]:
    """``out`` has ``sample``'s structure, its images keep their kind, every other leaf is the same object.

    Returns:
        The output's image leaves.
    """
    from torch.utils._pytree import tree_flatten

    flat, spec = tree_flatten(sample)
    flat_out, spec_out = tree_flatten(out)
    assert spec_out == spec, f"{where}: the sample came back as {spec_out}, not {spec}"
    images = _image_leaves(flat)
    for i, (a, b) in enumerate(zip(flat, flat_out)):
        if i in images:
            _check_image(a, b, where)
        else:
            assert b is a, f"{where}: leaf {i} ({type(a).__name__}) came back as another object, not itself: {b!r}"[:300]
    return [flat_out[i] for i in images]


def _same_pictures(a: list[Any], b: list[Any]) -> bool:
    import numpy as np

    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(a, b))


def check_transform(transform: Any, image: Any, label: Any = 1, *, needs_class: bool = True) -> dict[str, Any]:
    """Check the torchvision v2 sample contract of a transform, as torchvision's own ``check_transform`` does.

    The transform is called on every sample structure torchvision's tests and datasets use: a tuple
    ``(image, label, junk)``, a list, a dict with a nested dict, segmentation samples ``(image, Mask,
    label)`` and ``{"image", "mask", "label"}``, a detection pair ``(image, {"boxes", "labels"})`` with one
    object (for an unbatched image), and torchvision's big sample (the image next to a PIL image, an
    unbatched ``tv_tensors.Image``, a ``Video``, a ``Mask``, ``BoundingBoxes`` and junk: ints, floats, bools,
    ``None``, a str, a path, an object, a 1-D tensor and array). With ``needs_class=False`` (a transform
    whose prompt needs no class) also a bare image, ``(image, Mask)``, detection targets with several
    object labels and torchvision's sample without a label, as a dict, a list and a tuple. For each: the structure is rebuilt, every image
    keeps its type, mode, size, shape, dtype, device and [0, 1] range, and every other leaf comes back as the
    very same object. Then the transform must pickle (what spawned DataLoader workers receive), and a copy
    rebuilt from its pickled state must give identical outputs for the same torch seed and, when it has
    one, the same ``fingerprint()`` (so the copy reads the same cache entries).

    Args:
        transform: the transform to check.
        image: a picture it accepts (PIL image, ``(C, H, W)`` or batched ``(..., C, H, W)`` tensor,
            ``tv_tensors.Image``).
        label: the sample's label (``B`` labels for a batch of ``B`` pictures).
        needs_class: ``False`` adds the samples without a label or with several labels per image.

    Returns:
        The output of every sample, by structure name.

    Raises:
        AssertionError: a part of the contract does not hold (the message names the structure).

    Example:
        >>> check_transform(DiffusionAugment(tiny_pipeline(), class_names=["a", "b"]), image)  # doctest: +SKIP
        >>> check_transform(DiffusionAugment(tiny_pipeline(), prompt="a photo"), image, needs_class=False)  # doctest: +SKIP
    """
    pickle.dumps(transform)  # picklable: no lambdas, loaded pipelines or open files in its state
    # the package never calls pickle.loads (test_package.py::test_no_pickle_loads); deepcopy rebuilds the copy
    # from the same __getstate__ / __reduce_ex__ state that a spawned worker unpickles
    again = copy.deepcopy(transform)
    if hasattr(transform, "fingerprint"):
        assert again.fingerprint() == transform.fingerprint(), "a pickled copy must have the same fingerprint"
    outputs = {}
    for name, sample in _samples(image, label, needs_class).items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outputs[name] = transform(sample)
            torch.manual_seed(0)
            copied = again(sample)
        images = _check_sample(sample, outputs[name], name)
        assert _same_pictures(images, _check_sample(sample, copied, f"{name} (copied transform)")), \
            f"{name}: a pickled copy of the transform gave other pixels for the same seed"
    return outputs
