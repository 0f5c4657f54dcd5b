"""What a sample is (:mod:`dafusion_aug._samples`): where its images and its label are, and what a label means,
the same for the transform and for ``precompute``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, random_image
from PIL import Image
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors

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


# -- issue 19: the class found the way torchvision finds it; masks, boxes and detection targets -------------
H = W = 16


def _mask():
    return tv_tensors.Mask(torch.tensor([[4, 1, 7, 0] * 4] * 16, dtype=torch.uint8))


def _boxes(n=2):
    return tv_tensors.BoundingBoxes(torch.tensor([[0, 0, 8, 8], [4, 4, 12, 12]][:n]), format="XYXY", canvas_size=(H, W))


@pytest.mark.parametrize(
    "make_sample, expected",
    [
        (lambda img: (img, 2), [2]),
        (lambda img: {"image": img, "label": 2}, [2]),
        (lambda img: (img, _mask(), 2), [2]),
        (lambda img: (img, _boxes(), "zebra"), [2]),
        (lambda img: (img, {"boxes": _boxes(1), "labels": torch.tensor([2])}), [2]),
        (lambda img: {"image": img, "mask": _mask(), "labels": torch.tensor(2)}, [2]),
        (lambda img: {"image": img, "class_label": 1}, [1]),
        (lambda img: (img, _mask()), [None]),
        (lambda img: (img, tv_tensors.Image(torch.rand(3, H, W))), [None]),
        (lambda img: (img, {"boxes": _boxes(0), "labels": torch.zeros(0, dtype=torch.int64)}), [None]),
        (lambda img: (img, {"boxes": _boxes(), "labels": torch.tensor([1, 2])}), [(1, 2)]),
    ],
    ids=["pair", "dict", "image-mask-label", "image-boxes-name", "detection-one-object", "segmentation-dict",
         "key-containing-label", "image-mask", "image-image", "detection-no-object", "detection-two-objects"],
)
def test_labels_are_found_the_way_torchvision_finds_them(make_aug, make_sample, expected):
    """Issue 19: item [1] of a tuple was always the label, so (img, Mask) raised "one image needs one label, got
    [[4, 1, 7, ..." and (img, target_dict) "label must be an int class index or a class name, got dict". Now
    tv_tensors and image-like items are skipped and a target dict's "labels" is taken, as torchvision does."""
    aug = make_aug(**FAST, prompt="a photo")
    _, labels = aug.sample_images(make_sample(random_image(30, (W, H))))
    assert labels == expected


def test_several_labels_need_a_way_to_choose_the_class(make_aug):
    """A detection target with several objects: a prompt naming the class says how to choose it; a labels_getter
    that chooses it and a prompt callable that receives every label both work."""
    img = random_image(31, (W, H))
    target = {"boxes": _boxes(), "labels": torch.tensor([1, 2])}
    with pytest.raises(ValueError, match=r"one image needs one label, got \[1, 2\].*labels_getter=.*prompt callable"):
        make_aug(**FAST)(img, target)
    first = make_aug(**FAST, labels_getter=lambda s: s[1]["labels"][0])
    out, back = first(img, target)
    assert back["labels"] is target["labels"] and back["boxes"] is target["boxes"]
    assert np.array_equal(np.asarray(out), np.asarray(make_aug(**FAST)(img, 1)[0]))
    seen = []

    def both(names, labels):
        seen.append((names, labels))
        return "a photo of " + " and ".join(names) if isinstance(names, tuple) else f"a photo of {names}"

    make_aug(**FAST, prompt=both)(img, target)
    assert seen == [(("golden retriever", "zebra"), (1, 2))]


def test_several_labels_are_refused_with_class_erasures(make_aug):
    from dafusion_aug import Erasure

    aug = make_aug(**FAST, prompt="a photo", class_erasures={0: Erasure({"x.weight": torch.zeros(2)}, concepts="cat")})
    with pytest.raises(ValueError, match=r"got \[1, 2\].*class_erasures needs the image's class"):
        aug(random_image(32, (W, H)), {"boxes": _boxes(), "labels": torch.tensor([1, 2])})


def test_precompute_fills_detection_samples_the_transform_reads(make_aug, tmp_path):
    """Detection samples with several objects and a class-free prompt: precompute fills exactly the entries the
    transform reads (on_miss="error" never fires), and the export names no class folder for them."""
    data = [(random_image(40 + i, (W, H)), {"boxes": _boxes(), "labels": torch.tensor([i % 3, 2])}) for i in range(3)]
    aug = make_aug(**FAST, prompt="a photo")
    res = precompute(aug, data, progress=False, out=tmp_path / "out")
    assert res["generated"] == 3 and res["failed"] == 0
    reader = make_aug(**FAST, prompt="a photo", on_miss="error")
    for sample in data:
        out, target = reader(sample)
        assert target["labels"] is sample[1]["labels"] and not np.array_equal(np.asarray(out), np.asarray(sample[0]))
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [x["label"] for x in lines] == [[0, 2], [1, 2], [2, 2]]
    assert lines[0]["class_name"] == ["cat", "zebra"] and lines[0]["file"].startswith("several-labels/")


# -- issue 33: the label heuristic is torchvision's own; a prompt that needs no class needs no label ----------
def _torchvision_sample(image) -> dict:
    """torchvision's big sample (``_make_transform_sample`` of its test_transforms_v2.py): the image under test,
    then an unbatched tv_tensors.Image, a Video, a PIL image, boxes, a mask and junk, a bare int among it."""
    h, w = image.shape[-2:]
    return dict(image_or_video=image, image_tv_tensor=tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8)),
                video_tv_tensor=tv_tensors.Video(torch.rand(2, 3, h, w)), image_pil=random_image(33, (w, h)),
                bounding_boxes=_boxes(), segmentation_mask=tv_tensors.Mask(torch.zeros(h, w, dtype=torch.uint8)),
                int=0, float=0.0, bool=True, none=None, str="str", path=Path.cwd(), object=object(),
                tensor=torch.empty(5), array=np.empty(5))


@pytest.mark.parametrize("container", [list, tuple])
def test_torchvision_sample_as_a_list_has_no_label(make_aug, container):
    """Issue 33: torchvision's big sample as a list or tuple, with a batch of 2 images first, raised "a batch of 2
    images needs 2 labels, got 0" even with a prompt that needs no class: the bare int far down the list was taken
    for the label. torchvision reads item [1] (here an unbatched image) and finds none; so do we."""
    batch = tv_tensors.Image(torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8))
    sample = container(_torchvision_sample(batch).values())
    torch.manual_seed(0)
    out = make_aug(**FAST, prompt="a photo", class_names=None)(sample)
    flat, spec = tree_flatten(sample)
    flat_out, spec_out = tree_flatten(out)
    assert spec_out == spec
    for i, (before, after) in enumerate(zip(flat, flat_out)):
        if i in (0, 1, 3):  # the batch, the unbatched image, the PIL image: augmented, of the same type
            assert type(after) is type(before) and after is not before
        else:
            assert after is before
    with pytest.raises(ValueError, match="needs the class, but the sample has no label"):
        make_aug(**FAST)(sample)


def _torchvision_labels(sample):
    from torchvision.transforms.v2._utils import _find_labels_default_heuristic

    try:
        return _find_labels_default_heuristic(sample)
    except ValueError:  # "Could not infer where the labels are in the sample": no label
        return None


@pytest.mark.parametrize(
    "make_sample",
    [
        lambda img, t: (img, t),
        lambda img, t: [img, {"boxes": _boxes(), "labels": t}],
        lambda img, t: {"image": img, "LABELS": t},
        lambda img, t: {"image": img, "class_label": t, "label": torch.tensor([0, 0])},
        lambda img, t: {"image": img, "target": t},
        lambda img, t: (img, {"boxes": _boxes()}),
        lambda img, t: list(_torchvision_sample(tv_tensors.Image(torch.rand(2, 3, H, W))).values()) + [t],
        lambda img, t: (img, tv_tensors.Video(torch.rand(2, 3, H, W)), t),
        lambda img, t: (img, random_image(34, (W, H)), t),
    ],
    ids=["pair", "detection", "labels-any-case", "first-key-containing-label", "no-label-key", "target-without-labels",
         "torchvision-big-sample", "image-video-label", "image-pil-label"],
)
def test_labels_getter_default_is_torchvisions_heuristic(make_sample):
    """Issue 33: where torchvision's default labels_getter finds labels, ours finds the same object; where it finds
    none, ours finds none (a tuple's item [1] is another image, a video, ...) instead of guessing further down.
    The two additions, a bare class at item [1] and masks or boxes before the label, are in
    test_labels_are_found_the_way_torchvision_finds_them."""
    from dafusion_aug._samples import default_labels_getter

    sample = make_sample(tv_tensors.Image(torch.rand(2, 3, H, W)), torch.tensor([1, 2]))
    assert default_labels_getter(sample) is _torchvision_labels(sample)
