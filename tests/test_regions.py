"""Region edits (issue 18): masks the torchvision way, inpainting, pixels outside the region unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, random_image
from PIL import Image
from torchvision import tv_tensors

from dafusion_aug import DiffusionAugment, PipelineSpec, Region
from dafusion_aug.functional import diffuse, inpaint_pipeline
from dafusion_aug.hashing import image_digest
from dafusion_aug.regions import edit_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def square_mask(h=32, w=32, box=(8, 20, 6, 22)) -> tv_tensors.Mask:
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[box[0] : box[1], box[2] : box[3]] = 1
    return tv_tensors.Mask(m)


def changed(out, real) -> np.ndarray:
    return (np.asarray(out).astype(int) != np.asarray(real).astype(int)).any(-1)


@pytest.mark.parametrize("region", ["object", "background"])
def test_pixels_outside_the_region_equal_the_real_image(make_aug, region):
    """Tolerance 0: the real pixels are pasted back outside the grown mask; the mask comes back as the same object."""
    aug = make_aug(**FAST, region=Region(region, grow=2))
    image, mask = random_image(3), square_mask()
    out_image, out_mask, label = aug(image, mask, 1)
    assert out_mask is mask and label == 1 and isinstance(out_image, Image.Image)
    edit = edit_mask(mask.numpy().astype(bool), region, 2)
    diff = changed(out_image, image)
    assert not diff[~edit].any()  # outside the edited region: exactly the real pixels
    assert diff[edit].mean() > 0.5  # inside: a new picture
    if region == "background":
        assert not diff[mask.numpy().astype(bool)].any()  # the object itself is untouched


def test_region_in_dicts_tensors_and_batches(make_aug):
    aug = make_aug(**FAST, region=Region("object", grow=0))
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    masks = tv_tensors.Mask(torch.stack([square_mask().as_subclass(torch.Tensor), square_mask(box=(0, 4, 0, 4)).as_subclass(torch.Tensor)]))
    out = aug({"image": tv_tensors.Image(image), "masks": masks, "labels": torch.tensor([0, 2])})
    assert out["masks"] is masks
    for j in range(2):
        diff = changed(out["image"][j].permute(1, 2, 0).numpy(), image[j].permute(1, 2, 0).numpy())
        inside = masks[j].numpy().astype(bool)
        assert not diff[~inside].any() and diff[inside].any()


def test_boxes_become_a_box_mask(make_aug):
    aug = make_aug(**FAST, region=Region("object", grow=0))
    image = random_image(5)
    boxes = tv_tensors.BoundingBoxes([[4, 6, 12, 20]], format="XYXY", canvas_size=(32, 32))
    out, target = aug(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert target["boxes"] is boxes
    diff = changed(out, image)
    box = np.zeros((32, 32), bool)
    box[6:20, 4:12] = True
    assert not diff[~box].any() and diff[box].any()


def test_region_all_ignores_masks_and_keeps_the_keys(make_aug):
    """region='all' is the plain transform: the same key and pixels with or without a mask in the sample."""
    plain, masked = make_aug(**FAST), make_aug(**FAST, region=Region("all", grow=3))
    assert plain.fingerprint() == masked.fingerprint()
    image = random_image(1)
    torch.manual_seed(0)
    a = plain(image, 1)[0]
    torch.manual_seed(0)
    b = masked(image, square_mask(), 1)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_mask_region_and_grow_are_in_the_key(make_aug, tmp_path):
    digest = image_digest(np.zeros((32, 32, 3), np.uint8))
    e1 = edit_mask(square_mask().numpy().astype(bool), "object", 1)
    e2 = edit_mask(square_mask(box=(0, 8, 0, 8)).numpy().astype(bool), "object", 1)
    obj, back, grown = make_aug(region=Region("object", grow=1)), make_aug(region=Region("background", grow=1)), make_aug(region=Region("object", grow=2))
    keys = {obj.cache_key(digest, 1, 0, e1), obj.cache_key(digest, 1, 0, e2), back.cache_key(digest, 1, 0, e1),
            grown.cache_key(digest, 1, 0, e1), make_aug().cache_key(digest, 1, 0)}
    assert len(keys) == 5
    assert obj.variant(digest, 1, 0, e1).key == obj.cache_key(digest, 1, 0, e1)


def test_a_cache_hit_equals_the_generation(make_aug):
    aug = make_aug(**FAST, region=Region("object", grow=1))
    image, mask = random_image(7), square_mask()
    first = aug(image, mask, 2)[0]
    assert aug.cache.stats()["writes"] == 1
    again = aug(image, mask, 2)[0]
    assert aug.cache.stats()["hits"] == 1 and np.array_equal(np.asarray(first), np.asarray(again))
    other = aug(image, square_mask(box=(0, 10, 0, 10)), 2)[0]  # another mask: another entry
    assert aug.cache.stats()["writes"] == 2 and not np.array_equal(np.asarray(first), np.asarray(other))


def test_precompute_fills_what_the_transform_reads(make_aug):
    data = [(random_image(i), square_mask(box=(i, 20, 4, 24)), i % 3) for i in range(3)]
    aug = make_aug(num_inference_steps=4, strength=(0.5, 1.0), num_variants=2, region=Region("background", grow=1))
    counts = aug.precompute(data, progress=False)
    assert counts["generated"] == 6 and counts["failures"] == []
    reader = make_aug(num_inference_steps=4, strength=(0.5, 1.0), num_variants=2, region=Region("background", grow=1), on_miss="error")
    for image, mask, label in data:
        out = reader(image, mask, label)[0]
        assert not changed(out, image)[mask.numpy().astype(bool)].any()
    assert aug.precompute(data, progress=False)["skipped"] == 6


def test_missing_mask_is_an_error_or_a_whole_edit(make_aug):
    with pytest.raises(ValueError, match="region='object' needs a tv_tensors.Mask or BoundingBoxes"):
        make_aug(**FAST, region="object")(random_image(0), 1)
    lenient, plain = make_aug(**FAST, region=Region("object", on_missing="all")), make_aug(**FAST)
    image = random_image(0)
    torch.manual_seed(1)
    a = lenient(image, 1)[0]
    torch.manual_seed(1)
    b = plain(image, 1)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.warns(UserWarning, match="precompute skipped 1 unreadable item"):
        counts = make_aug(**FAST, region="object").precompute([(image, 1)], progress=False)
    assert counts["generated"] == 0 and "needs a tv_tensors.Mask" in counts["failures"][0][1]


@pytest.mark.parametrize("mask, region, message", [
    (square_mask(16, 32), "object", r"mask must have the image's size \(H, W\) = \(32, 32\), got a mask of shape \(16, 32\)"),
    (tv_tensors.Mask(torch.zeros(32, 32, dtype=torch.uint8)), "object", "region='object' has nothing to edit: the mask is empty"),
    (tv_tensors.Mask(torch.ones(32, 32, dtype=torch.uint8)), "background", "region='background' has nothing to edit"),
    (tv_tensors.Mask(torch.full((32, 32), 255, dtype=torch.uint8)), "object", r"mask must be binary \(0/1 or bool\), got value 255"),
])
def test_bad_masks_are_clear_errors(make_aug, mask, region, message):
    aug = make_aug(**{**FAST, "p": 1e-9}, region=region)  # checked even when the sample is not replaced
    with pytest.raises(ValueError, match=message):
        aug(random_image(0), mask, 1)
    assert list(aug.cache.keys()) == []


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(region="inside"), ValueError, r"region must be one of \('all', 'object', 'background'\), got 'inside'"),
    (dict(region="Object"), ValueError, r"region must be one of .*got 'Object'"),
    (dict(region=1), TypeError, "region must be one of .* or a Region, got int"),
])
def test_bad_region_arguments(make_aug, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_aug(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(grow=-1), ValueError, "grow must be an int >= 0 .pixels., got -1"),
    (dict(grow=1.5), TypeError, "grow must be an int .pixels., got float: 1.5"),
    (dict(on_missing="skip"), ValueError, r"on_missing must be one of \('error', 'all'\), got 'skip'"),
    (dict(where="inside"), ValueError, r"region must be one of \('all', 'object', 'background'\), got 'inside'"),
])
def test_bad_region_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        Region(**kwargs)


def test_diffuse_masks_mixes_masked_and_plain_samples(tiny_pipe):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    m = np.zeros((32, 32), bool)
    m[8:20, 5:25] = True
    kw = dict(num_inference_steps=4, guidance_scale=2.0)
    out = diffuse(tiny_pipe, images, ["a cat"] * 3, [0.5, 1.0, 0.5], [1, 2, 3], masks=[m, m, None], **kw)
    for o, real in zip(out[:2], images):
        assert np.array_equal(o[~m], real[~m]) and changed(o, real)[m].all()
    assert np.array_equal(out[2], diffuse(tiny_pipe, images[2:], ["a cat"], [0.5], [3], **kw)[0])
    again = diffuse(tiny_pipe, images, ["a cat"] * 3, [0.5, 1.0, 0.5], [1, 2, 3], masks=[m, m, None], **kw)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))
    with pytest.raises(ValueError, match=r"masks\[0\] must be a bool array of the image's size \(32, 32\)"):
        diffuse(tiny_pipe, images[:1], ["a"], [0.5], [1], masks=[m[:8]], **kw)


def test_an_inpainting_checkpoint_uses_its_own_9_channel_unet(tmp_path):
    """A loaded inpainting pipeline (9-channel UNet) is used as it is; pixels outside the region stay real."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from dafusion_aug.testing import tiny_components

    comps = tiny_components(0)
    torch.manual_seed(0)
    comps["unet"] = UNet2DConditionModel(**{**comps["unet"].config, "in_channels": 9}).eval()
    pipe = StableDiffusionInpaintPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert inpaint_pipeline(pipe) is pipe
    folder = tmp_path / "inpainting-model"
    pipe.save_pretrained(folder, safe_serialization=True)
    image, mask = random_image(2), square_mask()
    edit = edit_mask(mask.numpy().astype(bool), "object", 1)
    # a loaded inpainting pipeline, and a model folder of one (loaded as img2img, its 9-channel UNet then inpaints)
    for source in (pipe, PipelineSpec(folder)):
        aug = DiffusionAugment(source, class_names=["a", "b"], region=Region("object", grow=1), **FAST)
        diff = changed(aug(image, mask, 0)[0], image)
        assert not diff[~edit].any() and diff[edit].mean() > 0.5
        assert aug.pipeline().unet.config.in_channels == 9


def test_a_ray_row_carries_the_edit_masks_and_the_filter_counts(make_aug, tiny_folder):
    """The Ray backend's row of a batch (what actors receive) keeps each variant's edit mask; the actor's
    generation pastes the real pixels back and reports the filter's counts (no Ray needed: the actor is a class)."""
    from dafusion_aug import PipelineSpec
    from dafusion_aug._ray import RayBatchGenerator, batch_row

    aug = make_aug(**FAST, pipeline=PipelineSpec(tiny_folder), region=Region("object", grow=0),
                   filter=lambda images, labels: [True] * len(images))
    image, mask = np.asarray(random_image(4)), square_mask()
    edit = aug.edit_masks((Image.fromarray(image), mask, 1))[0]
    var = aug.variant(image_digest(image), 1, 0, edit)
    row = batch_row([(image, var, 1)])
    out = RayBatchGenerator(aug)({k: [v] for k, v in row.items()})
    assert int(out["written"][0]) == 1 and int(out["accepted"][0]) == 1
    made = aug.cache.get(var.key)
    assert np.array_equal(made[~edit], image[~edit]) and changed(made, image)[edit].any()


def test_an_inpainting_checkpoint_refuses_unmasked_samples():
    """A 9-channel UNet only edits masked regions: an unmasked sample is a clear error, not a shape error."""
    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    from dafusion_aug.testing import tiny_components

    comps = tiny_components(0)
    comps["unet"] = UNet2DConditionModel(**{**comps["unet"].config, "in_channels": 9}).eval()
    pipe = StableDiffusionImg2ImgPipeline(**comps, requires_safety_checker=False)
    with pytest.raises(ValueError, match="inpainting checkpoint .* needs a mask"):
        diffuse(pipe, [np.asarray(random_image(0))], ["a"], [0.5], [0], num_inference_steps=2)
