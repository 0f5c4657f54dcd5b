"""Pictures in and out of the transform (:mod:`dafusion_aug._images`): every PIL mode, tensor dtype and size
comes back as it came, and bad pixels or shapes are named (issue 8, docs/reliability.md).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image


def _mode_image(mode: str, size=(40, 24)) -> Image.Image:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 4096, (size[1], size[0])).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((size[1], size[0]), dtype=np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("mode", ["LA", "P", "PA", "1", "I", "I;16", "F", "CMYK", "YCbCr"])
def test_pil_modes_come_back_in_their_mode_and_size(make_aug, mode):
    """L and RGBA: test_transform.py::test_output_matches_input_type_size_dtype_range."""
    img = _mode_image(mode)
    assert img.mode == mode
    out, label = make_aug(**FAST)(img, 1)
    assert isinstance(out, Image.Image) and out is not img and label == 1
    assert out.mode == mode and out.size == img.size
    if mode in ("LA", "PA"):  # alpha is kept as it was
        assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(img.getchannel("A")))
    if mode == "I;16":
        assert np.asarray(out).dtype == np.uint16


@pytest.mark.parametrize("mode", ["I;16B", "RGBX", "RGBa"])
def test_unhandled_pil_modes_are_refused_by_name(make_aug, mode):
    img = Image.new(mode, (8, 8))
    with pytest.raises(ValueError, match=f"PIL mode '{re.escape(mode)}'.*convert it to 'RGB'"):
        make_aug(**FAST)(img, 0)


def test_one_pixel_images(make_aug):
    aug = make_aug(**FAST)
    out, _ = aug(Image.fromarray(np.full((1, 1, 3), 200, np.uint8)), 0)
    assert out.size == (1, 1)
    t = torch.rand(3, 1, 1)
    assert aug(t, 0)[0].shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"at least 1x1, got shape \(3, 0, 8\)"):
        aug(torch.rand(3, 0, 8), 0)


def test_4000x3000_photo_round_trips_and_hits_the_cache(make_aug):
    aug = make_aug(**FAST)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    first, _ = aug(big, 2)  # generated at the tiny model's 32x32, resized back
    assert first.size == (4000, 3000) and first.mode == "RGB"
    second, _ = aug(big, 2)
    assert aug.cache.stats()["hits"] == 1 and np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize(
    "x",
    [
        torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8),
        torch.rand(2, 3, 20, 30),
        torch.rand(3, 20, 30).half(),
        torch.rand(3, 20, 30).bfloat16(),
    ],
    ids=["uint8-batch", "float-batch", "float16", "bfloat16"],
)
def test_tensor_batches_and_low_precision_floats(make_aug, x):
    """uint8/float32/float64 CHW, 1 and 4 channels: test_transform.py::test_output_matches_input_type_size_dtype_range."""
    labels = torch.tensor([0, 2]) if x.ndim == 4 else 1
    out, back = make_aug(**FAST)(x, labels)
    assert back is labels and out.shape == x.shape and out.dtype == x.dtype
    if x.is_floating_point():
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


def test_every_leading_dimension_is_a_batch_dimension(make_aug):
    """Issue 19: a (2, 1, 3, H, W) tensor was refused ("got a tensor of shape (1, 2, 3, 8, 8)"); torchvision treats
    every leading dimension as a batch dimension, and so does the transform: 2 x 1 pictures, one decision and label
    each, back in the input's shape."""
    aug = make_aug(**FAST)
    flat = torch.rand(2, 3, 8, 8)
    out, _ = aug(flat.reshape(2, 1, 3, 8, 8), torch.tensor([[0], [2]]))
    assert out.shape == (2, 1, 3, 8, 8) and torch.equal(out.reshape(2, 3, 8, 8), aug(flat, torch.tensor([0, 2]))[0])
    with pytest.raises(ValueError, match="a batch of 2 images needs 2 labels"):
        aug(flat.reshape(1, 2, 3, 8, 8), 0)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.rand(3, 8, 8) - 0.5, r"image is a float tensor, so its values must be in \[0, 1\], got range \[-"),
        (torch.rand(3, 8, 8) * 255, r"must be in \[0, 1\], got range"),
        (torch.full((3, 8, 8), float("inf")), "image must hold finite values, got NaN or inf"),
        (torch.stack([torch.rand(3, 8, 8), torch.full((3, 8, 8), float("nan"))]), r"image\[1\] must hold finite values"),
        (torch.stack([torch.rand(3, 8, 8), torch.rand(3, 8, 8) * 2]), r"image\[1\] is a float tensor"),
        (torch.zeros(3, 8, 8, dtype=torch.bool), "uint8 or floating-point tensor, got dtype torch.bool"),
        (torch.zeros(20, 30, 3, dtype=torch.uint8), r"1, 3 or 4 channels \(C, H, W\), got shape \(20, 30, 3\)"),
        (torch.rand(8, 8), r"\(C, H, W\) / \(\.\.\., C, H, W\) tensor, got a tensor of shape \(8, 8\)"),
        (np.zeros((8, 8, 3), np.uint8), r"got a numpy array of shape \(8, 8, 3\)"),
    ],
    ids=["negative", "0-255-float", "inf", "nan-in-batch", "range-in-batch", "bool", "hwc", "2d", "numpy"],
)
def test_bad_image_values_and_shapes_name_the_argument(make_aug, x, match):
    """NaN, x2 range, 2 channels, int32: test_transform.py::test_bad_samples_name_the_problem."""
    labels = torch.tensor([0, 1]) if isinstance(x, torch.Tensor) and x.ndim == 4 else 0
    with pytest.raises((ValueError, TypeError), match=match):
        make_aug(**FAST)(x, labels)
