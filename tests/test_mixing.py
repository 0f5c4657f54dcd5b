"""Inter-class edits with soft labels (issue 32, Diff-Mix): the formula, the target draw, the transform's
labels as v2.MixUp returns them, the cache and its readers, masks, the manifest, refusals, the protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, random_image, ray_matches_local
from torch.utils.data import default_collate
from torchvision import tv_tensors

from dafusion_aug import DiffusionAugment, OtherClass, Region, precompute
from dafusion_aug.fewshot.classifier import batch_targets
from dafusion_aug.hashing import image_digest
from dafusion_aug.mixing import mix_labels, one_hot, target_class

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(class_names=CLASS_NAMES, num_inference_steps=4, guidance_scale=2.0, num_variants=4, p=1.0,
          strength=(0.25, 0.5, 1.0), prompt="a photo of a {name}")


def _digest(image) -> str:
    return image_digest(np.asarray(image))


# -- the formula and the draw -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.8, 0.5, 1.0, 2.0])
def test_soft_labels_follow_the_formula_and_sum_to_one(gamma):
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = mix_labels(2, 0, s, 5, gamma)
        assert y.dtype == torch.float32 and y.shape == (5,)
        assert y[2].item() == pytest.approx(1 - s**gamma, abs=1e-7) and y[0].item() == pytest.approx(s**gamma, abs=1e-7)
        assert y[[1, 3, 4]].abs().sum() == 0 and y.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(mix_labels(1, 3, 0.0, 4), one_hot(1, 4))
    for bad in [dict(label=4), dict(target=-1), dict(strength=1.5)]:
        args = dict(label=1, target=2, strength=0.5, num_classes=4) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            mix_labels(**args)


def test_the_target_is_another_class_drawn_evenly_and_stably():
    for label in range(4):
        drawn = [target_class(0, "ab" * 32, label, v, 4) for v in range(300)]
        assert label not in drawn and set(drawn) == set(range(4)) - {label}
        assert min(np.bincount(drawn, minlength=4)[[c for c in range(4) if c != label]]) > 70  # about 100 each
        assert drawn == [target_class(0, "ab" * 32, label, v, 4) for v in range(300)]
    assert [target_class(1, "ab" * 32, 0, v, 4) for v in range(50)] != [target_class(0, "ab" * 32, 0, v, 4) for v in range(50)]


# -- the transform -------------------------------------------------------------------------------------------------
def test_a_variant_is_drawn_with_the_target_class_prompt_and_labelled_softly(tiny_pipe, tmp_path):
    aug = DiffusionAugment(tiny_pipe, target="other-class", cache=tmp_path / "c", **KW)
    image = random_image(0)
    torch.manual_seed(0)
    out, label = aug(image, 1)
    assert out is not image and label.dtype == torch.float32 and label.shape == (3,)
    v = next(v for v in range(aug.num_variants) if np.array_equal(np.asarray(out), aug.cache.get(aug.cache_key(_digest(image), 1, v))))
    j, s = aug.mix(_digest(image), 1, v)
    assert j != 1 and s in KW["strength"] and torch.equal(label, mix_labels(1, j, s, 3, 0.8))
    var = aug.variant(_digest(image), 1, v)
    assert var.target == j and var.prompt == f"a photo of a {CLASS_NAMES[j]}" and var.strength == s
    # a gamma of the caller's own changes only the label, not the pixels or the key
    other = DiffusionAugment(tiny_pipe, target=OtherClass(label_gamma=0.5), cache=tmp_path / "c", on_miss="error", **KW)
    assert other.fingerprint() == aug.fingerprint()
    torch.manual_seed(0)
    out2, label2 = other(image, 1)
    assert np.array_equal(np.asarray(out2), np.asarray(out)) and torch.equal(label2, mix_labels(1, j, s, 3, 0.5))
    # same-class variants are other entries
    assert DiffusionAugment(tiny_pipe, **KW).fingerprint() != aug.fingerprint()


def test_real_samples_keep_a_one_hot_label_and_batches_collate_like_mixup(tiny_pipe, tmp_path):
    aug = DiffusionAugment(tiny_pipe, target="other-class", cache=tmp_path / "c", **{**KW, "p": 0.5})
    images = [random_image(i) for i in range(6)]
    torch.manual_seed(3)
    samples = [aug(im, i % 3) for i, im in enumerate(images)]
    replaced = [out is not im for (out, _), im in zip(samples, images)]
    assert any(replaced) and not all(replaced)
    for (_, y), r, i in zip(samples, replaced, range(6)):
        assert y.shape == (3,) and y.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.equal(y, one_hot(i % 3, 3)) != r  # a variant's label is mixed (strength > 0), a real one is not
    batch = default_collate([(torch.from_numpy(np.array(o)).permute(2, 0, 1), y) for o, y in samples])
    assert batch[1].shape == (6, 3) and batch[1].dtype == torch.float32
    never = DiffusionAugment(tiny_pipe, target="other-class", **{**KW, "p": 0.0})
    im, y = never(images[0], 2)
    assert im is images[0] and torch.equal(y, one_hot(2, 3))  # p=0 still gives the batch one label type


def test_batched_tensors_and_dict_samples(tiny_pipe, tmp_path):
    aug = DiffusionAugment(tiny_pipe, target="other-class", cache=tmp_path / "c", **KW)
    x = torch.stack([torch.from_numpy(np.array(random_image(i))).permute(2, 0, 1) for i in range(3)])
    torch.manual_seed(0)
    out, y = aug(x, torch.tensor([0, 1, 2]))
    assert out.shape == x.shape and y.shape == (3, 3) and torch.allclose(y.sum(1), torch.ones(3))
    assert all(y[i, i] < 1 for i in range(3))  # p=1: every picture was replaced
    sample = aug({"image": tv_tensors.Image(x[0]), "label": 2, "index": 7})
    assert sample["label"].shape == (3,) and sample["index"] == 7 and sample["label"][2] < 1


def test_precompute_masks_and_the_manifest(tiny_pipe, tmp_path):
    aug = DiffusionAugment(tiny_pipe, target="other-class", cache=tmp_path / "c", region=Region("object", grow=0), **KW)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = True
    items = [(random_image(i), tv_tensors.Mask(mask), i % 3) for i in range(3)]
    result = precompute(aug, items, batch_size=4, progress=False, out=tmp_path / "export")
    assert result["generated"] == 3 * aug.num_variants
    records = [json.loads(line) for line in (tmp_path / "export" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 3 * aug.num_variants
    for r in records:
        assert r["target"] != r["label"] and r["target_class_name"] == CLASS_NAMES[r["target"]]
        assert r["soft_label"] == pytest.approx(mix_labels(r["label"], r["target"], r["strength"], 3).tolist())
        assert r["prompt"] == f"a photo of a {CLASS_NAMES[r['target']]}"
    reader = DiffusionAugment(tiny_pipe, target="other-class", cache=tmp_path / "c", region=Region("object", grow=0),
                              on_miss="error", **KW)
    torch.manual_seed(0)
    out, m, y = reader(*items[1])
    real = np.asarray(items[1][0])
    assert np.array_equal(np.asarray(out)[~mask.numpy()], real[~mask.numpy()]) and y[1] < 1 and m is items[1][1]


@pytest.mark.slow
def test_ray_backend_makes_the_same_inter_class_variants(tiny_folder, tmp_path):
    pytest.importorskip("ray")
    assert ray_matches_local(tiny_folder, tmp_path, n_items=3, concurrency=1, target="other-class")["generated"] == 6


# -- refusals: clear, before any work, nothing cached ---------------------------------------------------------------
def test_bad_targets_are_refused_before_any_work(tiny_pipe, tmp_path):
    cache = tmp_path / "c"
    kw = {k: v for k, v in KW.items() if k != "class_names"}
    with pytest.raises(ValueError, match="at least 2 classes.*1 class"):
        DiffusionAugment(tiny_pipe, class_names=["cat"], target="other-class", cache=cache, **kw)
    with pytest.raises(ValueError, match="at least 2 classes.*no class names"):
        DiffusionAugment(tiny_pipe, target="other-class", cache=cache, **{**kw, "prompt": lambda name, label: f"a {name}"})
    with pytest.raises(ValueError, match="target must be one of"):
        DiffusionAugment(tiny_pipe, target="another-class", **KW)
    with pytest.raises(TypeError, match="target must be one of.*int"):
        DiffusionAugment(tiny_pipe, target=3, **KW)
    with pytest.raises(ValueError, match="label_gamma"):
        OtherClass(label_gamma=0)
    with pytest.raises(ValueError, match="names no class"):
        DiffusionAugment(tiny_pipe, target="other-class", **{**KW, "prompt": "a photo"})
    with pytest.raises(ValueError, match="filter"):
        DiffusionAugment(tiny_pipe, target="other-class", filter=lambda ims, ys: [True] * len(ims), **KW)
    aug = DiffusionAugment(tiny_pipe, target="other-class", cache=cache, **KW)
    with pytest.raises(ValueError, match="needs every image's label"):
        aug(random_image(0), None)
    with pytest.raises(TypeError, match="got a list"):
        aug(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), [0, 1])
    with pytest.raises(ValueError, match="not a leaf of the sample"):
        DiffusionAugment(tiny_pipe, target="other-class", labels_getter=lambda s: 1, **KW)((random_image(0), 7))
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_soft_targets_of_a_training_batch():
    real = torch.tensor([0, 2, 1])
    assert batch_targets([0, 2, 1], real, 3) is real  # no soft label: the classes, as the baseline trains
    rows = batch_targets([one_hot(0, 3), mix_labels(2, 1, 0.5, 3), 1], real, 3)
    assert rows.shape == (3, 3) and torch.equal(rows[2], one_hot(1, 3)) and torch.equal(rows[1], mix_labels(2, 1, 0.5, 3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        batch_targets([torch.ones(4) / 4, 0, 1], real, 3)


# -- the protocol ------------------------------------------------------------------------------------------------
def test_protocol_runs_the_lora_methods(tiny_pipe, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from dafusion_aug.data import ImageList
    from dafusion_aug.fewshot import run_fewshot, small_cnn

    names = ["cat", "dog", "zebra"]  # words of the tiny tokenizer (class-name initialisation)
    data = ImageList([(random_image(10 * c + i), c) for c in range(3) for i in range(4)], names)
    kw = dict(shots=[1], seeds=[0], num_variants=2, num_inference_steps=4, fit_steps=3, lora_rank=2,
              classifier=small_cnn(steps=4, batch_size=4), progress=False)
    methods = ["baseline", "da-fusion", "da-fusion-lora", "diff-mix", "diff-mix-no-lora"]
    res = run_fewshot(tiny_pipe, data, out=tmp_path / "run", methods=methods, **kw)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == set(methods)
    assert rows["diff-mix-no-lora"]["tokens"] == rows["da-fusion"]["tokens"] and "-lora-" not in rows["da-fusion"]["tokens"]
    assert rows["diff-mix"]["synthetic_share"] > 0 and rows["diff-mix"]["tokens"] == rows["da-fusion-lora"]["tokens"]
    assert "-lora-" in rows["diff-mix"]["tokens"]
    assert len(list((tmp_path / "run" / "tokens").glob("*.lora.safetensors"))) == 1  # one fit for both methods
    for method in ("diff-mix", "diff-mix-no-lora"):
        with pytest.raises(ValueError, match="erase=True"):
            run_fewshot(tiny_pipe, data, out=tmp_path / "x", methods=[method], erase=True, **kw)
    with pytest.raises(ValueError, match="lora_rank"):
        run_fewshot(tiny_pipe, data, out=tmp_path / "x", methods=["da-fusion-lora"], **{**kw, "lora_rank": 0})
