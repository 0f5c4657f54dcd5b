"""The variant plan (:mod:`dafusion_aug.variants`): prompts, strengths, seeds, cache keys and fingerprints.
"""

from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest
from conftest import FAST, ours, random_image
from PIL import Image

from dafusion_aug.hashing import image_digest
from dafusion_aug.variants import (
    CACHE_FORMAT_VERSION,
    DEFAULT_STRENGTHS,
    cache_key,
    generation_fingerprint,
    variant_seed,
    variant_strength,
)

# Pure hashing, the same on every machine. digest, seed and strengths: computed with the code before the
# reorganisation (issue 13). key, key_unlabelled and fingerprint: changed on purpose by issue 15 (cache format
# 2: the fingerprint covers ``seed``), computed with that code; CHANGELOG says caches are rebuilt once.
GOLDEN = {
    "digest": "8e7a8dc0372f3def0f5e8547d8029f3d70dfe35db6db552aa45c28dd11efb2d5",
    "key": "258d6dc2a52734517437f798a391e863e507586efbfbbccd3f4c23b7c2dd28b9",
    "key_unlabelled": "b9ce0d492a2139fee35b2c1c6d7af4dd8caf3174e1e4840e3c516d0d36163e3f",
    "seed": 2885419976310194828,
    "strengths": [1.0, 0.25, 0.75, 0.5, 0.25, 0.5],
    "fingerprint": "21aec6ea6b3377c3220161ef43f4ab8cb0eff20bb79dff3cd6761339ded5dd1b",
}


def test_over_long_prompt_warns_once(make_aug):
    aug = make_aug(**FAST, prompt="a photo of a {name} " * 20, cache=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            aug(random_image(i), i)
    found = ours(caught, r"tokens; the text encoder reads the first 77")
    assert len(found) == 1, found


@pytest.mark.parametrize("words, warns", [(75, False), (76, True)])
def test_prompt_length_limit_counts_start_and_end_tokens(make_aug, words, warns):
    aug = make_aug(**FAST, prompt="a " * words, class_names=None, cache=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aug(random_image(0), None)
    assert bool(ours(caught, "tokens; the text encoder")) == warns


def test_empty_prompt_generates_without_text(make_aug):
    aug = make_aug(**FAST, prompt="", class_names=None, cache=None)
    img = random_image(0)
    out, _ = aug(img, None)
    assert out.size == img.size and not np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize("returned", [[], None, 5, ["ok", 3]])
def test_prompt_callable_returning_junk_is_named(make_aug, returned):
    aug = make_aug(**FAST, prompt=lambda name, label: returned)
    with pytest.raises(TypeError, match="prompt callable must return a str or a non-empty list of str"):
        aug(random_image(0), 0)


# -- the variant plan: these values are cache keys and seeds on users' disks; they must never change ----
def test_cache_keys_and_seeds_are_stable_across_versions():
    """Golden values (pure hashing, the same on every machine): a change here silently invalidates every cache."""
    digest = image_digest(np.zeros((8, 8, 3), np.uint8))
    assert digest == GOLDEN["digest"]
    assert cache_key("f" * 64, digest, 1, 2) == GOLDEN["key"]
    assert cache_key("f" * 64, digest, None, 0) == GOLDEN["key_unlabelled"]
    assert variant_seed(0, digest, 1, 2) == GOLDEN["seed"]
    assert [variant_strength(0, digest, 1, v, DEFAULT_STRENGTHS, (0.25,) * 4) for v in range(6)] == GOLDEN["strengths"]
    fp = generation_fingerprint("model", tokens=None, class_names=["cat", "dog"], prompt="a photo of a {name}", strength=(0.5, 1.0),
                                strength_probs=(0.5, 0.5), guidance_scale=7.5, num_inference_steps=50, negative_prompt=None,
                                resolution=None, class_erasures={}, seed=0)
    assert fp == GOLDEN["fingerprint"]
    assert CACHE_FORMAT_VERSION == 2


def test_the_transform_plans_with_the_variant_functions(make_aug):
    aug = make_aug(num_variants=4, strength=(0.5, 1.0), prompt=["a {name}", "two {name}s"])
    digest = image_digest(np.zeros((8, 8, 3), np.uint8))
    for v in range(4):
        var = aug.variant(digest, 2, v)
        assert var.key == aug.cache_key(digest, 2, v) == cache_key(aug.fingerprint(), digest, 2, v)
        assert var.seed == variant_seed(aug.seed, digest, 2, v)
        assert var.strength == variant_strength(aug.seed, digest, 2, v, aug.strength, aug.strength_probs)
        assert var.prompt in ("a zebra", "two zebras")
    with pytest.raises(ValueError, match=r"v must be in \[0, 4\), got 4"):
        aug.variant(digest, 2, 4)


# -- every input of a variant is in its key (issue 15, item 2) --------------------------------------------
def test_seed_is_part_of_the_cache_key(make_aug, tmp_path):
    """Two transforms differing only in ``seed`` on one cache: before, seed=1 was served seed=0's pixels and
    ``precompute(out=)`` wrote a manifest whose seed, strength and prompt did not match the files."""
    digest = image_digest(np.zeros((8, 8, 3), np.uint8))
    a, b = make_aug(seed=0, strength=(0.5, 1.0)), make_aug(seed=1, strength=(0.5, 1.0))
    assert a.fingerprint() != b.fingerprint() and a.cache_key(digest, 0, 0) != b.cache_key(digest, 0, 0)
    data = [(random_image(i), i % 3) for i in range(2)]
    assert a.precompute(data, progress=False)["generated"] == 6
    counts = b.precompute(data, progress=False, out=tmp_path / "out")
    assert counts["generated"] == 6 and counts["skipped"] == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        image, label = data[r["index"]]
        rgb = np.asarray(image)
        var = b.variant(image_digest(rgb), label, r["variant"])
        assert (r["seed"], r["strength"], r["prompt"], r["key"]) == (var.seed, var.strength, var.prompt, var.key)
        (made,) = b.generate([rgb], [var], [label])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / r["file"]).convert("RGB")), made)


def _styled(style):
    return lambda name, label: f"{style} of a {name}"


class _Prompt:
    def __init__(self, style):
        self.style = style

    def __call__(self, name, label):
        return f"{self.style} of a {name}"


def test_prompt_callables_count_by_what_they_close_over(make_aug):
    """A prompt callable's closure values, a callable object's attributes and a partial's arguments decide
    its prompts, so they are in the key; no memory address is (before, a callable object's key differed in
    every process, and two closures over other values shared one key)."""
    assert make_aug(prompt=_styled("a photo")).fingerprint() != make_aug(prompt=_styled("a drawing")).fingerprint()
    assert make_aug(prompt=_styled("a photo")).fingerprint() == make_aug(prompt=_styled("a photo")).fingerprint()
    assert make_aug(prompt=_Prompt("a photo")).fingerprint() == make_aug(prompt=_Prompt("a photo")).fingerprint()
    assert make_aug(prompt=_Prompt("a photo")).fingerprint() != make_aug(prompt=_Prompt("a drawing")).fingerprint()

    def two(style, name, label):
        return f"{style} {name}"

    assert make_aug(prompt=functools.partial(two, "x")).fingerprint() != make_aug(prompt=functools.partial(two, "y")).fingerprint()


# -- prompt templates are format strings (issue 15, item 5) -----------------------------------------------
@pytest.mark.parametrize(
    "template, expected",
    [
        ("{name!r}", "'zebra'"),
        ("a {name:>8}", "a    zebra"),
        ("a {name!s:_<7}!", "a zebra__!"),
        ("{{style}} of a {name}", "{style} of a zebra"),
        ("{{literal}} braces", "{literal} braces"),
    ],
)
def test_templates_with_conversions_and_format_specs_are_filled(make_aug, template, expected):
    """Before, '{name!r}' and '{name:>8}' (and a template whose only braces are escaped) reached the model
    exactly as written."""
    aug = make_aug(prompt=template)
    digest = image_digest(np.zeros((8, 8, 3), np.uint8))
    assert aug.variant(digest, 2, 0).prompt == expected


@pytest.mark.parametrize("template", ["{name.upper}", "{name[0]}", "{0}", "{}", "a {name} {style}", "{name:{width}}", "a {", "b }"])
def test_templates_with_other_fields_are_refused(make_aug, template):
    with pytest.raises(ValueError, match=r"may only use the field \{name\}"):
        make_aug(prompt=template)
