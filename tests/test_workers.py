"""Processes and DataLoader workers: determinism across processes, shared caches, fork and spawn."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, random_image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from dafusion_aug import AugmentationCache, AugmentedDataset, DiffusionAugment, PipelineSpec
from dafusion_aug.data import ImageList

SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, numpy as np, torch
    from dafusion_aug import DiffusionAugment, PipelineSpec
    from dafusion_aug.data import ImageList
    from PIL import Image
    folder, cache = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    aug = DiffusionAugment(PipelineSpec(folder, device="cpu"), class_names=["cat", "golden retriever", "zebra"],
                           num_inference_steps=4, guidance_scale=2.0, num_variants=2, p=1.0,
                           cache=None if cache == "-" else cache)
    if cache == "-":
        torch.manual_seed(0)
        h = hashlib.sha256()
        for i, img in enumerate(images):
            out, _ = aug(img, i)
            h.update(np.asarray(out).tobytes())
        print(h.hexdigest())
    else:
        aug.precompute(ImageList([(im, i) for i, im in enumerate(images)]), batch_size=2, progress=False)
    """
)


def _images():
    rng = np.random.default_rng(0)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]


def _aug(folder, cache, **kw):
    return DiffusionAugment(
        PipelineSpec(str(folder), device="cpu"),
        class_names=CLASS_NAMES,
        num_inference_steps=4,
        guidance_scale=2.0,
        num_variants=2,
        p=1.0,
        cache=cache,
        **kw,
    )


def test_same_seed_same_pixels_in_another_process(tiny_folder):
    import hashlib

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the same sums as this process
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_folder), "-"], capture_output=True, text=True, check=True, env=env)
    aug = _aug(tiny_folder, None)
    torch.manual_seed(0)
    h = hashlib.sha256()
    for i, img in enumerate(_images()):
        res, _ = aug(img, i)
        h.update(np.asarray(res).tobytes())
    assert out.stdout.strip() == h.hexdigest()


def test_two_processes_filling_one_cache_leave_only_whole_files(tiny_folder, tmp_path):
    cache = tmp_path / "shared"
    # the same thread count as this process (conftest's), or batched sums may round apart by a grey level
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_folder), str(cache)], env=env) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    store = AugmentationCache(cache)
    keys = list(store.keys())
    assert len(keys) == 3 * 2
    assert all(store.get(k) is not None for k in keys)
    assert not list(cache.rglob("*.tmp"))
    # Every entry equals this process's precompute with the same batching (bit for bit), and a variant
    # generated alone differs from its batched twin by float rounding only (see docs/design.md).
    aug = _aug(tiny_folder, tmp_path / "here")
    aug.precompute(ImageList([(im, i) for i, im in enumerate(_images())]), batch_size=2, progress=False)
    from dafusion_aug.hashing import image_digest

    for i, img in enumerate(_images()):
        arr = np.asarray(img)
        for v in range(2):
            var = aug.variant(image_digest(arr), i, v)
            assert np.array_equal(store.get(var.key), aug.cache.get(var.key))
            alone = aug.generate([arr], [var])[0].astype(int)
            assert np.abs(alone - store.get(var.key)).max() <= 3


class LoadedProbe:
    """A dataset that reports how many pipelines its worker process has loaded."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import os

        from dafusion_aug import pipeline

        image, label = self.inner[i]
        # pipelines loaded by this very process (a forked worker also inherits its parent's)
        return image, label, sum(1 for key in pipeline._LOADED if key[2] == os.getpid())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_generate(tiny_folder, tmp_path, context):
    items = [(random_image(i), i % 3) for i in range(4)]
    aug = _aug(tiny_folder, tmp_path / "c")
    ds = AugmentedDataset(ImageList(items), aug, transform=v2.PILToTensor())
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context)
    torch.manual_seed(0)
    batches = list(loader)
    assert sum(len(b[0]) for b in batches) == 4
    assert len(list(aug.cache.keys())) >= 1  # the workers wrote into the shared cache
    originals = torch.stack([v2.functional.pil_to_tensor(im) for im, _ in items])
    got = torch.cat([b[0] for b in batches])
    assert not any(torch.equal(g, o) for g, o in zip(got, originals))  # p=1: every sample replaced


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_on_miss_real_workers_never_load_a_model(tiny_folder, tmp_path, context):
    items = [(random_image(i), i % 3) for i in range(4)]
    aug = _aug(tiny_folder, tmp_path / "empty", on_miss="real")
    ds = LoadedProbe(AugmentedDataset(ImageList(items), aug, transform=v2.PILToTensor()))
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context)
    for _images, _labels, loaded in loader:
        assert loaded.tolist() == [0, 0]
    assert list(aug.cache.keys()) == []


def test_workers_read_what_precompute_wrote(tiny_folder, tmp_path):
    items = [(random_image(i), i % 3) for i in range(3)]
    filler = _aug(tiny_folder, tmp_path / "c")
    counts = filler.precompute(ImageList(items), batch_size=4, progress=False)
    assert counts["generated"] == 6
    reader = _aug(tiny_folder, tmp_path / "c", on_miss="error")
    ds = LoadedProbe(AugmentedDataset(ImageList(items), reader, transform=v2.PILToTensor()))
    for _, _, loaded in DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="spawn"):
        assert loaded.tolist() == [0, 0, 0]


# -- threads (issue 15, item 3) --------------------------------------------------------------------------
def test_threads_calling_one_transform_with_class_erasures(fresh_pipe, monkeypatch):
    """Two threads share one transform (and so one pipeline) whose zebra class is erased. Generation holds the
    pipeline's lock from token and erasure application to restore, so every output is the one a single thread
    makes and the pipeline ends restored. Before, 4 runs in 5 generated some outputs under the other class's
    erasure and left the pipeline erased, or raised a spurious ErasureFileError or a tensor-size error. The
    UNet is slowed down so that the threads overlap on every call."""
    import threading
    import time

    from dafusion_aug import Erasure
    from dafusion_aug.erasure import base_digests

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    original = dict(fresh_pipe.unet.named_parameters())[name].detach().clone()
    dtype, digests = base_digests({name: original})
    erasure = Erasure({name: torch.randn_like(original) * 3}, concepts="zebra", base_dtype=dtype, base_digests=digests)
    aug = DiffusionAugment(fresh_pipe, class_names=CLASS_NAMES, class_erasures={"zebra": erasure}, strength=1.0,
                           num_inference_steps=3, guidance_scale=2.0, num_variants=1, p=1.0, cache=None)
    jobs = [(random_image(i), 2 if i % 2 else 0) for i in range(12)]
    expected = [np.asarray(aug(image, label)[0]) for image, label in jobs]  # one thread
    assert torch.equal(dict(fresh_pipe.unet.named_parameters())[name], original)

    forward = fresh_pipe.unet.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.005)  # releases the GIL: the other thread runs in between
        return forward(*args, **kwargs)

    monkeypatch.setattr(fresh_pipe.unet, "forward", slow_forward)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(indices):
        try:
            for i in indices:
                results[i] = np.asarray(aug(*jobs[i])[0])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(range(k, 12, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wrong = [i for i in range(12) if not np.array_equal(results[i], expected[i])]
    assert not wrong, f"outputs {wrong} were generated under another class's model"
    assert torch.equal(dict(fresh_pipe.unet.named_parameters())[name], original) and Erasure.active(fresh_pipe) is None
