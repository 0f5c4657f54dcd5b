"""Hardening (issue 8): bad input, faults, untrusted files and security, in one process.

Each test is a row of the table in docs/reliability.md; rows already covered elsewhere point at that test.
Multi-process cases (DataLoader workers, kill -9) live in test_reliability_processes.py.
"""

from __future__ import annotations

import builtins
import errno
import os
import pickle
import re
import socket
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, random_image
from PIL import Image
from test_generate import FakeHalfPipe

import dafusion_aug
from dafusion_aug import (
    AugmentationCache,
    ClassTokens,
    DiffusionAugment,
    Erasure,
    PipelineSpec,
    load_pipeline,
    precompute,
)
from dafusion_aug.data import ImageList
from dafusion_aug.errors import CacheError, ErasureFileError, PipelineError, TokenFileError
from dafusion_aug.testing import tiny_pipeline

FAST = dict(num_inference_steps=2, strength=1.0, num_variants=1, p=1.0)
PACKAGE = Path(dafusion_aug.__file__).parent


def ours(caught, pattern: str) -> list[str]:
    """The RuntimeWarnings of dafusion-aug among ``caught`` that match ``pattern``."""
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and re.search(pattern, str(w.message))]


# -- images ------------------------------------------------------------------------------------------
def _mode_image(mode: str, size=(40, 24)) -> Image.Image:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 4096, (size[1], size[0])).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((size[1], size[0]), dtype=np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("mode", ["LA", "P", "PA", "1", "I", "I;16", "F", "CMYK", "YCbCr"])
def test_pil_modes_come_back_in_their_mode_and_size(make_aug, mode):
    """L and RGBA: test_transform.py::test_output_matches_input_type_size_dtype_range."""
    img = _mode_image(mode)
    assert img.mode == mode
    out, label = make_aug(**FAST)(img, 1)
    assert isinstance(out, Image.Image) and out is not img and label == 1
    assert out.mode == mode and out.size == img.size
    if mode in ("LA", "PA"):  # alpha is kept as it was
        assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(img.getchannel("A")))
    if mode == "I;16":
        assert np.asarray(out).dtype == np.uint16


@pytest.mark.parametrize("mode", ["I;16B", "RGBX", "RGBa"])
def test_unhandled_pil_modes_are_refused_by_name(make_aug, mode):
    img = Image.new(mode, (8, 8))
    with pytest.raises(ValueError, match=f"PIL mode '{re.escape(mode)}'.*convert it to 'RGB'"):
        make_aug(**FAST)(img, 0)


def test_one_pixel_images(make_aug):
    aug = make_aug(**FAST)
    out, _ = aug(Image.fromarray(np.full((1, 1, 3), 200, np.uint8)), 0)
    assert out.size == (1, 1)
    t = torch.rand(3, 1, 1)
    assert aug(t, 0)[0].shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"at least 1x1, got shape \(3, 0, 8\)"):
        aug(torch.rand(3, 0, 8), 0)


def test_4000x3000_photo_round_trips_and_hits_the_cache(make_aug):
    aug = make_aug(**FAST)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    first, _ = aug(big, 2)  # generated at the tiny model's 32x32, resized back
    assert first.size == (4000, 3000) and first.mode == "RGB"
    second, _ = aug(big, 2)
    assert aug.cache.stats()["hits"] == 1 and np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize(
    "x",
    [
        torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8),
        torch.rand(2, 3, 20, 30),
        torch.rand(3, 20, 30).half(),
        torch.rand(3, 20, 30).bfloat16(),
    ],
    ids=["uint8-batch", "float-batch", "float16", "bfloat16"],
)
def test_tensor_batches_and_low_precision_floats(make_aug, x):
    """uint8/float32/float64 CHW, 1 and 4 channels: test_transform.py::test_output_matches_input_type_size_dtype_range."""
    labels = torch.tensor([0, 2]) if x.ndim == 4 else 1
    out, back = make_aug(**FAST)(x, labels)
    assert back is labels and out.shape == x.shape and out.dtype == x.dtype
    if x.is_floating_point():
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.rand(3, 8, 8) - 0.5, r"image is a float tensor, so its values must be in \[0, 1\], got range \[-"),
        (torch.rand(3, 8, 8) * 255, r"must be in \[0, 1\], got range"),
        (torch.full((3, 8, 8), float("inf")), "image must hold finite values, got NaN or inf"),
        (torch.stack([torch.rand(3, 8, 8), torch.full((3, 8, 8), float("nan"))]), r"image\[1\] must hold finite values"),
        (torch.stack([torch.rand(3, 8, 8), torch.rand(3, 8, 8) * 2]), r"image\[1\] is a float tensor"),
        (torch.zeros(3, 8, 8, dtype=torch.bool), "uint8 or floating-point tensor, got dtype torch.bool"),
        (torch.zeros(20, 30, 3, dtype=torch.uint8), r"1, 3 or 4 channels \(C, H, W\), got shape \(20, 30, 3\)"),
        (torch.rand(8, 8), r"\(C, H, W\) / \(B, C, H, W\) tensor, got a tensor of shape \(8, 8\)"),
        (torch.rand(1, 2, 3, 8, 8), r"got a tensor of shape \(1, 2, 3, 8, 8\)"),
        (np.zeros((8, 8, 3), np.uint8), r"got a numpy array of shape \(8, 8, 3\)"),
    ],
    ids=["negative", "0-255-float", "inf", "nan-in-batch", "range-in-batch", "bool", "hwc", "2d", "5d", "numpy"],
)
def test_bad_image_values_and_shapes_name_the_argument(make_aug, x, match):
    """NaN, x2 range, 2 channels, int32: test_transform.py::test_bad_samples_name_the_problem."""
    labels = torch.tensor([0, 1]) if isinstance(x, torch.Tensor) and x.ndim == 4 else 0
    with pytest.raises((ValueError, TypeError), match=match):
        make_aug(**FAST)(x, labels)


def test_samples_without_arrays_pass_through(make_aug):
    aug = make_aug(**FAST)
    sample = {"text": "no picture here", "label": 0, "ids": torch.arange(5)}
    assert aug(sample) is sample


# -- labels ------------------------------------------------------------------------------------------
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


# -- prompts -----------------------------------------------------------------------------------------
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


# -- token and erasure files -------------------------------------------------------------------------
def _token_file(tmp_path: Path, dim: int = 32) -> Path:
    return ClassTokens(CLASS_NAMES, [torch.randn(1, dim) for _ in CLASS_NAMES]).save(tmp_path / "tokens.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "junk", "pickle", "empty"])
def test_bad_token_file_fails_at_construction(make_aug, tmp_path, damage):
    """ClassTokens.load itself: test_tokens.py::test_load_rejects_bad_files / test_load_rejects_truncated_file."""
    path = _token_file(tmp_path)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) - 9])
    elif damage == "junk":
        path.write_bytes(os.urandom(len(good)))
    elif damage == "pickle":
        torch.save({"<cat>": torch.randn(32)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(TokenFileError, match="tokens.safetensors"):
        make_aug(**FAST, tokens=str(path), class_names=None)


def test_token_dimension_mismatch_is_refused_before_generating(make_aug, fresh_pipe, tmp_path):
    aug = make_aug(**FAST, pipeline=fresh_pipe, tokens=str(_token_file(tmp_path, dim=16)), class_names=None)
    size = len(fresh_pipe.tokenizer)
    with pytest.raises(TokenFileError, match="dim 16 but the text encoder's embeddings have dim 32"):
        aug(random_image(0), 0)
    assert len(fresh_pipe.tokenizer) == size and list(aug.cache.keys()) == []


@pytest.mark.parametrize("token", ["photo", "Photo", "zebra"])
def test_tokens_that_are_vocabulary_words_are_refused(fresh_pipe, token):
    """Exact vocabulary entries ('photo</w>'): test_tokens.py::test_apply_refuses_vocabulary_words_and_wrong_dim."""
    size = len(fresh_pipe.tokenizer)
    before = fresh_pipe.tokenizer.tokenize("a photo of a cat")
    with pytest.raises(TokenFileError, match="is a word of the tokenizer's vocabulary"):
        ClassTokens(["x"], [torch.randn(1, 32)], tokens=[token]).apply(fresh_pipe)
    assert len(fresh_pipe.tokenizer) == size and fresh_pipe.tokenizer.tokenize("a photo of a cat") == before


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


def test_corrupt_model_folder_is_a_pipeline_error(tiny_folder, tmp_path):
    """A folder of .bin pickles: test_pipeline.py::test_only_safetensors_are_loaded."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="could not load an img2img pipeline from folder"):
        load_pipeline(PipelineSpec(str(folder), device="cpu"))


# -- the cache folder and the disk -------------------------------------------------------------------
def test_unwritable_cache_fails_at_construction(make_aug, tmp_path, monkeypatch):
    """A path under a regular file: also test_cache.py::test_unwritable_root_fails_at_construction."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="not a writable folder"):
        make_aug(**FAST, cache=blocker / "cache")

    def denied(*args, **kwargs):  # root ignores chmod: simulate a read-only mount instead
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(CacheError, match="not a writable folder.*Permission denied"):
        make_aug(**FAST, cache=tmp_path / "ro")


def _full_disk(monkeypatch, root: Path, how: str, after: int = 0) -> None:
    """Make writes under ``root`` fail with ENOSPC after ``after`` successful ones: at the rename into place,
    or half-way through writing the temporary file (whether it is opened with ``open`` or ``os.fdopen``)."""
    state = {"left": after}
    lock = threading.Lock()  # precompute writes from a thread pool
    root = str(root)

    def room() -> bool:
        with lock:
            state["left"] -= 1
            return state["left"] >= 0

    if how == "replace":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).startswith(root) and not room():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
        return

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def close(self):
            self.f.close()

        def write(self, data):
            if not room():
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

    real_open, real_fdopen = builtins.open, os.fdopen

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return HalfWriter(f) if "w" in mode and isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(root) else f

    def fake_fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        return HalfWriter(f) if "w" in mode and os.readlink(f"/proc/self/fd/{fd}").startswith(root) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    return sorted(root.rglob("*.webp")), sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))


@pytest.mark.parametrize("how", ["replace", "write"])
def test_full_disk_during_training_warns_once_and_keeps_the_generated_image(make_aug, monkeypatch, tmp_path, how):
    aug = make_aug(**FAST, cache=tmp_path / "c")
    reference = make_aug(**FAST, cache=None)
    _full_disk(monkeypatch, aug.cache.root, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            img = random_image(i)
            out, _ = aug(img, i)
            assert np.array_equal(np.asarray(out), np.asarray(reference(img, i)[0]))  # generated, not the real image
    found = ours(caught, "disk is full.*not cached")
    assert len(found) == 1, ours(caught, ".")
    assert _files(aug.cache.root) == ([], [])  # nothing half-written


@pytest.mark.parametrize("how", ["replace", "write"])
def test_full_disk_stops_precompute_with_only_whole_files(make_aug, monkeypatch, tmp_path, how):
    """CacheError from put itself: test_precompute.py::test_full_disk_stops_with_a_clear_error."""
    aug = make_aug(num_inference_steps=2, strength=1.0, num_variants=2, cache=tmp_path / "c")
    items = ImageList([(random_image(i), i % 3) for i in range(4)])
    _full_disk(monkeypatch, aug.cache.root, how, after=3)
    with pytest.raises(CacheError, match="disk is full"):
        precompute(aug, items, batch_size=4, encode_threads=2, progress=False)
    monkeypatch.undo()
    pngs, tmps = _files(aug.cache.root)
    assert tmps == [] and len(pngs) == 3
    assert all(aug.cache.get(p.stem) is not None for p in pngs)
    again = precompute(aug, items, batch_size=4, progress=False)  # space freed: the rerun completes
    assert again["generated"] == 8 - 3 and again["skipped"] == 3
    assert len(_files(aug.cache.root)[0]) == 8


def test_read_only_cache_in_training_warns_once(make_aug, tmp_path):
    AugmentationCache(tmp_path / "shared")
    aug = make_aug(**FAST, cache=AugmentationCache(tmp_path / "shared", read_only=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2):
            out, _ = aug(random_image(i), i)
            assert isinstance(out, Image.Image)
    assert len(ours(caught, "read-only.*not cached")) == 1


# -- numerics ----------------------------------------------------------------------------------------
class FakeBlackHalfPipe(FakeHalfPipe):
    """An fp16 pipeline whose first output of each call is all black (an fp16 VAE overflow)."""

    def __call__(self, **kw):
        self.calls.append((self.half, len(kw["prompt"])))
        out = self.pipe(**kw)
        if self.half or self.bad_in_fp32:
            out.images[0] = 0.0
        return out


def test_black_output_is_redone_in_fp32_and_the_fp32_result_cached(tiny_pipe, tmp_path):
    """NaN outputs: test_generate.py::test_nan_outputs_are_redone_in_fp32."""
    fake = FakeBlackHalfPipe(tiny_pipe)
    common = dict(class_names=CLASS_NAMES, **FAST)
    aug = DiffusionAugment(fake, cache=tmp_path / "c", **common)
    reference = DiffusionAugment(tiny_pipe, cache=None, **common)
    img = random_image(0)
    out, _ = aug(img, 1)
    assert fake.calls == [(True, 1), (False, 1)] and fake.half
    assert np.array_equal(np.asarray(out), np.asarray(reference(img, 1)[0]))
    (key,) = aug.cache.keys()
    assert np.array_equal(aug.cache.get(key), np.asarray(out))


def test_bad_outputs_in_a_batch_keep_their_real_image_and_warn_once(tiny_pipe, tmp_path):
    """One bad single sample: test_generate.py::test_outputs_bad_even_in_fp32_are_never_cached."""
    fake = FakeBlackHalfPipe(tiny_pipe, bad_in_fp32=True)
    aug = DiffusionAugment(fake, class_names=CLASS_NAMES, cache=tmp_path / "c", **FAST)
    x = torch.rand(3, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = aug(x, torch.tensor([0, 1, 2]))
        again, _ = aug(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert len(ours(caught, "NaN or black")) == 1
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1]) and not torch.equal(out[2], x[2])
    assert len(list(aug.cache.keys())) == 2 + 1  # never the black ones


# -- security ----------------------------------------------------------------------------------------
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


def test_tokens_that_differ_only_in_case_export_to_distinct_folders(tmp_path):
    tokens = ClassTokens(["a", "b"], [torch.randn(1, 32), torch.randn(1, 32)], tokens=["<A>", "<a>"])
    paths = tokens.export_diffusers(tmp_path)
    assert len(set(paths)) == 2
    for token, path in zip(tokens.tokens, paths):
        assert ClassTokens.load(path).tokens == [token]


def test_fit_checkpoints_never_use_class_names(tmp_path):
    from dafusion_aug import fit_tokens

    names = ["../../evil", "nul\x00byte", "y" * 5000]
    items = [(random_image(i), i % 3) for i in range(3)]
    ckpt = tmp_path / "ckpt"
    fit_tokens(tiny_pipeline(seed=0), items, names, initializer="a", steps=2, batch_size=3, checkpoint_dir=ckpt, checkpoint_every=1, progress=False)
    assert {p.name for p in ckpt.iterdir()} <= {f"checkpoint-{s:08d}.{e}" for s in (1, 2) for e in ("json", "safetensors")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _package_sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return files


def test_no_remote_code_anywhere():
    offenders = [str(p.relative_to(PACKAGE)) for p in _package_sources() if "trust_remote_code" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_no_pickle_loads():
    unsafe = re.compile(r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bdill\.loads?\(|\bjoblib\.load\(|allow_pickle\s*=\s*True|\bmarshal\.loads?\(")
    torch_load = re.compile(r"\btorch\.load\((?P<args>[^)]*)\)")
    offenders = []
    for path in _package_sources():
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.name}: {m.group(0)}" for m in unsafe.finditer(text)]
        offenders += [f"{path.name}: {m.group(0)}" for m in torch_load.finditer(text) if "weights_only=True" not in m.group("args")]
    assert offenders == []


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE is set as well)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_only_for_hub_ids(no_network, tiny_folder, tmp_path):
    with pytest.raises(PipelineError, match="could not load an img2img pipeline from Hub id 'nobody/nothing'"):
        load_pipeline(PipelineSpec("nobody/nothing", local_files_only=True, device="cpu", scheduler="pndm"))
    for bad in ("my_model", str(tmp_path / "missing"), "./model", "a/b/c"):
        with pytest.raises(PipelineError, match="neither a model folder nor a Hub id"):
            load_pipeline(PipelineSpec(bad, device="cpu"))
    pipe = load_pipeline(PipelineSpec(str(tiny_folder), device="cpu", scheduler="euler-a"))  # local: no Hub call at all
    assert pipe is not None


def test_transform_pickle_holds_no_code_or_weights(make_aug):
    blob = pickle.dumps(make_aug(**FAST))
    assert len(blob) < 100_000  # the loaded pipeline is never pickled
