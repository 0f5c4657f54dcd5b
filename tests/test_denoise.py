"""dafusion-aug's own denoising loop: strengths share UNet batches, with the same results as diffusers'
per-strength calls within the documented tolerance (docs/design.md), and a fall-back for the schedulers
that keep multistep state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, nan_redo_case, random_image

from dafusion_aug import DiffusionAugment, PipelineSpec, diffuse, precompute
from dafusion_aug._denoise import decode, denoise, loop_unsupported
from dafusion_aug.data import ImageList
from dafusion_aug.functional import to_batch
from dafusion_aug.precompute import MIX_FACTOR, plan_batches
from dafusion_aug.transform import DEFAULT_STRENGTHS

#: Documented tolerance between the mixed loop and per-strength calls (docs/design.md): batch composition
#: changes which oneDNN kernels run, not the noise, so a few grey levels in a few pixels.
MAX_LEVELS = 3
MEAN_LEVELS = 0.1


def _images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _diff(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[int, float]:
    d = np.stack([np.abs(x.astype(np.int16) - y) for x, y in zip(a, b)])
    return int(d.max()), float(d.mean())


class UnetCalls:
    """Records the batch size of every UNet call (a forward pre-hook)."""

    def __init__(self, pipe):
        self.sizes: list[int] = []
        self.handle = pipe.unet.register_forward_pre_hook(lambda mod, args: self.sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _mixed_case(n: int = 12):
    strengths = [DEFAULT_STRENGTHS[i % 4] for i in range(n)]
    prompts = [f"a photo of a {CLASS_NAMES[i % 3]}" for i in range(n)]
    return _images(n), prompts, strengths, [100 + i for i in range(n)]


@pytest.mark.parametrize("batch_size", [4, None])
def test_mixed_loop_matches_per_strength_calls(tiny_pipe, batch_size):
    imgs, prompts, strengths, seeds = _mixed_case()
    negatives = [None, "blurry"] * 6
    kw = dict(num_inference_steps=8, guidance_scale=7.5, negative_prompt=negatives, batch_size=batch_size)
    mixed = diffuse(tiny_pipe, imgs, prompts, strengths, seeds, mixed_strengths=True, **kw)
    per = diffuse(tiny_pipe, imgs, prompts, strengths, seeds, mixed_strengths=False, **kw)
    worst, mean = _diff(mixed, per)
    assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS
    assert diffuse(tiny_pipe, imgs, prompts, strengths, seeds, **kw)[5].tobytes() == mixed[5].tobytes()  # the default


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_one_image_is_bit_identical_to_the_pipeline(tiny_pipe, guidance):
    (img,), = [_images(1)]
    for s in DEFAULT_STRENGTHS:
        kw = dict(num_inference_steps=8, guidance_scale=guidance)
        a = diffuse(tiny_pipe, [img], ["a photo of a cat"], s, [7], mixed_strengths=True, **kw)[0]
        b = diffuse(tiny_pipe, [img], ["a photo of a cat"], s, [7], mixed_strengths=False, **kw)[0]
        assert np.array_equal(a, b), s


@pytest.mark.parametrize(
    "scheduler, config",
    [
        ("ddim", dict(prediction_type="v_prediction")),
        ("ddim", dict(prediction_type="sample")),
        ("ddim", dict(clip_sample=True, clip_sample_range=0.5)),
        ("ddim", dict(timestep_spacing="trailing")),
        ("ddim", dict(timestep_spacing="linspace", set_alpha_to_one=True, steps_offset=0)),
        ("ddim", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")),
        ("euler", dict()),
        ("euler", dict(prediction_type="v_prediction", timestep_spacing="trailing")),
        ("euler", dict(use_karras_sigmas=True)),
        ("euler-a", dict()),
        ("euler-a", dict(prediction_type="v_prediction", timestep_spacing="linspace")),
    ],
)
def test_per_sample_step_equals_the_scheduler(fresh_pipe, scheduler, config):
    import diffusers

    from dafusion_aug.pipeline import _SCHEDULERS

    fresh_pipe.scheduler = getattr(diffusers, _SCHEDULERS[scheduler]).from_config(fresh_pipe.scheduler.config, **config)
    assert loop_unsupported(fresh_pipe) is None
    pixels = to_batch(_images(1), 32)
    latents = {}
    for s in (0.5, 1.0):
        ours = denoise(fresh_pipe, lambda m: pixels, ["a cat"], [None], [s], [3], guidance_scale=2.0, num_inference_steps=6, batch_size=1)
        theirs = fresh_pipe(prompt=["a cat"], image=pixels, strength=s, num_inference_steps=6, guidance_scale=2.0,
                            generator=[torch.Generator().manual_seed(3)], output_type="latent").images
        assert torch.equal(ours, theirs), (config, s)
        latents[s] = ours
    assert not torch.equal(latents[0.5], latents[1.0])


@pytest.mark.parametrize("scheduler", ["euler", "euler-a"])
def test_euler_mixed_loop_matches_per_strength_calls(fresh_pipe, scheduler):
    import diffusers

    from dafusion_aug.pipeline import _SCHEDULERS

    fresh_pipe.scheduler = getattr(diffusers, _SCHEDULERS[scheduler]).from_config(fresh_pipe.scheduler.config)
    imgs, prompts, strengths, seeds = _mixed_case()
    kw = dict(num_inference_steps=8, guidance_scale=7.5, batch_size=4)
    worst, mean = _diff(diffuse(fresh_pipe, imgs, prompts, strengths, seeds, mixed_strengths=True, **kw),
                        diffuse(fresh_pipe, imgs, prompts, strengths, seeds, mixed_strengths=False, **kw))
    assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS


def test_strengths_share_full_unet_batches(tiny_pipe):
    imgs, prompts, strengths, seeds = _mixed_case(16)  # 4 of each strength: 2, 4, 6 and 8 of 8 steps
    with UnetCalls(tiny_pipe) as calls:
        diffuse(tiny_pipe, imgs, prompts, strengths, seeds, num_inference_steps=8, guidance_scale=7.5, batch_size=4)
    assert calls.sizes == [8] * 20  # 80 sample-steps in calls of 4 samples (x2 for guidance), none short
    with UnetCalls(tiny_pipe) as calls:
        diffuse(tiny_pipe, imgs, prompts, strengths, seeds, num_inference_steps=8, guidance_scale=7.5, batch_size=4, mixed_strengths=False)
    assert sum(calls.sizes) == 160 and len(calls.sizes) == 20  # the same work in four per-strength pipeline calls


def test_every_distinct_prompt_is_encoded_once(tiny_pipe):
    imgs, prompts, strengths, seeds = _mixed_case(12)
    rows: list[int] = []
    handle = tiny_pipe.text_encoder.register_forward_pre_hook(lambda mod, args, kwargs: rows.append((args or [kwargs["input_ids"]])[0].shape[0]),
                                                              with_kwargs=True)
    try:
        diffuse(tiny_pipe, imgs, prompts, strengths, seeds, num_inference_steps=4, guidance_scale=7.5, batch_size=4)
    finally:
        handle.remove()
    assert rows == [3, 1]  # three class prompts, one (empty) negative prompt, for 12 images


def test_fixed_shape_pads_the_tail_and_changes_nothing_else(tiny_pipe):
    imgs, prompts, strengths, seeds = _mixed_case(6)
    pixels = lambda m: to_batch([imgs[i] for i in m], 32)  # noqa: E731
    kw = dict(guidance_scale=7.5, num_inference_steps=8, batch_size=4)
    with UnetCalls(tiny_pipe) as calls:
        padded = denoise(tiny_pipe, pixels, prompts[:6], [None] * 6, strengths[:6], seeds[:6], fixed_shape=True, **kw)
    assert set(calls.sizes) == {8}
    plain = denoise(tiny_pipe, pixels, prompts[:6], [None] * 6, strengths[:6], seeds[:6], **kw)
    assert torch.allclose(padded, plain, atol=1e-4)


@pytest.mark.parametrize("name", ["pndm", "dpm++", "unipc"])
def test_multistep_schedulers_fall_back_to_per_strength_calls(fresh_pipe, name):
    import diffusers

    from dafusion_aug.pipeline import _SCHEDULERS

    fresh_pipe.scheduler = getattr(diffusers, _SCHEDULERS[name]).from_config(fresh_pipe.scheduler.config)
    assert _SCHEDULERS[name] in loop_unsupported(fresh_pipe)
    imgs, prompts, strengths, seeds = _mixed_case(4)
    kw = dict(num_inference_steps=8, guidance_scale=2.0)
    with UnetCalls(fresh_pipe) as calls:
        auto = diffuse(fresh_pipe, imgs, prompts, strengths, seeds, **kw)
    assert len(set(calls.sizes)) == 1  # one pipeline call per strength, each of one image
    assert all(np.array_equal(a, b) for a, b in zip(auto, diffuse(fresh_pipe, imgs, prompts, strengths, seeds, mixed_strengths=False, **kw)))
    with pytest.raises(ValueError, match=_SCHEDULERS[name]):
        diffuse(fresh_pipe, imgs, prompts, strengths, seeds, mixed_strengths=True, **kw)


def test_mixed_strengths_must_be_a_bool_or_none(tiny_pipe):
    with pytest.raises(ValueError, match="mixed_strengths must be None, True or False, got 'yes'"):
        diffuse(tiny_pipe, _images(1), ["a"], 0.5, [1], num_inference_steps=4, mixed_strengths="yes")


def test_nan_in_half_precision_is_redone_in_fp32_by_the_loop(fresh_pipe, monkeypatch):
    imgs, prompts, strengths, seeds = _mixed_case(3)
    out, fp32 = nan_redo_case(fresh_pipe, monkeypatch, imgs, prompts, strengths, seeds, num_inference_steps=4, guidance_scale=2.0)
    assert fresh_pipe.unet.dtype == torch.bfloat16  # back in half precision after the redo
    assert np.array_equal(out[0], fp32)  # redone alone, in float32
    assert all(o is not None for o in out)


def test_precompute_plans_mixed_batches_for_ddim(tiny_folder, tiny_pipe, tmp_path):
    from diffusers import PNDMScheduler

    spec = PipelineSpec(str(tiny_folder), device="cpu")
    assert spec.scheduler_class() == "DDIMScheduler"  # more in test_pipeline.py
    common = dict(class_names=CLASS_NAMES, num_inference_steps=4, guidance_scale=2.0, num_variants=8, p=1.0)
    aug = DiffusionAugment(spec, cache=tmp_path / "c", **common)
    assert aug.mixes_strengths() and aug._pipe is None  # decided without loading the model
    items = ImageList([(random_image(i), i % 3) for i in range(5)])  # 40 variants
    batches = list(plan_batches(aug, items, 2, {"skipped": 0, "failed": 0}, [], mixed=True))
    sizes, limit = [len(b) for b in batches], 2 * MIX_FACTOR
    assert sum(sizes) == 40 and len({v.key for b in batches for _, v, _ in b}) == 40
    assert sizes[:-1] == [limit] * (len(sizes) - 1) and limit <= sizes[-1] < 2 * limit  # the leftover joins the last
    assert all(len({v.strength for _, v, _ in b}) > 1 for b in batches)
    pndm = DiffusionAugment(tiny_pipe, cache=None, **common)
    tiny_pipe_scheduler = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = PNDMScheduler.from_config(tiny_pipe.scheduler.config)
        assert not pndm.mixes_strengths()
    finally:
        tiny_pipe.scheduler = tiny_pipe_scheduler


def test_precompute_mixed_matches_the_per_strength_path(make_aug, tmp_path):
    items = ImageList([(random_image(i), i % 3) for i in range(4)])
    mixed = make_aug(num_variants=6, num_inference_steps=8, cache=tmp_path / "mixed")
    per = make_aug(num_variants=6, num_inference_steps=8, cache=tmp_path / "per")
    assert precompute(mixed, items, batch_size=3, progress=False)["generated"] == 24
    assert precompute(per, items, batch_size=3, progress=False, mixed_strengths=False)["generated"] == 24
    keys = sorted(mixed.cache.keys())
    assert keys == sorted(per.cache.keys())
    worst, mean = _diff([mixed.cache.get(k) for k in keys], [per.cache.get(k) for k in keys])
    assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS


@pytest.mark.slow
def test_pocket_model_mixed_loop_matches_per_strength_calls():
    from diffusers import StableDiffusionImg2ImgPipeline

    from dafusion_aug.pocket import model_path

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    imgs = _images(16, seed=1)
    strengths = [DEFAULT_STRENGTHS[i % 4] for i in range(16)]
    prompts = [f"a photo of a handwritten digit {w}" for w in ("three", "seven") * 8]
    kw = dict(num_inference_steps=20, guidance_scale=7.5, batch_size=8)
    mixed = diffuse(pipe, imgs, prompts, strengths, list(range(16)), mixed_strengths=True, **kw)
    per = diffuse(pipe, imgs, prompts, strengths, list(range(16)), mixed_strengths=False, **kw)
    worst, mean = _diff(mixed, per)
    assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS
    assert _diff(mixed, [np.asarray(i) for i in imgs])[1] > 5  # it did generate something else


def test_decode_returns_images_in_unit_range(tiny_pipe):
    out = decode(tiny_pipe, torch.randn(2, 4, 8, 8))
    assert out.shape == (2, 3, 32, 32) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
