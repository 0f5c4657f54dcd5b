"""dafusion-aug: generative data augmentation with diffusion models (DA-Fusion).

Example:
    >>> from dafusion_aug import DiffusionAugment
    >>> aug = DiffusionAugment("pocket", tokens="tokens.safetensors", cache="cache/")  # doctest: +SKIP
"""

__version__ = "0.1.0.dev0"

from .cache import AugmentationCache
from .data import AugmentedDataset, few_shot_indices, image_folder
from .erase import Erasure, erase_concept
from .errors import (
    CacheError,
    DafusionError,
    ErasureFileError,
    FilterError,
    FitError,
    PipelineError,
    TokenFileError,
)
from .fewshot import run_fewshot
from .filters import ClassifierFilter, CLIPFilter
from .fit import fit_tokens
from .functional import diffuse
from .pipeline import PipelineSpec, load_pipeline
from .precompute import precompute
from .tokens import ClassTokens
from .transform import DiffusionAugment

__all__ = [
    "AugmentationCache",
    "AugmentedDataset",
    "CacheError",
    "ClassTokens",
    "ClassifierFilter",
    "CLIPFilter",
    "DafusionError",
    "DiffusionAugment",
    "Erasure",
    "ErasureFileError",
    "FilterError",
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
