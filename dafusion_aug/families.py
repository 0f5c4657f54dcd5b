"""Model families: which Stable Diffusion a model folder or a loaded pipeline is, read from its configs.

dafusion-aug runs three families, each through diffusers' own img2img pipeline:

- ``"sd1"``: Stable Diffusion 1.x (one CLIP text encoder, epsilon prediction, 512 px);
- ``"sd2"``: Stable Diffusion 2.x (one OpenCLIP text encoder, linear-projection transformers, v-prediction
  for the 768 px models);
- ``"sdxl"``: SDXL base (two text encoders, pooled embeddings, size and crop conditioning, 1024 px).

A folder's family comes from its ``model_index.json`` (and, to tell 2.x from 1.x, its ``unet/config.json``),
read before any weight is loaded (an inpainting checkpoint of a family is that family, for masked edits), so
anything else (SD3, FLUX, Kandinsky, an upscaling folder, the SDXL refiner) is refused with a message naming the families supported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .errors import PipelineError

__all__ = ["FAMILIES", "SUPPORTED", "family_from_index", "family_of", "img2img_class", "requires_family"]

#: Family names, in the order they came.
FAMILIES = ("sd1", "sd2", "sdxl")
#: The families, in words, for error messages.
SUPPORTED = "Stable Diffusion 1.x, Stable Diffusion 2.x and SDXL base (family 'sd1', 'sd2' or 'sdxl')"

# inpainting checkpoints are of their family too: loaded as img2img, their 9-channel UNet runs the masked
# edits of ``region="object" | "background"`` (issue 18); unmasked samples are refused by ``diffuse``
_SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
_SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
_SDXL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
_SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def img2img_class(family: str) -> str:
    """The diffusers img2img pipeline class (by name) that runs ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return "StableDiffusionXLImg2ImgPipeline" if family == "sdxl" else "StableDiffusionImg2ImgPipeline"


def _present(index: Mapping[str, Any], part: str) -> bool:
    """Whether ``model_index.json`` names a component for ``part`` (``[null, null]`` and absence do not)."""
    value = index.get(part)
    return isinstance(value, (list, tuple)) and len(value) == 2 and value[1] is not None


def family_from_index(index: Mapping[str, Any], unet_config: Callable[[], Mapping[str, Any] | None], where: str) -> str:
    """The family of a model from its ``model_index.json``, checked before any weight is loaded.

    Args:
        index: the parsed ``model_index.json``.
        unet_config: returns the parsed ``unet/config.json`` (``None`` when unreadable); called only to tell
            SD 2.x from 1.x.
        where: the model, in words (``"folder '/m'"``, ``"Hub id 'a/b'"``), for messages.

    Returns:
        ``"sd1"``, ``"sd2"`` or ``"sdxl"``.

    Raises:
        PipelineError: another pipeline class (SD3, FLUX, Kandinsky, upscaling, ...), the SDXL refiner, or
            a folder missing a component its family needs (such as SDXL's ``text_encoder_2``).
    """
    name = index.get("_class_name")
    if name in _SDXL_CLASSES:
        if not _present(index, "text_encoder") and _present(index, "text_encoder_2"):
            raise PipelineError(f"model {where} is an SDXL refiner (no text_encoder, model_index.json _class_name {name!r}); "
                                f"the refiner is not supported: dafusion-aug runs {SUPPORTED}")
        parts = _SDXL_PARTS
    elif name in _SD_CLASSES:
        parts = _SD_PARTS
    else:
        raise PipelineError(f"model {where} is a {name!r} (model_index.json _class_name), which dafusion-aug cannot run: "
                            f"it runs {SUPPORTED} through diffusers' img2img pipelines")
    missing = [p for p in parts if not _present(index, p)]
    if missing:
        family = "SDXL" if name in _SDXL_CLASSES else "Stable Diffusion"
        raise PipelineError(f"model {where} is a {family} model ({name!r}) but its model_index.json has no {missing}; "
                            f"a {family} img2img pipeline needs {list(parts)}")
    if name in _SDXL_CLASSES:
        return "sdxl"
    return "sd2" if _is_sd2_unet(unet_config() or {}) else "sd1"


def _is_sd2_unet(config: Mapping[str, Any]) -> bool:
    """SD 2.x's UNet uses linear projections in its transformers (1.x uses 1x1 convolutions) and, at full
    size, 1024-wide cross-attention (OpenCLIP ViT-H; 1.x: 768)."""
    return bool(config.get("use_linear_projection")) or config.get("cross_attention_dim") == 1024


def family_of(pipe: Any) -> str:
    """The family of a loaded pipeline: ``"sdxl"`` when it has a second text encoder, else 2.x or 1.x by its UNet."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    config = getattr(unet, "config", None)
    return "sd2" if config is not None and _is_sd2_unet(dict(config)) else "sd1"


def requires_family(got: str | None, want: str, what: str, error: type[Exception] = PipelineError) -> None:
    """Refuse ``what`` (a token file, an erasure, ...) made for family ``got`` on a pipeline of family ``want``.

    ``got=None`` is a file written before families were recorded: SD 1.x (the only family then).

    Raises:
        ``error`` (default :class:`PipelineError`): the families differ.
    """
    got = got or "sd1"
    if got != want:
        raise error(f"{what}: made for family {got!r}, but the pipeline is family {want!r}; "
                            "token files and erasures work only on the family (and model) they were trained on")
