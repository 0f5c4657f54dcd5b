"""What a sample is (:mod:`dafusion_aug._samples`): where its images and its label are, and what a label means,
the same for the transform and for ``precompute``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, random_image
from PIL import Image

from dafusion_aug import precompute


def test_samples_without_arrays_pass_through(make_aug):
    aug = make_aug(**FAST)
    sample = {"text": "no picture here", "label": 0, "ids": torch.arange(5)}
    assert aug(sample) is sample


@pytest.mark.parametrize(
    "label, match",
    [
        (True, "label must be an int class index or a class name, got bool"),
        (torch.tensor([0, 1]), r"one image needs one label, got \[0, 1\]"),
        (3, r"label must be in \[0, 3\), got 3"),
        ("Zebra", "label 'Zebra' is not one of the class names"),
    ],
)
def test_bad_labels_name_themselves(make_aug, label, match):
    """7, -1, 'horse', 1.5: test_transform.py::test_bad_samples_name_the_problem."""
    with pytest.raises((ValueError, TypeError), match=match):
        make_aug(**FAST)(random_image(0), label)


def test_bad_label_in_a_batch_names_its_index(make_aug):
    with pytest.raises(ValueError, match=r"label\[1\] must be in \[0, 3\), got 9"):
        make_aug(**FAST)(torch.rand(2, 3, 8, 8), torch.tensor([0, 9]))


def test_labels_of_any_int_type_and_class_names_agree(make_aug):
    aug = make_aug(**FAST)
    img = random_image(3)
    outs = [np.asarray(aug(img, label)[0]) for label in (2, np.int64(2), torch.tensor(2), "zebra")]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_missing_label_in_a_dict_sample(make_aug):
    """A tuple sample with labels_getter=None: test_transform.py::test_missing_label_when_prompt_needs_one."""
    with pytest.raises(ValueError, match="no label"):
        make_aug(**FAST)({"image": random_image(0), "target": 1})
    agnostic = make_aug(**FAST, prompt="a photo", class_names=None)
    out = agnostic({"image": random_image(0), "target": 1})
    assert out["target"] == 1 and isinstance(out["image"], Image.Image)


def test_precompute_fills_the_samples_the_transform_augments(make_aug):
    """A dict sample with a plain tensor image: forward augments it, so precompute must fill it (it used to refuse it)."""
    data = [{"image": torch.rand(3, 32, 32), "label": i % 3, "id": i} for i in range(3)]
    aug = make_aug(num_inference_steps=2, strength=1.0, num_variants=2)
    res = precompute(aug, data, progress=False)
    assert res["generated"] == 6 and res["failed"] == 0 and res["failures"] == []
    reader = make_aug(num_inference_steps=2, strength=1.0, num_variants=2, on_miss="error")
    for sample in data:
        out = reader(sample)  # every variant is in the cache: on_miss="error" never fires
        assert out["id"] == sample["id"] and out["label"] == sample["label"] and not torch.equal(out["image"], sample["image"])
    assert reader.cache.stats()["hits"] == 3


def test_precompute_names_items_without_an_image(make_aug):
    aug = make_aug(num_inference_steps=2, strength=1.0, num_variants=1)
    with pytest.warns(UserWarning, match="precompute skipped 2 unreadable item"):
        res = precompute(aug, [{"text": "no picture", "label": 0}, (np.zeros((8, 8, 3), np.uint8), 1)], progress=False)
    assert res["failed"] == 2 and res["generated"] == 0
    (i0, why0), (i1, why1) = res["failures"]
    assert (i0, i1) == (0, 1) and "must hold an image" in why0 and "numpy array of shape (8, 8, 3)" in why1
