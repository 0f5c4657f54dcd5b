"""Conversions between what users pass (PIL, tensors, tv_tensors) and canonical RGB uint8 arrays, and back.

Each input becomes a list of ``(H, W, 3)`` uint8 arrays plus a ``restore`` function that rebuilds an
object of the input's type, mode, size, dtype, device and value range from replacement arrays.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

__all__ = ["is_image_leaf", "looks_like_picture", "picture_count", "to_canonical", "image_array", "Restore"]

Restore = Callable[[Sequence["np.ndarray | Image.Image | None"]], object]

_PIL_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "I", "I;16", "F"}
_GRAY_W = np.array([299, 587, 114], dtype=np.uint32)


def is_image_leaf(x: object) -> bool:
    """A PIL image or a ``tv_tensors.Image``: the leaves torchvision calls images wherever they are."""
    return isinstance(x, (Image.Image, tv_tensors.Image))


def looks_like_picture(x: object) -> bool:
    """Anything that is no class label because it is pixel-shaped or a torchvision type: a PIL image, any
    ``tv_tensors`` leaf (``Image``, ``Video``, ``Mask``, ``BoundingBoxes``, ``KeyPoints``), or a tensor or
    numpy array of three or more dimensions, or of two that are both longer than 1 (a ``(B, 1)`` label
    tensor is still a label)."""
    if isinstance(x, (Image.Image, tv_tensors.TVTensor)):
        return True
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.ndim >= 3 or (x.ndim == 2 and min(x.shape) > 1)
    return False


def picture_count(leaf: object) -> int:
    """How many pictures an image leaf holds: 1 for a PIL image, the product of the leading dimensions of a
    ``(..., C, H, W)`` tensor (torchvision treats every leading dimension as a batch dimension)."""
    if isinstance(leaf, torch.Tensor) and leaf.ndim >= 3:
        return int(np.prod(leaf.shape[:-3], dtype=np.int64))
    return 1


def _gray(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601-2 luma, the formula PIL's convert("L") uses, so tensors and PIL images agree.
    return ((rgb.astype(np.uint32) @ _GRAY_W + 500) // 1000).astype(np.uint8)


def _pil_to_canonical(img: Image.Image) -> tuple[list[np.ndarray], Restore]:
    mode = img.mode
    if mode not in _PIL_MODES:
        raise ValueError(f"image has PIL mode {mode!r}, which dafusion-aug does not handle; convert it to 'RGB' first")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image must be at least 1x1, got {img.width}x{img.height}")
    alpha = img.getchannel("A") if mode in ("RGBA", "LA", "PA") else None
    if mode in ("I", "I;16", "F"):
        # High bit-depth grayscale: scale to 8 bits for the model, keep the mode on the way back.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode == "I;16" or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        g = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        rgb = np.repeat(g[:, :, None], 3, axis=2)

        def restore_hi(outs):
            if outs[0] is None:
                return img
            g2 = _gray(np.asarray(outs[0])).astype(np.float64) / 255.0 * hi
            if mode == "F":
                return Image.fromarray(g2.astype(np.float32), "F")
            if mode == "I;16":
                # frombytes: Pillow 13 refuses fromarray(uint16 array, "I;16")
                return Image.frombytes("I;16", img.size, np.round(g2).astype("<u2").tobytes())
            return Image.fromarray(np.round(g2).astype(np.int32), "I")

        return [np.ascontiguousarray(rgb)], restore_hi
    rgb = np.asarray(img if mode == "RGB" else img.convert("RGB"))

    def restore(outs):
        out = outs[0]
        if out is None:
            return img
        new = out if isinstance(out, Image.Image) else Image.fromarray(out, "RGB")
        if mode == "RGB":
            pass
        elif mode in ("L", "LA"):
            new = new.convert("L")
        elif mode in ("P", "PA"):
            new = new.convert("P", palette=Image.Palette.ADAPTIVE)
        else:
            new = new.convert(mode if mode != "RGBA" else "RGB")
        if alpha is not None:
            new = new.convert({"RGBA": "RGBA", "LA": "LA", "PA": "RGBA"}[mode])
            new.putalpha(alpha)
            if mode == "PA":
                new = new.convert("PA")
        return new

    return [np.ascontiguousarray(rgb)], restore


def _tensor_chw_to_canonical(t: torch.Tensor, where: str) -> np.ndarray:
    c = t.shape[0]
    if c not in (1, 3, 4):
        raise ValueError(f"{where} must have 1, 3 or 4 channels (C, H, W), got shape {tuple(t.shape)}")
    if t.shape[1] < 1 or t.shape[2] < 1:
        raise ValueError(f"{where} must be at least 1x1, got shape {tuple(t.shape)}")
    x = t.detach().to("cpu")
    if x.dtype == torch.uint8:
        u8 = x
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError(f"{where} must hold finite values, got NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{where} is a float tensor, so its values must be in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        u8 = x.clamp(0, 1).mul(255).round().to(torch.uint8)
    else:
        raise TypeError(f"{where} must be a uint8 or floating-point tensor, got dtype {t.dtype}")
    arr = u8[:3].permute(1, 2, 0).numpy() if c >= 3 else u8[0].unsqueeze(-1).expand(-1, -1, 3).numpy()
    return np.ascontiguousarray(arr)


def _restore_chw(orig: torch.Tensor, out: np.ndarray | Image.Image) -> torch.Tensor:
    out = np.array(out) if isinstance(out, Image.Image) else out
    c = orig.shape[0]
    chans = torch.from_numpy(_gray(out)).unsqueeze(0) if c == 1 else torch.from_numpy(out).permute(2, 0, 1)
    if orig.dtype == torch.uint8:
        new = chans.to(torch.uint8)
        if c == 4:
            new = torch.cat([new, orig[3:].detach().to("cpu")])
    else:
        new = chans.to(torch.float32).div_(255.0)
        if c == 4:
            new = torch.cat([new, orig[3:].detach().to("cpu", torch.float32)])
        new = new.to(orig.dtype)
    return new.to(orig.device)


def to_canonical(leaf: object, where: str = "image") -> tuple[list[np.ndarray], Restore]:
    """Split ``leaf`` into canonical RGB arrays (one per picture) and a function that rebuilds its type.

    A tensor is ``(C, H, W)`` or has any number of leading batch dimensions (``(B, C, H, W)``,
    ``(B1, B2, C, H, W)``), as in torchvision; its pictures are listed in row-major order of those
    dimensions. ``restore(outs)`` takes one array or ``None`` per picture (``None`` keeps the picture) and
    returns the input object itself when nothing is replaced, else an object of the input's type, shape,
    dtype, device and memory format (a channels-last batch stays channels-last).

    Raises:
        TypeError: ``leaf`` is neither a PIL image nor a tensor, or a tensor of another dtype.
        ValueError: a tensor of fewer than three dimensions, or invalid pixels (the message names ``where``).
    """
    if isinstance(leaf, Image.Image):
        return _pil_to_canonical(leaf)
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"{where} must be a PIL image or a tensor, got {type(leaf).__name__}")
    if leaf.ndim < 3:
        raise ValueError(f"{where} must be a (C, H, W) or (..., C, H, W) tensor, got shape {tuple(leaf.shape)}")
    batched = leaf.ndim > 3
    samples = list(leaf.reshape(-1, *leaf.shape[-3:]).unbind(0)) if batched else [leaf]
    arrays = [_tensor_chw_to_canonical(s, f"{where}[{i}]" if batched else where) for i, s in enumerate(samples)]

    def restore(outs):
        if all(o is None for o in outs):
            return leaf
        parts = [s if o is None else _restore_chw(s, o) for s, o in zip(samples, outs)]
        new = torch.stack(parts).reshape(leaf.shape) if batched else parts[0]
        if not leaf.is_contiguous():  # empty_like keeps the strides: a channels-last batch stays channels-last
            new = torch.empty_like(leaf.as_subclass(torch.Tensor)).copy_(new)
        return tv_tensors.wrap(new, like=leaf) if isinstance(leaf, tv_tensors.TVTensor) else new

    return arrays, restore


def image_array(image: object, where: str = "image") -> np.ndarray:
    """One picture as a canonical ``(H, W, 3)`` uint8 array: a PIL image, a ``(C, H, W)`` tensor, a uint8
    ``(H, W[, 1|3|4])`` numpy array, or a path (opened as RGB).

    Raises:
        TypeError: another type, or a numpy array that is not uint8 ``(H, W[, 1|3|4])``.
        ValueError: a batch of several pictures, or invalid pixels (see :func:`to_canonical`).
    """
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.dtype != np.uint8:
            raise TypeError(f"{where}: a numpy image must be uint8 (H, W[, 1|3|4]), got {arr.dtype} {arr.shape}")
        arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]
        return np.ascontiguousarray(arr)
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if not isinstance(image, (Image.Image, torch.Tensor)):
        raise TypeError(f"{where}: the image must be a PIL image, a tensor, a uint8 array or a path, got {type(image).__name__}")
    arrays, _ = to_canonical(image, where)
    if len(arrays) != 1:
        raise ValueError(f"{where}: expected one image, got a batch of {len(arrays)}")
    return arrays[0]
