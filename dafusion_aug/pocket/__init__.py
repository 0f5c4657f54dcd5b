"""The pocket model: a real Stable-Diffusion-layout text-to-image model of handwritten digits, shipped inside.

It runs every code path of the library on a CPU in seconds, offline, and lets tests check meaning: the
judge classifier reads the generated pictures.

Example:
    >>> from diffusers import StableDiffusionImg2ImgPipeline
    >>> from dafusion_aug.pocket import digits, judge_images, model_path
    >>> pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_path())
    >>> image, label = digits("B")[0]
    >>> out = pipe("a photo of a handwritten digit zero", image=image, strength=0.5).images[0]

See ``docs/pocket.md`` for the data split, the architecture, the training and the measured quality.
"""

from __future__ import annotations

from pathlib import Path

from .data import CLASS_NAMES, SPLIT_SEED, DigitsDataset, digits, split_indices
from .judge import JUDGE_FILE, JudgeNet, judge, judge_images
from .judged import JudgedRates, judged_rates

__all__ = [
    "CLASS_NAMES",
    "SPLIT_SEED",
    "DigitsDataset",
    "digits",
    "split_indices",
    "model_path",
    "prompt",
    "JudgeNet",
    "JUDGE_FILE",
    "judge",
    "judge_images",
    "judged_rates",
    "JudgedRates",
]

_MODEL_DIR = Path(__file__).resolve().parent / "model"


def model_path() -> Path:
    """Return the folder of the shipped pocket model (a diffusers ``StableDiffusionImg2ImgPipeline``).

    Returns:
        The folder, for ``StableDiffusionImg2ImgPipeline.from_pretrained(model_path())``.

    Raises:
        FileNotFoundError: when the weights are missing (rebuild them with the training command).
    """
    if not (_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the pocket model is missing from {_MODEL_DIR}; rebuild it with "
            "`python -m dafusion_aug.pocket.train` (about an hour on 2 CPU cores)"
        )
    return _MODEL_DIR


def prompt(label: int) -> str:
    """Return the standard prompt for a digit, e.g. ``"a photo of a handwritten digit seven"``.

    Args:
        label: the digit, 0..9.
    """
    return f"a photo of a handwritten digit {CLASS_NAMES[label]}"
