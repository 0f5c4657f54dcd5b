"""dafusion-aug: generative data augmentation with diffusion models (DA-Fusion).

The public names are imported on first use (PEP 562), so ``import dafusion_aug`` and ``dafusion-aug --help``
do not pay for torch, torchvision and diffusers; ``from dafusion_aug import DiffusionAugment`` imports what
that name needs.

Example:
    >>> from dafusion_aug import DiffusionAugment
    >>> aug = DiffusionAugment("pocket", tokens="tokens.safetensors", cache="cache/")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: Each public name and the module that defines it.
_WHERE = {
    "AugmentationCache": "cache",
    "AugmentedDataset": "data",
    "few_shot_indices": "data",
    "image_folder": "data",
    "Erasure": "erase",
    "erase_concept": "erase",
    "CacheError": "errors",
    "DafusionError": "errors",
    "ErasureFileError": "errors",
    "FitError": "errors",
    "PipelineError": "errors",
    "TokenFileError": "errors",
    "run_fewshot": "fewshot",
    "fit_tokens": "fit",
    "diffuse": "functional",
    "PipelineSpec": "pipeline",
    "load_pipeline": "pipeline",
    "precompute": "precompute",
    "ClassTokens": "tokens",
    "DiffusionAugment": "transform",
}

__all__ = [
    "AugmentationCache",
    "AugmentedDataset",
    "CacheError",
    "ClassTokens",
    "DafusionError",
    "DiffusionAugment",
    "Erasure",
    "ErasureFileError",
    "FitError",
    "PipelineError",
    "PipelineSpec",
    "TokenFileError",
    "__version__",
    "diffuse",
    "erase_concept",
    "few_shot_indices",
    "fit_tokens",
    "image_folder",
    "load_pipeline",
    "precompute",
    "run_fewshot",
]

if TYPE_CHECKING:  # what type checkers and IDEs read; at run time __getattr__ imports on first use
    from .cache import AugmentationCache
    from .data import AugmentedDataset, few_shot_indices, image_folder
    from .erase import Erasure, erase_concept
    from .errors import CacheError, DafusionError, ErasureFileError, FitError, PipelineError, TokenFileError
    from .fewshot import run_fewshot
    from .fit import fit_tokens
    from .functional import diffuse
    from .pipeline import PipelineSpec, load_pipeline
    from .precompute import precompute
    from .tokens import ClassTokens
    from .transform import DiffusionAugment


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dafusion_aug' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
