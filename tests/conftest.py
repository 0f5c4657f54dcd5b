"""Shared fixtures and helpers: every test is offline and on the CPU, built on the tiny pipeline.

Test files share helpers through this file (``from conftest import ...``) or :mod:`dafusion_aug.testing`,
never by importing another test file.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CLASS_NAMES = ["cat", "golden retriever", "zebra"]
#: Transform settings that generate fast: one variant, always replaced, two denoising steps.
FAST = dict(num_inference_steps=2, strength=1.0, num_variants=1, p=1.0)


def ours(caught, pattern: str) -> list[str]:
    """The RuntimeWarnings of dafusion-aug among ``caught`` that match ``pattern``."""
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and re.search(pattern, str(w.message))]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the cores
    (the tiny UNet is 10-20x slower with 2 threads on a busy 2-core machine). Use it for a whole module
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipe():
    from dafusion_aug.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny pipeline saved with save_pretrained: a local model folder for PipelineSpec."""
    from dafusion_aug.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory):
    """Tiny SD 2.x and SDXL pipelines saved with save_pretrained, by family (built on first use)."""
    from dafusion_aug.testing import tiny_pipeline

    made: dict[str, object] = {}

    def folder(family: str):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_pipeline(seed=0, family=family).save_pretrained(made[family], safe_serialization=True)
        return made[family]

    return folder


@pytest.fixture
def fresh_pipe():
    from dafusion_aug.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


def random_image(seed: int = 0, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def with_header_length(path, length: int) -> None:
    """Rewrite a safetensors file so that its JSON header is ``length`` bytes long (padded with spaces, which
    the format allows): how a test reaches every header length, whose low byte is a file's first byte."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].rstrip(b" ")
    if length < len(header):
        raise ValueError(f"header of {path} needs at least {len(header)} bytes, got {length}")
    header += b" " * (length - len(header))
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little") + header + data[8 + n :])


def ray_matches_local(folder, tmp_path, n_items: int, concurrency: int, **settings) -> dict:
    """Precompute ``n_items`` random images with the model folder ``folder`` twice, locally and on a local
    Ray cluster, assert both caches hold the same keys with bit-identical images, and return Ray's summary.
    ``settings`` go to both transforms (``target="other-class"``)."""
    import ray

    from dafusion_aug import DiffusionAugment, PipelineSpec, precompute

    items = [(random_image(i), i % 3) for i in range(n_items)]

    def make(cache):
        return DiffusionAugment(PipelineSpec(str(folder), device="cpu"), class_names=CLASS_NAMES, num_inference_steps=4,
                                guidance_scale=2.0, num_variants=2, p=1.0, cache=cache, **settings)

    local = make(tmp_path / "local")
    precompute(local, items, batch_size=3, progress=False)
    remote = make(tmp_path / "ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        res = precompute(remote, items, backend="ray", batch_size=3, concurrency=concurrency, progress=False)
    finally:
        ray.shutdown()
    keys = sorted(local.cache.keys())
    assert keys == sorted(remote.cache.keys())
    for k in keys:
        assert np.array_equal(local.cache.get(k), remote.cache.get(k))
    return res


def nan_redo_case(pipe, monkeypatch, imgs, prompts, strengths, seeds, **kw):
    """Run ``diffuse`` in bfloat16 with a VAE whose half-precision decode overflows on the first sample.

    Returns ``(out, fp32)``: the batch's results, and sample 0 made alone in float32 from the same
    (bfloat16-rounded) weights, which is what the redo must reproduce.
    """
    from dafusion_aug import diffuse

    pipe.to(torch.bfloat16).to(torch.float32)  # the weights the fp32 redo will see
    fp32 = diffuse(pipe, imgs[:1], prompts[:1], strengths[:1], seeds[:1], **kw)[0]
    pipe.to(torch.bfloat16)
    real = pipe.vae.decode

    def overflowing(z, *args, **kwargs):
        out = real(z, *args, **kwargs)
        if pipe.vae.dtype == torch.bfloat16:
            out[0][0] = float("nan")  # the first sample of every half-precision decode overflows
        return out

    monkeypatch.setattr(pipe.vae, "decode", overflowing)
    return diffuse(pipe, imgs, prompts, strengths, seeds, **kw), fp32


@pytest.fixture
def make_aug(tiny_pipe, tmp_path):
    """Build a DiffusionAugment on the shared tiny pipeline with fast settings."""
    from dafusion_aug import DiffusionAugment

    def make(**kwargs):
        defaults = dict(
            class_names=CLASS_NAMES,
            num_inference_steps=4,
            guidance_scale=2.0,
            num_variants=3,
            p=1.0,
            cache=tmp_path / "cache",
        )
        defaults.update(kwargs)
        pipeline = defaults.pop("pipeline", tiny_pipe)
        return DiffusionAugment(pipeline, **defaults)

    return make
