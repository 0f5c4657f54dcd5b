"""Model families (issue 17): SD 1.x, SD 2.x and SDXL, from loading to generation, tokens and erasure."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dafusion_aug import PipelineSpec, diffuse, load_pipeline
from dafusion_aug.errors import PipelineError
from dafusion_aug.families import family_of
from dafusion_aug.functional import native_resolution
from dafusion_aug.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family, cls, size", [("sd1", "StableDiffusionImg2ImgPipeline", 32),
                                                ("sd2", "StableDiffusionImg2ImgPipeline", 48),
                                                ("sdxl", "StableDiffusionXLImg2ImgPipeline", 64)])
def test_tiny_pipelines_have_their_family(family, cls, size):
    pipe = tiny_pipeline(family=family)
    assert type(pipe).__name__ == cls and family_of(pipe) == family and native_resolution(pipe) == size


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_a_family_folder_loads_by_path(family, family_folders):
    folder = family_folders(family)
    spec = PipelineSpec(str(folder), device="cpu")
    assert spec.family() == family
    pipe = load_pipeline(spec)
    assert family_of(pipe) == family
    assert type(pipe).__name__ == ("StableDiffusionXLImg2ImgPipeline" if family == "sdxl" else "StableDiffusionImg2ImgPipeline")
    ref = tiny_pipeline(family=family)
    for name in ("unet", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        for (k, a), (_, b) in zip(sorted(getattr(pipe, name).state_dict().items()), sorted(getattr(ref, name).state_dict().items())):
            assert torch.equal(a, b), f"{name}.{k}"
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")


def test_the_family_is_in_fingerprints_but_not_for_sd1(tiny_folder, family_folders, tmp_path):
    """SD 1.x fingerprints are those of earlier versions (golden keys); other families add their name."""
    from dafusion_aug.hashing import stable_digest
    from dafusion_aug.pipeline import _local_dir_fingerprint

    assert PipelineSpec(str(tiny_folder)).family() == "sd1"
    sd1 = PipelineSpec(str(tiny_folder))
    assert sd1.fingerprint() == stable_digest("spec", _local_dir_fingerprint(tiny_folder), None, None)
    for family in ("sd2", "sdxl"):
        folder = family_folders(family)
        assert PipelineSpec(str(folder)).fingerprint() == stable_digest("spec", _local_dir_fingerprint(folder), None, None, family)


def _edit_index(src, dst, **changes):
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    for k, v in changes.items():
        if v is None:
            index.pop(k, None)
        else:
            index[k] = v
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("class_name, match", [
    ("StableDiffusion3Pipeline", "'StableDiffusion3Pipeline'"),
    ("FluxPipeline", "'FluxPipeline'"),
    ("KandinskyV22Pipeline", "'KandinskyV22Pipeline'"),
    ("StableDiffusionUpscalePipeline", "'StableDiffusionUpscalePipeline'"),
])
def test_other_pipelines_are_refused_before_loading(tiny_folder, tmp_path, class_name, match, monkeypatch):
    folder = _edit_index(tiny_folder, tmp_path / "m", _class_name=class_name)
    import diffusers

    def never(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.StableDiffusionImg2ImgPipeline, "from_pretrained", never)
    for call in (lambda: load_pipeline(PipelineSpec(str(folder), device="cpu")), lambda: PipelineSpec(str(folder)).fingerprint()):
        with pytest.raises(PipelineError, match=match) as info:
            call()
        assert "Stable Diffusion 1.x, Stable Diffusion 2.x and SDXL" in str(info.value)


def test_sdxl_folder_without_text_encoder_2_is_named(family_folders, tmp_path):
    folder = _edit_index(family_folders("sdxl"), tmp_path / "m", text_encoder_2=[None, None])
    with pytest.raises(PipelineError, match=r"has no \['text_encoder_2'\]"):
        load_pipeline(PipelineSpec(str(folder), device="cpu"))


def test_refiner_only_folder_is_refused(family_folders, tmp_path):
    folder = _edit_index(family_folders("sdxl"), tmp_path / "m", text_encoder=[None, None], tokenizer=[None, None],
                         requires_aesthetics_score=True)
    with pytest.raises(PipelineError, match="is an SDXL refiner"):
        load_pipeline(PipelineSpec(str(folder), device="cpu"))


def test_folder_without_model_index_is_named(tiny_folder, tmp_path):
    folder = _edit_index(tiny_folder, tmp_path / "m")
    (folder / "model_index.json").unlink()
    with pytest.raises(PipelineError, match="has no readable model_index.json"):
        load_pipeline(PipelineSpec(str(folder), device="cpu"))


# -- generation ----------------------------------------------------------------------------------------------
def _images(n: int, shapes=((40, 56), (64, 64))) -> list:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


class Calls:
    """Records the keyword arguments of every diffusers pipeline call."""

    def __init__(self, pipe, monkeypatch):
        self.kwargs: list[dict] = []
        original = type(pipe).__call__

        def spy(this, *args, **kwargs):
            self.kwargs.append(kwargs)
            return original(this, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", spy)


def test_sdxl_goes_through_diffusers_with_the_real_images_size(monkeypatch):
    """SDXL runs its own pipeline (one call per strength and input size), conditioned on the real image's
    size (original_size), the generation size (target_size) and no crop; one image alone equals its batch."""
    from dafusion_aug._denoise import loop_unsupported

    pipe = tiny_pipeline(family="sdxl")
    assert "StableDiffusionXLImg2ImgPipeline" in loop_unsupported(pipe)
    with pytest.raises(ValueError, match="mixed_strengths=True cannot run on this pipeline"):
        diffuse(pipe, _images(1), ["a cat"], 0.5, [1], num_inference_steps=2, mixed_strengths=True)
    calls = Calls(pipe, monkeypatch)
    imgs = _images(3)
    out = diffuse(pipe, imgs, ["a cat", "a dog", "a cat"], [0.5, 0.5, 0.5], [1, 2, 3], num_inference_steps=4)
    assert [o.shape for o in out] == [i.shape for i in imgs]
    seen = sorted((k["original_size"], k["target_size"], k["crops_coords_top_left"], len(k["prompt"])) for k in calls.kwargs)
    assert seen == [((40, 56), (64, 64), (0, 0), 2), ((64, 64), (64, 64), (0, 0), 1)]
    alone = diffuse(pipe, [imgs[2]], ["a cat"], 0.5, [3], num_inference_steps=4)[0]
    assert np.abs(alone.astype(int) - out[2]).max() <= 3
    other_size = diffuse(pipe, [imgs[2][:, :40]], ["a cat"], 0.5, [3], num_inference_steps=4)[0]  # another original_size
    assert other_size.shape == (40, 40, 3)


def test_sd2_v_prediction_runs_the_loop_exactly():
    """SD 2.x (DDIM, v-prediction) runs dafusion-aug's loop, bit-identical to diffusers for one image."""
    from dafusion_aug._denoise import loop_unsupported

    pipe = tiny_pipeline(family="sd2")
    assert loop_unsupported(pipe) is None and pipe.scheduler.config.prediction_type == "v_prediction"
    img = _images(1, shapes=((48, 48),))
    for s in (0.5, 1.0):
        a = diffuse(pipe, img, ["a photo of a cat"], s, [7], num_inference_steps=6, mixed_strengths=True)[0]
        b = diffuse(pipe, img, ["a photo of a cat"], s, [7], num_inference_steps=6, mixed_strengths=False)[0]
        assert np.array_equal(a, b), s


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_resolution_must_be_a_multiple_of_the_vae_factor(family):
    pipe = tiny_pipeline(family=family)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of the VAE's scale factor 4, got 30"):
        diffuse(pipe, _images(1), ["a cat"], 0.5, [1], num_inference_steps=2, resolution=30)
    assert diffuse(pipe, _images(1), ["a cat"], 0.5, [1], num_inference_steps=2, resolution=32)[0].shape == (40, 56, 3)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_transform_cache_and_precompute_on_a_family_folder(family, family_folders, tmp_path):
    """The transform on a model folder of the family: it generates at the native size, the cache returns the
    same pixels, and precompute batched equals unbatched within the documented tolerance."""
    from conftest import CLASS_NAMES, random_image

    from dafusion_aug import DiffusionAugment, precompute
    from dafusion_aug.data import ImageList

    common = dict(class_names=CLASS_NAMES, num_inference_steps=4, guidance_scale=2.0, num_variants=2, p=1.0, device="cpu")
    aug = DiffusionAugment(str(family_folders(family)), cache=tmp_path / "c", **common)
    assert aug.mixes_strengths() == (family == "sd2")
    image = random_image(0, size=(40, 30))
    torch.manual_seed(0)
    first, label = aug(image, 1)
    assert first.size == image.size and label == 1 and aug.native_resolution == (48 if family == "sd2" else 64)
    torch.manual_seed(0)
    assert np.array_equal(np.asarray(aug(image, 1)[0]), np.asarray(first)) and len(list(aug.cache.keys())) == 1
    items = ImageList([(random_image(i, size=(40, 30) if i % 2 else (32, 32)), i % 3) for i in range(3)])
    batched = DiffusionAugment(str(family_folders(family)), cache=tmp_path / "b", **common)
    single = DiffusionAugment(str(family_folders(family)), cache=tmp_path / "s", **common)
    assert precompute(batched, items, batch_size=6, progress=False)["generated"] == 6
    assert precompute(single, items, batch_size=1, progress=False)["generated"] == 6
    keys = sorted(batched.cache.keys())
    assert keys == sorted(single.cache.keys())
    d = np.concatenate([np.abs(batched.cache.get(k).astype(np.int16) - single.cache.get(k)).ravel() for k in keys])
    assert d.max() <= 3 and d.mean() <= 0.1


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_nan_in_half_precision_is_redone_in_fp32(family, monkeypatch):
    from conftest import nan_redo_case

    pipe = tiny_pipeline(family=family)
    imgs = _images(2, shapes=((48, 48),))
    out, fp32 = nan_redo_case(pipe, monkeypatch, imgs, ["a cat", "a dog"], [0.5, 0.5], [1, 2], num_inference_steps=4, guidance_scale=2.0)
    assert pipe.unet.dtype == torch.bfloat16 and all(o is not None for o in out)
    assert np.array_equal(out[0], fp32)


# -- tokens ------------------------------------------------------------------------------------------------
def _fit_data():
    from conftest import random_image

    return [(random_image(i, size=(40, 48)), i % 2) for i in range(4)]


FIT = dict(steps=4, batch_size=2, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def sdxl_tokens():
    """Tokens fitted on the tiny SDXL pipeline (the pipeline is checked unchanged), and that pipeline."""
    pipe = tiny_pipeline(family="sdxl")
    before = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in ("text_encoder", "text_encoder_2", "unet")}
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    from dafusion_aug import fit_tokens

    tokens = fit_tokens(pipe, _fit_data(), ["cat", "dog"], **FIT)
    for name, state in before.items():  # both encoders frozen: only the new rows (outside the model) learned
        assert all(torch.equal(v, getattr(pipe, name).state_dict()[k]) for k, v in state.items()), name
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
    return tokens, pipe


def test_fit_tokens_trains_both_sdxl_encoders(sdxl_tokens):
    from dafusion_aug.fit import _initial_rows

    tokens, pipe = sdxl_tokens
    assert tokens.family == "sdxl" and tokens.metadata["family"] == "sdxl" and len(tokens.embeddings_2) == 2
    for encoder, tokenizer, learned in ((pipe.text_encoder, pipe.tokenizer, tokens.embeddings),
                                        (pipe.text_encoder_2, pipe.tokenizer_2, tokens.embeddings_2)):
        init = _initial_rows(encoder, tokenizer, ["cat", "dog"], "class_name", 1)
        assert not torch.equal(torch.cat(learned), init)  # each encoder's rows moved from their start


def test_sdxl_fit_resumes_bitwise(tmp_path):
    from dafusion_aug import fit_tokens

    pipe = tiny_pipeline(family="sdxl")
    full = fit_tokens(pipe, _fit_data(), ["cat", "dog"], **FIT)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_tokens(pipe, _fit_data(), ["cat", "dog"], checkpoint_dir=tmp_path, checkpoint_every=2, _on_step=interrupt, **FIT)
    resumed = fit_tokens(pipe, _fit_data(), ["cat", "dog"], checkpoint_dir=tmp_path, checkpoint_every=2, **FIT)
    for a, b in zip(full.embeddings + full.embeddings_2, resumed.embeddings + resumed.embeddings_2):
        assert torch.equal(a, b)


def test_sdxl_token_file_uses_clip_l_and_clip_g(sdxl_tokens, tmp_path):
    from safetensors import safe_open

    from dafusion_aug import ClassTokens

    tokens, _ = sdxl_tokens
    path = tokens.save(tmp_path / "tokens.safetensors")
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata()["family"] == "sdxl"
        assert f.get_tensor("clip_g").shape == (2, 32)
    again = ClassTokens.load(path)
    assert again.family == "sdxl" and again.content_hash() == tokens.content_hash()
    assert all(torch.equal(a, b) for a, b in zip(again.embeddings_2, tokens.embeddings_2))


def test_sdxl_export_loads_in_plain_diffusers_with_the_same_prompt_embeddings(sdxl_tokens, tmp_path):
    """The documented plain-diffusers lines (tokens.DIFFUSERS_SDXL) give the prompt embeddings dafusion-aug gives."""
    from safetensors.torch import load_file

    tokens, _ = sdxl_tokens
    files = tokens.export_diffusers(tmp_path / "export")
    theirs = tiny_pipeline(family="sdxl")
    for token, path in zip(tokens.tokens, files):
        sd = load_file(str(path))
        assert sorted(sd) == ["clip_g", "clip_l"]
        theirs.load_textual_inversion(sd["clip_g"], token=token, text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
        theirs.load_textual_inversion(sd["clip_l"], token=token, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    ours = tiny_pipeline(family="sdxl")
    tokens.apply(ours)
    prompt = ["a photo of a <cat>", "a photo of a <dog>"]
    a = ours.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    b = theirs.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # prompt embeddings and pooled embeddings
    plain = ours.encode_prompt(["a photo of a cat"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert not torch.equal(a[0][:1], plain[0])


def test_token_files_of_another_family_are_refused(sdxl_tokens, tmp_path):
    from dafusion_aug import ClassTokens, TokenFileError, fit_tokens

    tokens, _ = sdxl_tokens
    with pytest.raises(TokenFileError, match="made for family 'sdxl', but the pipeline is family 'sd1'"):
        ClassTokens.load(tokens.save(tmp_path / "xl.safetensors")).apply(tiny_pipeline())
    sd2 = fit_tokens(tiny_pipeline(family="sd2"), _fit_data(), ["cat", "dog"], **{**FIT, "steps": 1})
    assert ClassTokens.load(sd2.save(tmp_path / "sd2.safetensors")).family == "sd2"
    with pytest.raises(TokenFileError, match="made for family 'sd2', but the pipeline is family 'sd1'"):
        ClassTokens.load(tmp_path / "sd2.safetensors").apply(tiny_pipeline())
    with pytest.raises(TokenFileError, match="one embedding per token, but the pipeline is SDXL"):
        ClassTokens(["cat"], [torch.randn(1, 32)]).apply(tiny_pipeline(family="sdxl"))


def test_transform_with_sdxl_tokens_on_a_folder(sdxl_tokens, family_folders, tmp_path):
    from conftest import random_image

    from dafusion_aug import DiffusionAugment

    tokens, _ = sdxl_tokens
    path = tokens.save(tmp_path / "tokens.safetensors")
    aug = DiffusionAugment(str(family_folders("sdxl")), tokens=str(path), num_inference_steps=2, strength=1.0, num_variants=1,
                           p=1.0, device="cpu", cache=tmp_path / "c")
    out, label = aug(random_image(0), 1)
    assert out.size == (32, 32) and label == 1 and len(list(aug.cache.keys())) == 1
    assert "<dog>" in aug.pipeline().tokenizer_2.get_vocab()


# -- erasure -----------------------------------------------------------------------------------------------
ERASE = dict(steps=2, learning_rate=1e-3, ddim_steps=3, progress=False)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("method", ["esd-x", "esd-x-strict", "esd-u", "full"])
def test_erase_concept_selects_the_familys_parameters(family, method):
    from dafusion_aug.erase import parameter_names

    unet = tiny_pipeline(family=family).unet
    names = parameter_names(unet, method)
    assert names
    if method.startswith("esd-x"):
        assert all(".attn2." in n for n in names)  # SDXL's and SD 2.x's cross-attention layers
        kinds = {n.split(".attn2.")[1].rsplit(".", 1)[0] for n in names}
        assert kinds == ({"to_k", "to_v"} if method == "esd-x-strict" else {"to_q", "to_k", "to_v", "to_out.0"})
        blocks = {n.split(".attentions.")[0] for n in names}
        assert len(blocks) == 3  # down, mid and up blocks (with SDXL's deeper transformer stacks)
    elif method == "esd-u":
        assert not any(".attn2." in n for n in names) and ("add_embedding.linear_1.weight" in names) == (family == "sdxl")


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_erase_concept_applies_and_restores_bitwise(family, family_folders, tmp_path):
    from dafusion_aug import Erasure, erase_concept
    from dafusion_aug.errors import ErasureFileError

    pipe = load_pipeline(PipelineSpec(str(family_folders(family)), device="cpu"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    erasure = erase_concept(pipe, "cat", **ERASE)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())  # training leaves the pipeline alone
    assert erasure.family == family and erasure.metadata["family"] == family
    path = erasure.save(tmp_path / "erase.safetensors")
    loaded = Erasure.load(path)
    assert loaded.family == family
    with loaded.applied(pipe):
        changed = [k for k, v in before.items() if not torch.equal(v, pipe.unet.state_dict()[k])]
        assert changed and all(".attn2." in k for k in changed)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ErasureFileError, match=f"made for family '{family}', but the pipeline is family 'sd1'"):
        loaded.apply(tiny_pipeline())
    spec = PipelineSpec(str(family_folders(family)), device="cpu", erasure=str(path))
    assert spec.fingerprint() != PipelineSpec(str(family_folders(family))).fingerprint()


def test_sdxl_erasure_trains_with_sdxl_conditioning(monkeypatch):
    """Every UNet call of an SDXL erasure gets both encoders' states and the added conditioning."""
    from dafusion_aug import erase_concept

    pipe = tiny_pipeline(family="sdxl")
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["encoder_hidden_states"].shape[-1], sorted(kwargs["added_cond_kwargs"]))),
        with_kwargs=True)
    try:
        erase_concept(pipe, "cat", **ERASE)
    finally:
        handle.remove()
    assert seen and all(s == (64, ["text_embeds", "time_ids"]) for s in seen)


# -- the command line ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_cli_on_a_family_folder(family, family_folders, tmp_path, capsys):
    """info, fit-tokens, erase and generate (with the fitted tokens and the erasure) on a model folder."""
    from conftest import random_image

    from dafusion_aug import AugmentationCache, ClassTokens, Erasure
    from dafusion_aug.cli import main

    model = str(family_folders(family))
    data = tmp_path / "data"
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            random_image(i + 10 * len(c), size=(40, 32)).save(data / c / f"{i}.png")
    assert main(["info", "--model", model]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == family
    common = ["--model", model, "--device", "cpu", "--quiet"]
    assert main(["fit-tokens", *common, "--data", str(data), "--out", str(tmp_path / "t.safetensors"), "--steps", "2", "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == family
    assert ClassTokens.load(tmp_path / "t.safetensors").family == family
    assert main(["erase", *common, "--concept", "cat", "--out", str(tmp_path / "e.safetensors"), "--steps", "1", "--ddim-steps", "2"]) == 0
    capsys.readouterr()
    assert Erasure.load(tmp_path / "e.safetensors").family == family
    args = ["generate", *common, "--data", str(data), "--cache", str(tmp_path / "cache"), "--tokens", str(tmp_path / "t.safetensors"),
            "--erasure", str(tmp_path / "e.safetensors"),
            "--steps", "4", "--num-variants", "1", "--batch-size", "4"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 4
    assert len(list(AugmentationCache(tmp_path / "cache").keys())) == 4


def test_cli_names_an_unsupported_folder(tiny_folder, tmp_path, capsys):
    from dafusion_aug.cli import main

    folder = _edit_index(tiny_folder, tmp_path / "m", _class_name="FluxPipeline")
    assert main(["info", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "'FluxPipeline'" in err and "SDXL" in err


# -- the few-shot protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize("erase", [False, True])
def test_run_fewshot_on_sdxl(erase, tmp_path):
    """run_fewshot on the tiny SDXL pipeline: joint tokens, or one run per class with its class erased
    (whose merged token file keeps both encoders' embeddings)."""
    from dafusion_aug import ClassTokens
    from dafusion_aug.data import ImageList
    from dafusion_aug.fewshot import build_erasures, run_fewshot, small_cnn

    rng = np.random.default_rng(0)
    from PIL import Image

    names = ["cat", "dog"]
    data = ImageList([(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), c) for c in range(2) for _ in range(3)], names)
    pipe = tiny_pipeline(family="sdxl")
    extra = dict(erase=True, erasures=build_erasures(pipe, names, tmp_path / "e", steps=1, ddim_steps=2, progress=False)) if erase else {}
    res = run_fewshot(pipe, data, out=tmp_path / "run", methods=["baseline", "da-fusion"], shots=[1], seeds=[0], num_variants=1,
                      num_inference_steps=4, fit_steps=2, classifier=small_cnn(steps=2, batch_size=2), progress=False, **extra)
    assert [r["method"] for r in res.rows] == ["baseline", "da-fusion"]
    (token_file,) = (tmp_path / "run" / "tokens").glob("*.safetensors")
    tokens = ClassTokens.load(token_file)
    assert tokens.family == "sdxl" and len(tokens.embeddings_2) == 2


@pytest.mark.slow
def test_ray_backend_on_sdxl_matches_local(family_folders, tmp_path):
    pytest.importorskip("ray", reason='the Ray backend needs pip install "dafusion-aug[ray]"')
    from conftest import ray_matches_local

    assert ray_matches_local(family_folders("sdxl"), tmp_path, n_items=3, concurrency=1)["generated"] == 6


@pytest.mark.parametrize("family, counts", [
    ("sd2", {"full": 865_910_724, "esd-x": 50_352_320, "esd-x-strict": 25_559_040, "esd-u": 815_358_084}),
    ("sdxl", {"full": 2_567_463_684, "esd-x": 545_670_400, "esd-x-strict": 340_787_200, "esd-u": 2_021_205_124}),
])
def test_full_size_parameter_counts(family, counts):
    """The parameter sets of the real SD 2.1 and SDXL UNets (docs/erasure.md), built on the meta device."""
    from dafusion_aug.erase import METHODS, parameter_names
    from dafusion_aug.testing import full_size_unet

    with torch.device("meta"):
        unet = full_size_unet(family)
    params = dict(unet.named_parameters())
    assert {m: sum(params[n].numel() for n in parameter_names(unet, m)) for m in METHODS} == counts


def test_fit_tokens_encodes_sdxl_images_in_float32_when_the_vae_needs_it(monkeypatch):
    """SDXL's VAE (force_upcast) overflows in float16: fit_tokens encodes in float32 and puts it back."""
    from dafusion_aug.fit import _LatentEncoder

    pipe = tiny_pipeline(family="sdxl").to(torch.float16)
    seen = []
    real = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, *a, **k: seen.append((x.dtype, pipe.vae.dtype)) or real(x, *a, **k))
    enc = _LatentEncoder(pipe.vae, 64, "cpu")
    enc.add(np.zeros((40, 48, 3), np.uint8))
    mean, _ = enc.finish()
    assert seen == [(torch.float32, torch.float32)] and pipe.vae.dtype == torch.float16 and torch.isfinite(mean).all()
    assert enc.sizes == [(40, 48)]


def test_hub_ids_read_their_family_from_the_cache_only(family_folders, tmp_path, monkeypatch):
    """A Hub id's family comes from the Hugging Face cache (never the network); its fingerprint stays id + revision."""
    import huggingface_hub.constants

    from dafusion_aug.hashing import stable_digest

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = PipelineSpec("stabilityai/stable-diffusion-xl-base-1.0")
    assert spec.family() is None
    assert spec.fingerprint() == stable_digest("spec", stable_digest("hub", spec.model, "main"), None, None)
    snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / ("a" * 40)
    (snapshot / "unet").mkdir(parents=True)
    (tmp_path / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0" / "refs").mkdir()
    (tmp_path / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0" / "refs" / "main").write_text("a" * 40)
    shutil.copy(family_folders("sdxl") / "model_index.json", snapshot / "model_index.json")
    shutil.copy(family_folders("sdxl") / "unet" / "config.json", snapshot / "unet" / "config.json")
    assert spec.family() == "sdxl"
    assert spec.fingerprint() == stable_digest("spec", stable_digest("hub", spec.model, "main"), None, None)
