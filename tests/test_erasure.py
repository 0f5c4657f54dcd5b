"""The erasure file (:mod:`dafusion_aug.erasure`) as the transform and ``PipelineSpec`` meet it: bad files and
files trained on another base model. ``Erasure`` itself and ``erase_concept``: test_erase.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CLASS_NAMES, FAST, random_image, with_header_length
from PIL import Image

from dafusion_aug import DiffusionAugment, Erasure, PipelineSpec, load_pipeline
from dafusion_aug.errors import ErasureFileError
from dafusion_aug.testing import tiny_pipeline


def test_erasure_files_bad_or_for_another_model(tiny_pipe, tmp_path):
    """Erasure.load of pickles/torn files and apply on another base: test_erase.py::test_bad_files_refused,
    test_erase.py::test_base_mismatch. Here: the same files reaching DiffusionAugment and PipelineSpec."""
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    other = tiny_pipeline(seed=1)
    value = dict(other.unet.named_parameters())[name].detach()
    from dafusion_aug.erasure import base_digests

    base_dtype, digests = base_digests({name: value})
    foreign = Erasure({name: value * 0.5}, concepts="zebra", base_dtype=base_dtype, base_digests=digests).save(tmp_path / "other.safetensors")
    common = dict(class_names=CLASS_NAMES, cache=tmp_path / "c", **FAST)
    aug = DiffusionAugment(tiny_pipe, class_erasures={"zebra": str(foreign)}, **common)
    before = dict(tiny_pipe.unet.named_parameters())[name].detach().clone()
    with pytest.raises(ErasureFileError, match="trained on another base model"):
        aug(random_image(0), "zebra")
    assert torch.equal(dict(tiny_pipe.unet.named_parameters())[name], before) and list(aug.cache.keys()) == []
    out, _ = aug(random_image(0), "cat")  # classes without an erasure still work
    assert isinstance(out, Image.Image)
    pkl = tmp_path / "erasure.safetensors"
    torch.save({name: value}, pkl)
    with pytest.raises(ErasureFileError, match="pickle"):
        DiffusionAugment(tiny_pipe, class_erasures={"zebra": str(pkl)}, **common)


def test_spec_erasure_for_another_model_fails_at_load(tiny_folder, tmp_path):
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    value = dict(tiny_pipeline(seed=1).unet.named_parameters())[name].detach()
    from dafusion_aug.erasure import base_digests

    base_dtype, digests = base_digests({name: value})
    path = Erasure({name: value}, concepts="zebra", base_dtype=base_dtype, base_digests=digests).save(tmp_path / "e.safetensors")
    with pytest.raises(ErasureFileError, match="another base model"):
        load_pipeline(PipelineSpec(str(tiny_folder), device="cpu", erasure=str(path)))


def test_erasure_files_of_every_header_length_load(tmp_path):
    """Every first byte of a safetensors file (its header length's low byte), 0x80 included, loads. Issue 15
    found 2 of 64 erasure files refused as pickles before the fix of issue 13."""
    path = tmp_path / "erasure.safetensors"
    seen = set()
    for k in range(1, 400):
        erasure = Erasure({"a.weight": torch.full((2, 2), float(k))}, concepts="z" * k)
        erasure.save(path)
        if path.read_bytes()[0] in seen:
            continue
        seen.add(path.read_bytes()[0])
        back = Erasure.load(path)
        assert back.content_hash() == erasure.content_hash() and list(back.concepts) == ["z" * k]
    assert seen == set(range(0, 256, 8))
    for low in range(256):
        erasure.save(path)
        with_header_length(path, 2048 + low)
        assert path.read_bytes()[0] == low and Erasure.load(path).content_hash() == erasure.content_hash()
