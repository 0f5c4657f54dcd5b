"""Edit regions: which pixels of an image a masked edit may change (DA-Fusion's masking ablation).

A sample's object mask (a ``tv_tensors.Mask``, or ``BoundingBoxes`` turned into a box mask) becomes an
*edit mask*: a bool ``(H, W)`` array at the image's size, ``True`` where the variant may differ from the
real image. ``region="object"`` edits inside the mask grown by ``mask_grow`` pixels, ``"background"``
edits outside it (the official code's ``inverted``), so the grown margin around the object is always on
the kept side of a background edit and on the edited side of an object edit. After generation the real
pixels are pasted back outside the edit mask (:func:`paste_outside`), so they are equal, not just close.

Example:
    >>> m = np.zeros((8, 8), bool); m[3:5, 3:5] = True
    >>> int(edit_mask(m, "object", 1).sum()), int(edit_mask(m, "background", 1).sum())
    (16, 48)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from ._checks import check_int

__all__ = ["REGIONS", "ON_MISSING_MASK", "Region", "check_region", "mask_pictures", "boxes_mask", "edit_mask", "edit_digest",
           "paste_outside", "generation_masks"]

#: ``"all"`` edits the whole image (plain img2img, masks ignored); the others inpaint.
REGIONS = ("all", "object", "background")
#: What a region edit does with a sample that has no mask: refuse it, or edit the whole image.
ON_MISSING_MASK = ("error", "all")


@dataclass(frozen=True)
class Region:
    """The settings of a masked edit, ``DiffusionAugment(region=Region(...))``; a plain string ``"object"`` or
    ``"background"`` is ``Region(that string)``.

    Args:
        where: ``"object"`` (edit only inside the sample's object mask grown by ``grow``), ``"background"``
            (only outside it) or ``"all"`` (the whole image; masks are ignored).
        grow: pixels the object mask grows in every direction before an edit (a square dilation at the
            input's size; the official DA-Fusion code's ``mask_grow_radius=16`` was a 16 px window at 512 px).
        on_missing: a sample without a mask or boxes is an error (``"error"``) or edited whole (``"all"``,
            with the keys of ``region="all"``'s plan).

    Raises:
        ValueError, TypeError: an unknown ``where`` or ``on_missing``, or ``grow`` not an int >= 0.

    Example:
        >>> Region("background", grow=2)
        Region(where='background', grow=2, on_missing='error')
    """

    where: str = "object"
    grow: int = 16
    on_missing: str = "error"

    def __post_init__(self) -> None:
        if self.where not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {self.where!r}")
        object.__setattr__(self, "grow", check_int(self.grow, "grow", minimum=0, unit="pixels"))
        if self.on_missing not in ON_MISSING_MASK:
            raise ValueError(f"on_missing must be one of {ON_MISSING_MASK}, got {self.on_missing!r}")


def check_region(region: Any) -> tuple[str, int, str]:
    """``region`` (a string of :data:`REGIONS` or a :class:`Region`) as ``(where, grow, on_missing)``.

    Raises:
        ValueError, TypeError: an unknown region, or a bad :class:`Region` field.
    """
    if isinstance(region, str):
        region = Region(region)
    elif not isinstance(region, Region):
        raise TypeError(f"region must be one of {REGIONS} or a Region, got {type(region).__name__}")
    return region.where, region.grow, region.on_missing


def mask_pictures(mask: torch.Tensor, n: int, size: tuple[int, int], where: str = "mask") -> list[np.ndarray]:
    """A ``tv_tensors.Mask`` as one bool ``(H, W)`` object mask per picture (the union of its objects).

    Args:
        mask: ``(H, W)``, ``(K, H, W)`` (K object masks of one image: their union) or, for a batch of ``n``
            pictures, ``(n, H, W)`` / ``(n, K, H, W)``; values 0/1 or bool.
        n: the number of pictures of the image it goes with.
        size: the image's ``(H, W)``.

    Raises:
        ValueError: another size than the image's, values other than 0 and 1, or a batch of the wrong length.
    """
    if tuple(mask.shape[-2:]) != tuple(size) or mask.ndim < 2:
        raise ValueError(f"{where} must have the image's size (H, W) = {tuple(size)}, got a mask of shape {tuple(mask.shape)}")
    t = mask.detach().to("cpu")
    if t.dtype != torch.bool:
        bad = t[(t != 0) & (t != 1)]
        if bad.numel():
            raise ValueError(f"{where} must be binary (0/1 or bool), got value {bad.flatten()[0].item()!r} "
                             f"(dtype {t.dtype}); for a label map pass (mask == class) or (mask > 0)")
        t = t != 0
    if n == 1:
        return [t.reshape(-1, *size).any(0).numpy()]
    if mask.ndim < 3 or mask.shape[0] != n:
        raise ValueError(f"{where} of a batch of {n} images must be (n, H, W) or (n, K, H, W), got shape {tuple(mask.shape)}")
    return [t[i].reshape(-1, *size).any(0).numpy() for i in range(n)]


def boxes_mask(boxes: tv_tensors.BoundingBoxes, size: tuple[int, int], where: str = "boxes") -> np.ndarray:
    """``BoundingBoxes`` of one image as a bool ``(H, W)`` mask: the union of its boxes (pixels they touch).

    Raises:
        ValueError: the boxes' ``canvas_size`` is not the image's size.
    """
    if tuple(boxes.canvas_size) != tuple(size):
        raise ValueError(f"{where} must have the image's canvas_size (H, W) = {tuple(size)}, got {tuple(boxes.canvas_size)}")
    from torchvision.transforms.v2 import functional as TF

    xyxy = TF.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    out = np.zeros(size, bool)
    h, w = size
    for x0, y0, x1, y1 in xyxy.reshape(-1, 4).tolist():
        c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        out[r0:r1, c0:c1] = True
    return out


def edit_mask(object_mask: np.ndarray, region: str, grow: int) -> np.ndarray:
    """The pixels a variant may change: the object mask grown by ``grow`` pixels in every direction (a square
    dilation, like the official code's ``maximum_filter``), or everything outside it for ``"background"``.

    Raises:
        ValueError: the region to edit is empty (an empty mask with ``"object"``, a mask whose grown
            version covers the whole image with ``"background"``).
    """
    m = torch.from_numpy(np.ascontiguousarray(object_mask, dtype=bool))
    if grow:
        m = F.max_pool2d(m[None, None].float(), kernel_size=2 * grow + 1, stride=1, padding=grow)[0, 0] > 0
    edit = (m if region == "object" else ~m).numpy()
    if not edit.any():
        what = "the mask is empty" if region == "object" else f"the mask grown by {grow} px covers the whole image"
        raise ValueError(f"region={region!r} has nothing to edit: {what}")
    return edit


def edit_digest(digest: str, edit: np.ndarray) -> str:
    """The image digest a masked variant's cache key and plan use: the image's digest and its edit mask's."""
    h = hashlib.sha256(f"dafusion-aug/edit-mask|{digest}|{edit.shape[0]}x{edit.shape[1]}|".encode())
    h.update(np.packbits(edit, axis=None).tobytes())
    return h.hexdigest()


def paste_outside(generated: np.ndarray, real: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """``generated`` inside the edit mask, the real image's pixels (exactly) outside it."""
    return np.where(edit[..., None], generated, real)


def generation_masks(edits: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Edit masks at the generation size, ``(N, 1, size, size)`` float 0/1; a pixel is edited there when any
    input pixel under it is, so the model may repaint every pixel the paste-back keeps."""
    out = []
    for e in edits:
        t = torch.from_numpy(np.ascontiguousarray(e)).float()[None, None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append((t > 0).float())
    return torch.cat(out)
