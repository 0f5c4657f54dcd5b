"""Exceptions raised by dafusion-aug.

Every error the library raises on purpose is a :class:`DafusionError` (or a built-in ``ValueError`` /
``TypeError`` for plainly wrong arguments), and its message names the argument and the value received.
"""

from __future__ import annotations

__all__ = ["DafusionError", "TokenFileError", "CacheError", "PipelineError", "ErasureFileError", "LoraFileError", "FitError", "FilterError"]


class DafusionError(Exception):
    """Base class of the errors dafusion-aug raises on purpose."""


class TokenFileError(DafusionError):
    """A class-token file is missing, corrupt, of the wrong format, or does not fit the pipeline."""


class ErasureFileError(DafusionError):
    """An erasure file is missing, corrupt, or was trained on another base model."""


class LoraFileError(DafusionError):
    """A LoRA file is missing, corrupt, not a UNet LoRA, or was made for another model."""


class CacheError(DafusionError):
    """The augmentation cache cannot be used (folder not writable, disk full, entry missing)."""


class PipelineError(DafusionError):
    """A pipeline cannot be loaded or used as asked."""


class FitError(DafusionError, ValueError):
    """``fit_tokens`` cannot run as asked: bad training data, initializer, tokens, or checkpoint."""


class FilterError(DafusionError, ValueError):
    """A variant filter raised or returned something other than one keep flag or score per image."""
