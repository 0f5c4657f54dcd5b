"""Generation at scale: export with manifest, NaN/black fall-back, OOM back-off, per-class erasures,
kill -9 resumption and the Ray Data backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, FAST, ours, random_image, ray_matches_local

from dafusion_aug import AugmentationCache, DiffusionAugment, diffuse, precompute
from dafusion_aug.data import ImageList
from dafusion_aug.hashing import image_digest


def test_export_writes_image_folder_and_manifest(make_aug, tmp_path):
    aug = make_aug(num_variants=2, class_names=["a/../b", "ok"])
    items = ImageList([(random_image(0), 0), (random_image(1), 1)])
    out = tmp_path / "export"
    res = precompute(aug, items, out=out, progress=False)
    assert res["exported"] == 4
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {r["file"].split("/")[0] for r in rows} == {"000-a-b", "001-ok"}  # class names never raw in paths
    for r in rows:
        assert (out / r["file"]).is_file()
        assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(out / r["file"])), aug.cache.get(r["key"]))
        assert set(r) >= {"source", "label", "variant", "strength", "seed", "prompt", "key"}
    again = precompute(aug, items, out=out, progress=False)
    assert again["generated"] == 0 and again["exported"] == 4


class FakeHalfPipe:
    """Looks like an fp16 pipeline whose outputs are NaN until it runs in float32."""

    def __init__(self, pipe, bad_in_fp32=False):
        self.pipe = pipe
        self.half = True
        self.bad_in_fp32 = bad_in_fp32
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    class _U:
        def __init__(self, outer):
            self.outer = outer
            self.config = outer.pipe.unet.config

        @property
        def dtype(self):
            return torch.float16 if self.outer.half else torch.float32

    @property
    def unet(self):
        return self._U(self)

    @property
    def vae_scale_factor(self):
        return self.pipe.vae_scale_factor

    def to(self, dtype):
        self.half = dtype != torch.float32
        return self

    def __call__(self, **kw):
        self.calls.append((self.half, len(kw["prompt"])))
        out = self.pipe(**kw)
        if self.half or self.bad_in_fp32:
            out.images[0] = float("nan")
        return out


def test_nan_outputs_are_redone_in_fp32(tiny_pipe):
    fake = FakeHalfPipe(tiny_pipe)
    imgs = [np.zeros((32, 32, 3), np.uint8)] * 3
    # a wrapper is called as a pipeline (per-strength path), so it is compared with that path
    ref = diffuse(tiny_pipe, imgs, ["a"] * 3, 0.5, [1, 2, 3], num_inference_steps=4, mixed_strengths=False)
    out = diffuse(fake, imgs, ["a"] * 3, 0.5, [1, 2, 3], num_inference_steps=4)
    assert fake.calls == [(True, 3), (False, 1)] and fake.half  # only the bad sample, then back to fp16
    assert np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[1])


def test_outputs_bad_even_in_fp32_are_never_cached(tiny_pipe, tmp_path):
    fake = FakeHalfPipe(tiny_pipe, bad_in_fp32=True)
    aug = DiffusionAugment(fake, class_names=CLASS_NAMES, strength=0.5, num_inference_steps=4, num_variants=1, p=1.0, cache=tmp_path / "c")
    img = random_image(0)
    with pytest.warns(RuntimeWarning, match="NaN or black"):
        out, _ = aug(img, 0)
    assert out is img and list(aug.cache.keys()) == []
    res = precompute(aug, [(img, 0), (random_image(1), 1)], batch_size=2, progress=False)
    assert res["bad_outputs"] == 1 and res["generated"] == 1


class OOMPipe:
    def __init__(self, pipe, limit):
        self.pipe, self.limit, self.sizes = pipe, limit, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kw):
        self.sizes.append(len(kw["prompt"]))
        if len(kw["prompt"]) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(**kw)


def test_batch_size_auto_backs_off_on_out_of_memory(tiny_pipe, tmp_path):
    oom = OOMPipe(tiny_pipe, limit=3)
    aug = DiffusionAugment(oom, class_names=CLASS_NAMES, strength=0.5, num_inference_steps=4, num_variants=4, p=1.0, cache=tmp_path / "c")
    res = precompute(aug, [(random_image(i), 0) for i in range(4)], batch_size="auto", progress=False)
    assert res["generated"] == 16 and res["batch_size"] == 2
    assert max(s for s in oom.sizes[oom.sizes.index(2):]) <= 2
    with pytest.raises(torch.cuda.OutOfMemoryError):
        precompute(DiffusionAugment(OOMPipe(tiny_pipe, 0), class_names=CLASS_NAMES, strength=0.5, num_inference_steps=4,
                                    num_variants=1, p=1.0, cache=tmp_path / "d"), [(random_image(0), 0)], batch_size="auto", progress=False)


def test_class_erasures_generate_each_class_with_its_own_model(tiny_pipe, tmp_path):
    from dafusion_aug.erase import Erasure

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    original = dict(tiny_pipe.unet.named_parameters())[name].detach().clone()
    erasure = Erasure({name: torch.randn_like(original) * 3}, concepts="zebra")
    path = erasure.save(tmp_path / "zebra.safetensors")
    common = dict(class_names=CLASS_NAMES, strength=1.0, num_inference_steps=4, guidance_scale=3.0, num_variants=1, p=1.0)
    plain = DiffusionAugment(tiny_pipe, cache=None, **common)
    erased = DiffusionAugment(tiny_pipe, cache=tmp_path / "c", class_erasures={"zebra": str(path)}, **common)
    assert plain.fingerprint() != erased.fingerprint()
    imgs = [np.asarray(random_image(i)) for i in range(2)]
    for label in (0, 2):
        var_p = plain.variant(image_digest(imgs[0]), label, 0)
        var_e = erased.variant(image_digest(imgs[0]), label, 0)._replace(key=var_p.key)
        a = plain.generate([imgs[0]], [var_p])[0]
        b = erased.generate([imgs[0]], [var_e], [label])[0]
        assert np.array_equal(a, b) == (label != 2)  # only the erased class changes
    assert torch.equal(dict(tiny_pipe.unet.named_parameters())[name], original)  # restored after use
    res = precompute(erased, [(random_image(0), 0), (random_image(1), 2), (random_image(2), 1)], batch_size=4, progress=False)
    assert res["generated"] == 3
    assert torch.equal(dict(tiny_pipe.unet.named_parameters())[name], original)
    with pytest.raises(ValueError, match="horse"):
        DiffusionAugment(tiny_pipe, class_erasures={"horse": erasure}, **common)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from PIL import Image
    from dafusion_aug import DiffusionAugment, PipelineSpec, precompute
    folder, cache = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    items = [(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), i % 3) for i in range(12)]
    aug = DiffusionAugment(PipelineSpec(folder, device="cpu"), class_names=["cat", "golden retriever", "zebra"],
                           num_inference_steps=6, num_variants=4, p=1.0, cache=cache)
    print(precompute(aug, items, batch_size=2, progress=False)["generated"], flush=True)
    """
)


def test_kill_9_leaves_no_corrupt_entry_and_the_rerun_completes(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_folder), str(cache)], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(cache.rglob("*.webp"))) < 6:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = AugmentationCache(cache)
    before = list(store.keys())
    assert 6 <= len(before) < 48
    assert all(store.get(k) is not None for k in before)  # only whole files are visible
    out = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tiny_folder), str(cache)], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == 48 - len(before)
    assert len(list(store.keys())) == 48 and not list(cache.rglob("*.tmp"))


@pytest.mark.slow
def test_ray_backend_matches_local(tiny_folder, tmp_path):
    pytest.importorskip("ray", reason='the Ray backend needs pip install "dafusion-aug[ray]"')
    res = ray_matches_local(tiny_folder, tmp_path, n_items=4, concurrency=2)
    assert res["generated"] == 8 and res["ray_actors"] == 2


def test_ray_missing_names_the_extra(make_aug, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"dafusion-aug\[ray\]"):
        precompute(make_aug(), [(random_image(0), 0)], backend="ray", progress=False)


# -- bad outputs of low-precision pipelines (issue 8) ----------------------------------------------------
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
