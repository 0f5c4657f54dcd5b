"""Model families (issue 17): SD 1.x, SD 2.x and SDXL, from loading to generation, tokens and erasure."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dafusion_aug import PipelineSpec, load_pipeline
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
    ("StableDiffusionInpaintPipeline", "'StableDiffusionInpaintPipeline'"),
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
