"""Datasets around the transform (:mod:`dafusion_aug.data`): ``AugmentedDataset`` and few-shot splits."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from torchvision.transforms import v2

from dafusion_aug import AugmentedDataset
from dafusion_aug.data import few_shot_indices, image_folder

Pair = namedtuple("Pair", "image label")


@pytest.mark.parametrize(
    "sample",
    [
        (random_image(0), 1),
        [random_image(0), 1],
        Pair(random_image(0), 1),
        {"image": random_image(0), "label": 1},
        {"label": 1, "meta": {"id": "a"}, "img": random_image(0)},
    ],
    ids=["tuple", "list", "namedtuple", "dict", "dict-other-keys"],
)
def test_transform_reaches_the_image_and_the_sample_keeps_its_shape(sample):
    """Issue 15, item 7: over dict samples, ``AugmentedDataset(transform=...)`` returned the dict's keys
    ``('image', 'label')`` and the sample was lost."""
    ds = AugmentedDataset([sample], lambda s: s, transform=v2.PILToTensor())
    out = ds[0]
    assert type(out) is type(sample)
    if isinstance(sample, dict):
        key = "image" if "image" in sample else "img"
        assert set(out) == set(sample) and out["label"] == 1 and out.get("meta") == sample.get("meta")
        image = out[key]
    else:
        image, label = out
        assert label == 1
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32)


def test_transform_of_a_bare_image_and_of_a_dict_without_one():
    assert AugmentedDataset([random_image(0)], lambda s: s, transform=v2.PILToTensor())[0].shape == (3, 32, 32)
    with pytest.raises(TypeError, match=r"the dict sample with keys \['label', 'text'\] has none"):
        AugmentedDataset([{"label": 1, "text": "x"}], lambda s: s, transform=v2.PILToTensor())[0]


@pytest.mark.parametrize("k, error, match", [(1.5, TypeError, "k must be an int, got float: 1.5"), ("2", TypeError, "k must be an int, got str"),
                                            (0, ValueError, "k must be >= 1, got 0")])
def test_few_shot_k_must_be_a_positive_int(k, error, match):
    """few_shot_indices(k=1.5) raised numpy's own TypeError."""
    with pytest.raises(error, match=match):
        few_shot_indices([0, 0, 1, 1], k, seed=0)


def test_few_shot_accepts_numpy_ints():
    targets = [0, 0, 0, 1, 1, 1]
    assert few_shot_indices(targets, np.int64(2), seed=np.int64(3)) == few_shot_indices(targets, 2, seed=3)


# -- issue 16: folders that are not class folders ------------------------------------------------------------
def _images_in(folder, n=1):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (4, 4)).save(folder / f"{i}.png")


def test_image_folder_warns_for_split_folders_and_one_class(tmp_path):
    import warnings

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            _images_in(tmp_path / "splits" / split / c)
    with pytest.warns(UserWarning, match=r"has the sub-folders \['train', 'val'\], read as classes, but \['train', 'val'\] are names of data splits"):
        image_folder(tmp_path / "splits")
    _images_in(tmp_path / "one" / "cat")
    with pytest.warns(UserWarning, match=r"has one sub-folder, 'cat', so every image is of one class 'cat'$"):
        image_folder(tmp_path / "one")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_folder(tmp_path / "splits" / "train").class_names == ["cat", "dog"]  # the right folder: silent


def test_image_folder_names_a_file_and_a_missing_folder(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"data must be a folder with one sub-folder of images per class, but '.*f.png' is a file"):
        image_folder(tmp_path / "f.png")
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        image_folder(tmp_path / "nothing")
