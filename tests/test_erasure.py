"""The erasure file (:mod:`dafusion_aug.erasure`) as the transform and ``PipelineSpec`` meet it: bad files and
files trained on another base model. ``Erasure`` itself and ``erase_concept``: test_erase.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, FAST, random_image, with_header_length
from hypothesis import given, settings
from hypothesis import strategies as st
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


# -- property: any erasure file round-trips (issue 15) -----------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
PROMPT = st.text(min_size=1, max_size=16).filter(str.strip)


@st.composite
def erasures(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    names = draw(st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=4, unique=True))
    tensors = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
        count = int(np.prod(shape))
        values = draw(st.lists(st.floats(-1e4, 1e4, width=16, allow_nan=False), min_size=count, max_size=count))
        tensors[name] = torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype)
    concepts = draw(st.dictionaries(PROMPT, st.lists(PROMPT, min_size=1, max_size=3), min_size=1, max_size=3))
    digests = draw(st.dictionaries(st.sampled_from(["float32", "float16", "bfloat16"]), st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)))
    return Erasure(tensors, concepts=concepts, method=draw(st.sampled_from(["esd-x", "esd-u", "custom"])), base_dtype=str(dtype).removeprefix("torch."),
                   base_digests=digests, base_model=draw(st.none() | st.text(min_size=1, max_size=16)),
                   metadata=draw(st.dictionaries(st.text(max_size=8), JSON, max_size=3)))


@settings(max_examples=60, deadline=None)
@given(erasure=erasures())
def test_any_erasure_file_round_trips(tmp_path_factory, erasure):
    """Any parameter names, shapes, float dtypes and values (bitwise), concepts and JSON metadata: what save()
    writes, load() reads back the same, whatever the header length (so whatever the file's first byte)."""
    back = Erasure.load(erasure.save(tmp_path_factory.mktemp("prop") / "erasure.safetensors"))
    assert back.content_hash() == erasure.content_hash() and back.tensors.keys() == erasure.tensors.keys()
    assert all(back.tensors[n].dtype == t.dtype and torch.equal(back.tensors[n], t) for n, t in erasure.tensors.items())
    assert (back.concepts, back.method, back.base_dtype, back.base_digests, back.base_model) == \
        (erasure.concepts, erasure.method, erasure.base_dtype, erasure.base_digests, erasure.base_model)
    assert back.metadata == json.loads(json.dumps(erasure.metadata))


# -- issue 33 (item 3): a header declaring huge tensors is refused before any data is read -----------------
NAME = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
ERASURE_META = {"format": "pt", "dafusion_format": "dafusion-aug/erasure/1", "concepts": '{"zebra": ["zebra"]}'}


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({NAME: ("F32", (1, 2**29))}, rf"'{NAME}' of shape \(1, 536870912\) F32 \(2.0 GiB\): it may have at most 134,217,728 "
                                      r"elements, got 536,870,912"),
        ({NAME: ("F32", (1, 2**31))}, rf"'{NAME}' of shape \(1, 2147483648\) F32 \(8.0 GiB\): it may have at most 134,217,728 "),
        ({f"{NAME}.{i}": ("F32", (2**27,)) for i in range(33)},
         r"33 tensors of 16.5 GiB in all \(the largest .* F32 \(512.0 MiB\)\), over the limit of 16.0 GiB"),
        ({NAME: ("F32", (1, 1, 1, 1, 8))}, r"its number of dimensions must be one of \[0, 1, 2, 3, 4\], got 5"),
        ({NAME: ("I64", (8, 8))}, r"each must be a floating-point tensor \(BF16, F16, F32, F64\), got I64"),
    ],
    ids=["2^29", "2^31", "16.5-GiB-in-all", "rank-5", "int64"],
)
def test_an_erasure_file_declaring_huge_tensors_is_refused_unread(tmp_path, monkeypatch, tensors, match):
    """A sparse file whose header declares a 1 x 2**29 float32 tensor took 14-78 s and 8 GB to load (1 x 2**31:
    a bare MemoryError); no UNet parameter has over 2**27 elements, no UNet is over 16 GiB in float32."""
    from test_io import forbid_tensor_reads, write_sparse_safetensors

    path = write_sparse_safetensors(tmp_path / "e.safetensors", tensors, ERASURE_META)
    forbid_tensor_reads(monkeypatch)
    with pytest.raises(ErasureFileError, match=rf"erasure file '{path}' declares .*{match}.*; refused before reading any tensor data"):
        Erasure.load(path)
