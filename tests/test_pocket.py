"""Tests of the pocket model, its data and its judge (CPU, offline, a few seconds each)."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from dafusion_aug import pocket  # noqa: E402
from dafusion_aug.pocket import CLASS_NAMES, digits, judge, judge_images, model_path, split_indices  # noqa: E402
from dafusion_aug.pocket import data as pocket_data  # noqa: E402


@pytest.fixture(scope="module")
def pipes():
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    torch.set_num_threads(2)
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(model_path())
    img2img.set_progress_bar_config(disable=True)
    txt2img = StableDiffusionPipeline(**img2img.components)
    txt2img.set_progress_bar_config(disable=True)
    return img2img, txt2img


@pytest.fixture(scope="module")
def part_b():
    return digits("B").tensors()


# --- data ---------------------------------------------------------------------------------------------


def test_digits_items_and_attributes():
    ds = digits("A")
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert isinstance(label, int) and label == ds.targets[0]
    assert (
        ds.class_names
        == list(CLASS_NAMES)
        == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    assert isinstance(ds.targets, list) and len(ds.targets) == len(ds)
    array = np.asarray(image)
    assert array.dtype == np.uint8 and array.max() > 200 and array[0, 0, 0] < 30  # white digit on black
    assert ds[-1][1] == ds.targets[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError):
        digits("C")


def test_digits_split_is_stratified_disjoint_and_deterministic():
    a, b = digits("A"), digits("B")
    assert len(a) + len(b) == 1797
    assert not set(a.indices) & set(b.indices)
    assert sorted(a.indices + b.indices) == list(range(1797))
    ca, cb = Counter(a.targets), Counter(b.targets)
    assert set(ca) == set(cb) == set(range(10))
    assert all(0 <= ca[k] - cb[k] <= 1 for k in range(10))
    again = digits("A")
    assert again.indices == a.indices and again.targets == a.targets
    assert np.array_equal(np.asarray(again[5][0]), np.asarray(a[5][0]))
    other_a, _ = split_indices(np.asarray(a.targets + b.targets), seed=1)
    assert len(other_a) == len(a)


def test_tensors_match_items():
    ds = digits("B")
    x, y = ds.tensors()
    assert x.shape == (len(ds), 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == ds.targets
    assert torch.allclose(x[3], torch.from_numpy(np.array(ds[3][0])).permute(2, 0, 1).float() / 255)


def test_missing_sklearn_names_the_extra(monkeypatch):
    pocket_data._raw.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match=r'pip install "dafusion-aug\[pocket\]"'):
            digits("A")
    finally:
        monkeypatch.undo()
        pocket_data._raw.cache_clear()


# --- judge --------------------------------------------------------------------------------------------


def test_judge_accuracy_on_part_b(part_b):
    x, y = part_b
    net = judge()
    assert not net.training
    logits = net(x[:4])
    assert logits.shape == (4, 10)
    accuracy = float((judge_images(x, model=net) == y).float().mean())
    assert accuracy >= 0.97, accuracy


def test_judge_images_accepts_pil_uint8_and_float():
    ds = digits("B")
    pils = [ds[i][0] for i in range(8)]
    x, _ = ds.tensors()
    from_pil = judge_images(pils)
    assert from_pil.dtype == torch.long and from_pil.shape == (8,)
    assert torch.equal(from_pil, judge_images(x[:8]))
    assert torch.equal(from_pil, judge_images((x[:8] * 255).round().to(torch.uint8)))
    assert judge_images(pils[0]).shape == (1,)


def test_judge_file_is_safetensors_only():
    path = pocket.JUDGE_FILE
    assert path.suffix == ".safetensors" and path.is_file()
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    json.loads(path.read_bytes()[8 : 8 + header_len])  # a safetensors header, not a pickle


# --- model --------------------------------------------------------------------------------------------


def test_model_path_and_layout(pipes):
    img2img, _ = pipes
    folder = model_path()
    assert (folder / "model_index.json").is_file()
    assert img2img.unet.dtype == img2img.vae.dtype == img2img.text_encoder.dtype == torch.float32
    assert img2img.vae_scale_factor == 4 and img2img.unet.config.sample_size == 8
    assert any(name.endswith("attn2.to_k") for name, _ in img2img.unet.named_modules())
    cfg = img2img.scheduler.config
    assert type(img2img.scheduler).__name__ == "DDIMScheduler"
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert cfg.clip_sample is False and cfg.set_alpha_to_one is False and cfg.steps_offset == 1
    tok = img2img.tokenizer
    assert len(tok.tokenize("a photo of a handwritten digit seven")) == 7
    assert tok.tokenize("zebra")  # unknown words fall back to characters


def test_weights_are_small():
    files = list(model_path().rglob("*.safetensors")) + [pocket.JUDGE_FILE]
    assert not list(model_path().rglob("*.bin")) and not list(model_path().rglob("*.pkl"))
    assert sum(f.stat().st_size for f in files) <= 30 * 1024 * 1024  # the package-data budget (issue 14)


def test_model_path_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(pocket, "_MODEL_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dafusion_aug.pocket.train"):
        pocket.model_path()


def test_loads_with_explicit_float32():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_path(), torch_dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32


def test_img2img_keeps_the_class(pipes):
    img2img, _ = pipes
    ds = digits("B")
    picks = [ds.targets.index(k) for k in range(10)]
    images = [ds[i][0] for i in picks]
    out = img2img(
        [pocket.prompt(k) for k in range(10)],
        image=images,
        strength=0.5,
        num_inference_steps=20,
        generator=[torch.Generator().manual_seed(k) for k in range(10)],
    ).images
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) for im in out)
    assert any(np.asarray(a).tolist() != np.asarray(b).tolist() for a, b in zip(images, out))
    kept = (judge_images(out) == torch.arange(10)).sum().item()
    assert kept >= 8, kept


def test_txt2img_draws_the_prompted_digit(pipes):
    _, txt2img = pipes
    labels = [3] * 8 + [7] * 8
    out = txt2img(
        [pocket.prompt(k) for k in labels],
        num_inference_steps=20,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(i) for i in range(len(labels))],
        output_type="pt",
    ).images
    assert out.shape == (16, 3, 32, 32)
    correct = (judge_images(out) == torch.tensor(labels)).sum().item()
    assert correct >= 13, correct


@pytest.mark.slow
def test_quick_training_writes_a_loadable_model(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    from dafusion_aug.pocket.train import main

    assert main(["--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "model")
    assert pipe.unet.dtype == torch.float32
    assert judge(tmp_path / "judge.safetensors")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["config"]["unet_steps"] == 5 and report["weights_bytes"] > 0


# --- attributes and captions (v2) ---------------------------------------------------------------------


def _canvas() -> np.ndarray:
    return np.zeros((32, 32), dtype=np.float32)


def test_attributes_measure_shapes_they_are_told():
    from dafusion_aug.pocket import attributes

    ring, eight, bar, slash, thick, top = (_canvas() for _ in range(6))
    yy, xx = np.mgrid[0:32, 0:32]
    r = np.hypot(yy - 16, xx - 16)
    ring[(r > 7) & (r < 11)] = 1.0
    for cy in (9, 23):
        rr = np.hypot(yy - cy, xx - 16)
        eight[(rr > 3) & (rr < 7)] = 1.0
    bar[2:30, 14:18] = 1.0
    thick[2:30, 10:22] = 1.0
    for y in range(2, 30):  # "/": the top is to the right
        x = 8 + (30 - y) * 16 // 28
        slash[y, x : x + 4] = 1.0
    top[2:12, 8:24] = 1.0
    top[12:30, 15:17] = 1.0
    m = attributes.measure(np.stack([ring, eight, bar, slash, thick, top, _canvas()]))
    assert m["loop"].tolist() == [1, 2, 0, 0, 0, 0, 0]
    assert abs(m["slant"][2]) < 1e-6 and m["slant"][3] > 0.3
    assert m["weight"][4] > m["weight"][2] > 0
    assert m["width"][2] == 4 and m["width"][4] == 12
    assert m["balance"][5] < m["balance"][0] - 5  # the T's ink sits high, the ring's in the middle
    lv = attributes.levels(m)
    assert lv["loop"].tolist() == [1, 2, 0, 0, 0, 0, -1] and lv["width"][2] == 0 and lv["slant"][3] == 2
    assert np.isnan(m["weight"][6]) and lv["weight"][6] == -1  # no ink: no level
    with pytest.raises(ValueError, match="images must be"):
        attributes.measure(np.zeros(5))


def test_attribute_thresholds_are_part_a_terciles():
    from dafusion_aug.pocket import attributes

    x, _ = digits("A").tensors()
    lv = attributes.levels(attributes.measure(x))
    for name in ("weight", "slant", "balance"):
        shares = np.bincount(lv[name], minlength=3) / len(x)
        assert np.all(np.abs(shares - 1 / 3) < 0.05), (name, shares)


def test_attribute_captions_name_only_what_is_measured():
    import random

    from dafusion_aug.pocket import arch, attributes

    rng = random.Random(0)
    level = {"weight": 2, "slant": 0, "width": 1, "balance": 2, "loop": 1}
    allowed = {"bold", "left-leaning", "bottom-heavy", "with a loop"}
    others = set(attributes.attribute_words()) - allowed
    for _ in range(200):
        text = arch.attribute_caption(level, 6, rng)
        assert "six" in text and any(w in text for w in allowed), text
        assert not any(f" {w} " in f" {text} " for w in others if w != "regular"), text
        assert "six" not in arch.attribute_caption(level, None, rng)
    drawn = [arch.sample_caption(6, rng, level) for _ in range(2000)]
    with_attributes = sum(any(w in t for w in allowed) for t in drawn) / len(drawn)
    assert 0.4 < with_attributes < 0.6  # P_CLASS_ATTRIBUTES + P_ATTRIBUTES_ONLY
    assert all(not any(w in t for w in allowed) for t in (arch.sample_caption(6, rng) for _ in range(200)))


def test_attribute_words_are_whole_tokens():
    from dafusion_aug.pocket import arch, attributes

    tok = arch.build_tokenizer()
    for word in attributes.attribute_words():
        for piece in word.replace("-", " - ").split():
            assert len(tok.tokenize(piece)) == 1, piece
    assert tok.model_max_length == arch.MAX_LENGTH


def test_shipped_model_is_v2(pipes):
    """The shipped weights are the v2 architecture, and its tokenizer knows every attribute word."""
    from dafusion_aug.pocket import arch, attributes

    img2img, _ = pipes
    cfg = img2img.text_encoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (arch.TEXT_WIDTH, arch.TEXT_LAYERS)
    assert img2img.unet.config.cross_attention_dim == arch.TEXT_WIDTH
    assert img2img.tokenizer.model_max_length == arch.MAX_LENGTH
    assert json.loads((model_path().parent / "training.json").read_text())["pocket_version"] == 2
    for word in attributes.attribute_words():
        for piece in word.replace("-", " - ").split():
            assert len(img2img.tokenizer.tokenize(piece)) == 1, piece


def test_v1_tokens_and_caches_are_refused_or_missed(tmp_path):
    """A token file made for pocket v1 (64-wide text encoder) is refused with "another model"; a cache
    entry made with other weights is never served, because the model's fingerprint is in every key."""
    import shutil

    from dafusion_aug import ClassTokens, DiffusionAugment, PipelineSpec, TokenFileError

    v1 = ClassTokens(list(CLASS_NAMES), [torch.full((1, 64), float(c)) for c in range(10)], metadata={"base_model": "pocket-v1"})
    v1.save(tmp_path / "v1.safetensors")
    image, label = digits("B")[0]
    with pytest.raises(TokenFileError, match="another model"):
        DiffusionAugment("pocket", tokens=tmp_path / "v1.safetensors", p=1.0, cache=tmp_path / "cache")(image, label)

    # pocket v1's fingerprint, recorded before v2 replaced it: the shipped model must not be v1
    assert PipelineSpec("pocket").fingerprint() != "3b6cb95cd90a1695a5507e9c432160a14ed6a2a35a530a87c8fcbd0f67a15cdf"
    other = tmp_path / "other-model"
    shutil.copytree(model_path(), other)
    weights = next((other / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: another model
    weights.write_bytes(bytes(data))
    kwargs = dict(class_names=list(CLASS_NAMES), p=1.0, cache=tmp_path / "cache")
    ours, theirs = DiffusionAugment("pocket", **kwargs), DiffusionAugment(PipelineSpec(str(other)), **kwargs)
    digest = "0" * 64
    key_ours, key_theirs = ours.cache_key(digest, label, 0), theirs.cache_key(digest, label, 0)
    assert key_ours != key_theirs
    theirs.cache.put(key_theirs, np.asarray(image))
    assert theirs.cache.get(key_theirs) is not None and ours.cache.get(key_ours) is None


def test_demo_erasures_preserve_every_attribute_word():
    """The demo's erasure recipe keeps exactly the prompts the attribute check uses, one per word."""
    from dafusion_aug.fewshot import ERASURE_SETTINGS
    from dafusion_aug.pocket import attributes
    from dafusion_aug.pocket.evaluate import attribute_prompts

    expected = [attribute_prompts(name, level, None) for name in attributes.ATTRIBUTES
                for level, word in enumerate(attributes.WORDS[name]) if word is not None]
    assert list(ERASURE_SETTINGS["preserve"]) == expected
    assert ERASURE_SETTINGS["preserve_others"] is True
    for word in attributes.attribute_words():
        assert any(word in p for p in expected), word
