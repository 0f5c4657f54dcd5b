"""Shared fixtures: every test is offline and on the CPU, built on the tiny pipeline."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CLASS_NAMES = ["cat", "golden retriever", "zebra"]


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


@pytest.fixture
def fresh_pipe():
    from dafusion_aug.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


def random_image(seed: int = 0, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


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
