"""precompute and diffuse: batching by strength, resuming, failures, and the stateless generation path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, random_image

from dafusion_aug import AugmentationCache, ClassTokens, diffuse, precompute
from dafusion_aug.data import ImageList, few_shot_indices, image_folder
from dafusion_aug.errors import CacheError


class CountingPipe:
    """Wraps a pipeline and records the strength and batch size of every call."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls.append((kwargs["strength"], len(kwargs["prompt"])))
        return self.pipe(**kwargs)


def test_precompute_fills_every_variant_in_batches_grouped_by_strength(make_aug, tiny_pipe):
    counting = CountingPipe(tiny_pipe)
    aug = make_aug(pipeline=counting, num_variants=4, strength=(0.5, 1.0))
    items = ImageList([(random_image(i), i % 3) for i in range(5)])
    result = precompute(aug, items, batch_size=3, progress=False)
    assert result["generated"] == 20 and result["skipped"] == 0 and result["failed"] == 0
    assert len(list(aug.cache.keys())) == 20
    assert all(size <= 3 for _, size in counting.calls)
    assert sum(size for _, size in counting.calls) == 20
    assert len(counting.calls) <= 20 // 3 + 2  # full batches, plus at most one partial batch per strength
    again = aug.precompute(items, batch_size=3, progress=False)
    assert again["generated"] == 0 and again["skipped"] == 20
    assert len(counting.calls) <= 20 // 3 + 2


def test_precompute_resumes_only_what_is_missing(make_aug):
    aug = make_aug(num_variants=3)
    items = ImageList([(random_image(i), 0) for i in range(3)])
    precompute(aug, items, progress=False)
    keys = sorted(aug.cache.keys())
    for k in keys[:4]:
        aug.cache.path(k).unlink()
    (aug.cache.path(keys[5]).parent / f".{keys[5][:16]}-x.tmp").write_bytes(b"half a file")
    result = precompute(aug, items, progress=False)
    assert result["generated"] == 4 and result["skipped"] == 5
    assert sorted(aug.cache.keys()) == keys
    assert not list(aug.cache.root.rglob("*.tmp"))


def test_precompute_matches_the_transform(make_aug):
    aug = make_aug(num_variants=2)
    img = random_image(3)
    precompute(aug, [(img, 1)], progress=False)
    torch.manual_seed(0)
    out, _ = aug(img, 1)
    assert aug.cache.stats()["hits"] == 1 and aug.cache.stats()["writes"] == 2
    assert any(np.array_equal(np.asarray(out), aug.cache.get(k)) for k in aug.cache.keys())


def test_unreadable_items_are_reported_and_skipped(make_aug, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    aug = make_aug(num_variants=2)
    result = precompute(aug, ImageList([(random_image(0), 0), (bad, 1)]), progress=False)
    assert result["generated"] == 2 and result["failed"] == 2
    (index, reason), = result["failures"]
    assert index == 1 and "broken.png" in reason


def test_full_disk_stops_with_a_clear_error(make_aug, monkeypatch):
    aug = make_aug(num_variants=2)

    def full(self, key, image=None, *, data=None):
        raise CacheError("cannot write cache entry: the disk is full")

    monkeypatch.setattr(AugmentationCache, "put", full)
    with pytest.raises(CacheError, match="disk is full"):
        precompute(aug, [(random_image(0), 0)], progress=False)


def test_precompute_needs_a_cache_and_a_valid_batch_size(make_aug):
    with pytest.raises(ValueError, match="cache"):
        precompute(make_aug(cache=None), [(random_image(0), 0)], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        precompute(make_aug(), [(random_image(0), 0)], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="backend"):
        precompute(make_aug(), [(random_image(0), 0)], backend="spark", progress=False)


def test_diffuse_keeps_order_sizes_and_per_sample_seeds(tiny_pipe):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(32, 32), (20, 48), (64, 16)]]
    out = diffuse(tiny_pipe, imgs, ["a cat"] * 3, [1.0, 0.5, 1.0], [1, 2, 3], num_inference_steps=4, guidance_scale=2.0)
    assert [o.shape for o in out] == [i.shape for i in imgs] and all(o.dtype == np.uint8 for o in out)
    again = diffuse(tiny_pipe, imgs, ["a cat"] * 3, [1.0, 0.5, 1.0], [1, 2, 3], num_inference_steps=4, guidance_scale=2.0)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))
    other_seed = diffuse(tiny_pipe, imgs[:1], ["a cat"], 1.0, [9], num_inference_steps=4, guidance_scale=2.0)
    assert not np.array_equal(out[0], other_seed[0])


def test_strength_changes_the_result(tiny_pipe):
    # A random VAE cannot reconstruct, so only "different" is meaningful here; the pocket model's tests
    # check that low strengths stay close to the input.
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    low, high = diffuse(tiny_pipe, [img, img], ["a cat"] * 2, [0.1, 1.0], [0, 0], num_inference_steps=20, guidance_scale=1.0)
    assert not np.array_equal(low, high)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=["a"] * 2), "same length"),
        (dict(seeds=[1, 2, 3, 4]), "same length"),
        (dict(strengths=[0.5, 0.5]), "strengths must have one entry per image"),
        (dict(strengths=0.01), "0 denoising steps"),
        (dict(negative_prompt=["x"]), "negative_prompt"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_diffuse_refuses_mismatched_lists(tiny_pipe, kwargs, match):
    imgs = [np.zeros((8, 8, 3), np.uint8)] * 3
    args = dict(images=imgs, prompts=["a"] * 3, strengths=0.5, seeds=[1, 2, 3], num_inference_steps=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        diffuse(tiny_pipe, **args)


def test_image_folder_and_few_shot(tmp_path):
    for name in ["b", "a"]:
        (tmp_path / name).mkdir()
        for i in range(3):
            random_image(i).save(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    ds = image_folder(tmp_path)
    assert ds.class_names == ["a", "b"] and len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    img, label = ds[4]
    assert img.mode == "RGB" and label == 1
    idx = few_shot_indices(ds.targets, 2, seed=0)
    assert len(idx) == 4 and idx == few_shot_indices(ds.targets, 2, seed=0)
    assert [ds.targets[i] for i in idx] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="fewer than k=4"):
        few_shot_indices(ds.targets, 4, seed=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        image_folder(tmp_path / "missing")


# -- class names never reach file paths raw (issue 8) ----------------------------------------------------
HOSTILE = ["../../evil", "/etc/passwd", "nul\x00byte", "x" * 5000, "..", "C:\\Windows\\system32"]


def _inside(root: Path, paths) -> None:
    root = root.resolve()
    for p in paths:
        rel = Path(p).resolve().relative_to(root)  # raises when a path escaped the folder
        assert all(len(part) <= 100 and "\x00" not in part for part in rel.parts), rel


@pytest.mark.filterwarnings("ignore:prompt .* tokens:RuntimeWarning")  # the 5000-letter name makes a long prompt
def test_class_names_never_reach_file_paths_raw(make_aug, tmp_path):
    tokens = ClassTokens(HOSTILE, [torch.randn(1, 32) for _ in HOSTILE])
    out = tmp_path / "export"
    paths = tokens.export_diffusers(out)
    assert len({p.parent for p in paths}) == len(HOSTILE)
    _inside(out, paths)
    _inside(out, out.rglob("*"))
    # precompute's ImageFolder export (also test_generate.py::test_export_writes_image_folder_and_manifest)
    aug = make_aug(**FAST, class_names=HOSTILE)
    folder = tmp_path / "images"
    res = precompute(aug, [(random_image(i), i) for i in range(len(HOSTILE))], out=folder, progress=False)
    assert res["exported"] == len(HOSTILE)
    _inside(folder, folder.rglob("*"))
    assert not (tmp_path / "evil").exists() and not list(tmp_path.parent.glob("evil*"))


# -- the data's classes must be the transform's ----------------------------------------------------------
def test_token_file_classes_must_match_the_data(make_aug):
    """Label i of the data must be class i of the token file, or every prompt names the wrong class.

    precompute checks it for every caller (it used to be checked by ``dafusion-aug generate`` alone).
    """
    tokens = ClassTokens(["cat", "dog", "zebra"], [torch.randn(1, 32) for _ in range(3)])
    aug = make_aug(tokens=tokens, class_names=None, num_variants=1, num_inference_steps=2, strength=1.0)
    pairs = [(random_image(i), i % 3) for i in range(3)]
    with pytest.raises(ValueError, match=r"the token file's classes \['cat', 'dog', 'zebra'\] differ from the dataset's \['cat', 'zebra', 'dog'\]"):
        precompute(aug, ImageList(pairs, ["cat", "zebra", "dog"]), progress=False)
    assert list(aug.cache.keys()) == []
    named = make_aug(num_variants=1, num_inference_steps=2, strength=1.0)  # class_names=CLASS_NAMES, no tokens
    with pytest.raises(ValueError, match=r"the transform's class_names \[.*\] differ from the dataset's"):
        precompute(named, ImageList(pairs, ["a", "b", "c"]), progress=False)
    assert precompute(aug, ImageList(pairs, ["cat", "dog", "zebra"]), progress=False)["generated"] == 3
    assert precompute(aug, pairs, progress=False)["skipped"] == 3  # data without class names: nothing to compare
