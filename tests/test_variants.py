"""The variant plan (:mod:`dafusion_aug.variants`): prompts, strengths, seeds, cache keys and fingerprints.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import FAST, ours, random_image

from dafusion_aug.hashing import image_digest
from dafusion_aug.variants import (
    DEFAULT_STRENGTHS,
    cache_key,
    generation_fingerprint,
    variant_seed,
    variant_strength,
)

# Computed with the code before the reorganisation (issue 13); pure hashing, the same on every machine.
GOLDEN = {
    "digest": "8e7a8dc0372f3def0f5e8547d8029f3d70dfe35db6db552aa45c28dd11efb2d5",
    "key": "a683b5142b095681c9f87172cd68629408f634988bc7e5f4c10f6bc0933603f6",
    "key_unlabelled": "a089e0c7967d7cc2f07c22bbb6c45d5dcd8c55492657433ee63454c432d43dbd",
    "seed": 2885419976310194828,
    "strengths": [1.0, 0.25, 0.75, 0.5, 0.25, 0.5],
    "fingerprint": "5449874cfde02be00e6b342b26cb0dcd03e71754ed7ee2acff28e4b1a18ae187",
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
                                resolution=None, class_erasures={})
    assert fp == GOLDEN["fingerprint"]


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
