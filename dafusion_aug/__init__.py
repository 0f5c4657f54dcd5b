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
import sys
import types
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
    "FilterError": "errors",
    "FitError": "errors",
    "LoraFileError": "errors",
    "PipelineError": "errors",
    "TokenFileError": "errors",
    "run_fewshot": "fewshot",
    "ClassifierFilter": "filters",
    "CLIPFilter": "filters",
    "fit_tokens": "fit",
    "diffuse": "functional",
    "PipelineSpec": "pipeline",
    "load_pipeline": "pipeline",
    "precompute": "precompute",
    "Region": "regions",
    "ClassTokens": "tokens",
    "ClassLora": "lora",
    "OtherClass": "mixing",
    "DiffusionAugment": "transform",
}

__all__ = [
    "AugmentationCache",
    "AugmentedDataset",
    "CacheError",
    "ClassLora",
    "ClassTokens",
    "ClassifierFilter",
    "CLIPFilter",
    "DafusionError",
    "DiffusionAugment",
    "Erasure",
    "ErasureFileError",
    "FilterError",
    "FitError",
    "LoraFileError",
    "OtherClass",
    "PipelineError",
    "PipelineSpec",
    "Region",
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
    from .errors import (
        CacheError,
        DafusionError,
        ErasureFileError,
        FilterError,
        FitError,
        LoraFileError,
        PipelineError,
        TokenFileError,
    )
    from .fewshot import run_fewshot
    from .filters import ClassifierFilter, CLIPFilter
    from .fit import fit_tokens
    from .functional import diffuse
    from .lora import ClassLora
    from .mixing import OtherClass
    from .pipeline import PipelineSpec, load_pipeline
    from .precompute import precompute
    from .regions import Region
    from .tokens import ClassTokens
    from .transform import DiffusionAugment


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``dafusion_aug.precompute`` (the import system then
    sets the package attribute of that name) must not hide the public function ``precompute``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            return  # the submodule stays reachable through sys.modules and ``from dafusion_aug.precompute import``
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dafusion_aug' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
