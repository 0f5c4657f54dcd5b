"""The judged txt2img rate (:mod:`dafusion_aug.pocket.judged`): seeds, batching across labels, the rate itself."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from dafusion_aug.pocket import judged_rates, model_path, prompt  # noqa: E402
from dafusion_aug.pocket.evaluate import txt2img_samples  # noqa: E402
from dafusion_aug.pocket.judged import sample_seed, txt2img_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def txt2img():
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(model_path())
    pipe = StableDiffusionPipeline(**img2img.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_samples_do_not_depend_on_the_batching(txt2img):
    """Sample i of a label has its own seed, so label-by-label calls and calls mixing labels draw the same start."""
    prompts = {3: prompt(3), 8: prompt(8)}
    mixed = list(txt2img_batches(txt2img, prompts, 3, steps=2, batch_size=4))
    assert [labels for labels, _ in mixed] == [[3, 3, 3, 8], [8, 8]]
    alone = torch.cat([txt2img_samples(txt2img, d, 3, steps=2, batch_size=3) for d in (3, 8)])
    together = torch.cat([images for _, images in mixed])
    assert together.shape == alone.shape == (6, 3, 32, 32)
    assert (together - alone).abs().max() < 0.02  # same noise; only the batch's arithmetic differs
    assert sample_seed(2, 8, 5) == 2 * 100_000 + 8 * 1_000 + 5


def test_the_rate_is_what_the_reader_says(txt2img):
    calls = []

    def read(images):
        calls.append(len(images))
        return torch.tensor([3, 9, 8] * 3)[: len(images)]

    res = judged_rates(txt2img, {3: prompt(3), 8: prompt(8)}, 3, steps=2, batch_size=9, read=read, keep=2)
    assert calls == [6]  # one pipeline call, one read
    assert res.rates == {3: 1 / 3, 8: 1 / 3}  # reads 3, 9, 8 | 3, 9, 8: one hit per label
    assert res.images[3].shape == (2, 3, 32, 32) and res.images[8].shape == (2, 3, 32, 32)
    shipped = judged_rates(txt2img, {7: prompt(7)}, 2, steps=10)  # the shipped judge by default
    assert set(shipped.rates) == {7} and 0.0 <= shipped.rates[7] <= 1.0 and shipped.images[7].numel() == 0


def test_bad_arguments(txt2img):
    with pytest.raises(ValueError, match="prompts must all be str, or all None"):
        judged_rates(txt2img, {1: "a", 2: None}, 1)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        judged_rates(txt2img, {1: "a"}, 0)
