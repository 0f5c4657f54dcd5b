"""ESD concept erasure: parameter sets, the caller's pipeline untouched, reversible files, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dafusion_aug import Erasure, ErasureFileError, PipelineError, PipelineSpec, erase_concept
from dafusion_aug import erasure as erasure_mod
from dafusion_aug.erase import METHODS, parameter_names
from dafusion_aug.pipeline import pipeline_fingerprint
from dafusion_aug.testing import tiny_pipeline

FAST = dict(steps=2, ddim_steps=2, learning_rate=1e-2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _snapshot(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}


def _changed(pipe, before) -> set[str]:
    return {n for n, p in pipe.unet.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def erasures(pipe):
    return {m: erase_concept(pipe, "zebra", method=m, **FAST) for m in METHODS}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pipe):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


# -- parameter sets ----------------------------------------------------------------------------------
def test_sd15_parameter_counts():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    params = dict(unet.named_parameters())
    counts = {m: sum(params[n].numel() for n in parameter_names(unet, m)) for m in METHODS}
    assert counts["full"] == 859_520_964
    assert counts["esd-x"] == 43_962_560  # 5.1 % of the UNet
    assert counts["esd-x-strict"] == 19_169_280
    assert counts["esd-x"] + counts["esd-u"] < counts["full"]  # norms are in neither
    names = set(parameter_names(unet, "esd-x"))
    assert all(".attn2." in n for n in names) and len(names) == 16 * 5  # 16 transformer blocks, 4 Linears, 1 bias
    assert set(parameter_names(unet, "esd-x-strict")) < names
    assert not names & set(parameter_names(unet, "esd-u"))


def test_unknown_method(pipe):
    with pytest.raises(ValueError, match="method must be one of"):
        parameter_names(pipe.unet, "esd-z")
    with pytest.raises(ValueError, match="method must be one of"):
        erase_concept(pipe, "zebra", method="esd-z")


@pytest.mark.parametrize("method", METHODS)
def test_method_changes_exactly_its_set(pipe, erasures, method):
    before = _snapshot(pipe)
    erasure = erasures[method]
    assert set(erasure.tensors) == set(parameter_names(pipe.unet, method))
    # training never touched the caller's pipeline: values, flags and grads
    assert not _changed(pipe, before)
    assert all(p.grad is None and p.requires_grad for p in pipe.unet.parameters())
    with erasure.applied(pipe):
        assert _changed(pipe, before) == set(erasure.tensors)
    assert not _changed(pipe, before)  # restore is bitwise


def test_loss_decreases():
    pipe = tiny_pipeline(seed=0)
    with torch.no_grad():  # the random tiny model barely listens to its prompt; make it listen
        for n, p in pipe.unet.named_parameters():
            if n.endswith(("attn2.to_v.weight", "attn2.to_out.0.weight")):
                p.mul_(8)
    e = erase_concept(pipe, "zebra", steps=30, ddim_steps=4, learning_rate=1e-3, progress=False)
    losses = e.metadata["losses"]
    assert len(losses) == 30
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


# -- apply / restore ---------------------------------------------------------------------------------
def test_apply_restore_idempotent_and_exclusive(pipe, erasures):
    before = _snapshot(pipe)
    x, strict = erasures["esd-x"], erasures["esd-x-strict"]
    x.apply(pipe)
    x.apply(pipe)  # same erasure again: nothing happens
    assert Erasure.active(pipe) is x
    assert torch.equal(pipe._dafusion_erasure_originals[next(iter(x.tensors))], before[next(iter(x.tensors))])
    with pytest.raises(PipelineError, match="already has an erasure"):
        strict.apply(pipe)
    with pytest.raises(PipelineError, match="another erasure"):
        strict.restore(pipe)
    with strict.applied(pipe):  # swaps x out for the block, then back in
        assert _changed(pipe, before) == set(strict.tensors)
    assert Erasure.active(pipe) is x and _changed(pipe, before) == set(x.tensors)
    strict.apply(pipe, replace=True)
    assert _changed(pipe, before) == set(strict.tensors)
    strict.restore(pipe)
    strict.restore(pipe)  # nothing active: no-op
    assert Erasure.active(pipe) is None and not _changed(pipe, before)


def test_applied_restores_on_error(pipe, erasures):
    before = _snapshot(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with erasures["esd-u"].applied(pipe):
            raise RuntimeError("boom")
    assert Erasure.active(pipe) is None and not _changed(pipe, before)


def test_apply_casts_to_the_pipe_dtype(erasures):
    pipe = tiny_pipeline(seed=0).to(dtype=torch.bfloat16)
    before = _snapshot(pipe)
    e = erasures["esd-x"]
    with e.applied(pipe):
        params = dict(pipe.unet.named_parameters())
        for n, t in e.tensors.items():
            assert params[n].dtype == torch.bfloat16 and torch.equal(params[n], t.to(torch.bfloat16))
    assert not _changed(pipe, before)


def test_base_check_is_memoised(pipe, erasures, monkeypatch):
    calls = []
    real = erasure_mod._values_digest
    monkeypatch.setattr(erasure_mod, "_values_digest", lambda *a: calls.append(1) or real(*a))
    fresh = tiny_pipeline(seed=0)
    a = erasures["esd-x"]
    b = Erasure({n: t + 1 for n, t in a.tensors.items()}, concepts="cat", method="esd-x", base_digests=a.base_digests)
    for _ in range(3):  # switching between erasures of one parameter set hashes the originals once
        with a.applied(fresh):
            pass
        with b.applied(fresh):
            pass
    assert len(calls) == 1
    with torch.no_grad():  # an in-place write invalidates the memo, and the check catches it
        next(p for n, p in fresh.unet.named_parameters() if n in a.tensors).add_(1)
    with pytest.raises(ErasureFileError, match="another base model"):
        a.apply(fresh)


def test_fingerprint_follows_apply(erasures):
    fresh = tiny_pipeline(seed=0)
    base = pipeline_fingerprint(fresh)
    with erasures["esd-x"].applied(fresh):
        erased = pipeline_fingerprint(fresh)
    assert erased != base and pipeline_fingerprint(fresh) == base


def test_base_mismatch(erasures):
    other = tiny_pipeline(seed=1)
    before = _snapshot(other)
    with pytest.raises(ErasureFileError, match="another base model"):
        erasures["esd-x"].apply(other)
    assert Erasure.active(other) is None and not _changed(other, before)
    name = next(iter(erasures["esd-x"].tensors))
    with pytest.raises(ErasureFileError, match="has no parameters"):
        Erasure({"nope.weight": torch.zeros(2)}, concepts="x").apply(other)
    with pytest.raises(ErasureFileError, match="shape mismatch"):
        Erasure({name: torch.zeros(2)}, concepts="x").apply(other)


# -- files -------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, pipe, erasures):
    e = erasures["esd-x"]
    path = e.save(tmp_path / "e.safetensors")
    back = Erasure.load(path)
    assert back.content_hash() == e.content_hash()
    assert all(torch.equal(back.tensors[n], t) for n, t in e.tensors.items())
    assert back.concepts == {"zebra": ["zebra"]} and back.method == "esd-x"
    assert back.base_digests == e.base_digests and back.base_digest == e.base_digest
    assert back.base_model == e.base_model and back.metadata == json.loads(json.dumps(e.metadata))
    assert back.num_parameters == e.num_parameters
    with back.applied(pipe):  # a loaded copy is "the same erasure" for idempotence
        back.apply(pipe)
        e.apply(pipe)


def test_esd_x_file_is_small(tmp_path, erasures):
    x = erasures["esd-x"].save(tmp_path / "x.safetensors").stat().st_size
    full = erasures["full"].save(tmp_path / "full.safetensors").stat().st_size
    assert x < 0.1 * full


def test_bad_files_refused(tmp_path, erasures):
    pkl = tmp_path / "e.pt"
    torch.save(dict(erasures["esd-x"].tensors), pkl)
    with pytest.raises(ErasureFileError, match="pickle"):
        Erasure.load(pkl)
    good = erasures["esd-x"].save(tmp_path / "good.safetensors").read_bytes()
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(good[: len(good) // 2])
    with pytest.raises(ErasureFileError, match="not a readable safetensors"):
        Erasure.load(torn)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ErasureFileError, match="not an erasure file"):
        Erasure.load(tmp_path / "plain.safetensors")
    with pytest.raises(ErasureFileError, match="not found"):
        Erasure.load(tmp_path / "missing.safetensors")


def test_pipeline_spec_with_erasure(tmp_path, folder, erasures):
    path = erasures["esd-x"].save(tmp_path / "e.safetensors")
    spec = PipelineSpec(str(folder), device="cpu")
    erased_spec = PipelineSpec(str(folder), device="cpu", erasure=str(path))
    assert erased_spec.fingerprint() != spec.fingerprint()
    loaded = erased_spec.load()
    assert Erasure.active(loaded).content_hash() == erasures["esd-x"].content_hash()
    params = dict(loaded.unet.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in erasures["esd-x"].tensors.items())


# -- training details --------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path, pipe):
    kw = dict(FAST, steps=6, checkpoint_every=2, seed=3)
    concepts = {"zebra": ["a photo of a zebra", "zebra"], "cat": "a photo of a cat"}
    straight = erase_concept(pipe, concepts, **kw)

    def stop_after_4(step, loss):  # called after the step's checkpoint is written
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        erase_concept(pipe, concepts, checkpoint_dir=tmp_path, _on_step=stop_after_4, **kw)
    assert json.loads((tmp_path / "esd-checkpoint.json").read_text())["step"] == 4
    resumed = erase_concept(pipe, concepts, checkpoint_dir=tmp_path, **kw)
    assert resumed.content_hash() == straight.content_hash()
    assert resumed.metadata["losses"] == straight.metadata["losses"]
    with pytest.raises(ValueError, match="other settings"):
        erase_concept(pipe, concepts, checkpoint_dir=tmp_path, **{**kw, "learning_rate": 0.5})
    again = erase_concept(pipe, concepts, checkpoint_dir=tmp_path, resume=False, **kw)
    assert again.content_hash() == straight.content_hash()


def test_resume_from_a_checkpoint_starting_with_a_pickle_byte(tmp_path, pipe):
    """Issue 15, item 1: erase_concept(checkpoint_every=1) for 12 steps could not resume from its own
    checkpoint, whose header length was 0x2c80 (first byte 0x80, a pickle's). The checkpoint is given that
    header length here; resuming from it must equal an uninterrupted run."""
    from conftest import with_header_length

    kw = dict(FAST, steps=3, checkpoint_every=1, seed=5)
    straight = erase_concept(pipe, "zebra", **kw)

    def stop_after_2(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        erase_concept(pipe, "zebra", checkpoint_dir=tmp_path, _on_step=stop_after_2, **kw)
    checkpoint = tmp_path / "esd-checkpoint.safetensors"
    with_header_length(checkpoint, 0x2C80)
    assert checkpoint.read_bytes()[0] == 0x80
    resumed = erase_concept(pipe, "zebra", checkpoint_dir=tmp_path, **kw)
    assert resumed.content_hash() == straight.content_hash() and resumed.metadata["losses"] == straight.metadata["losses"]


def test_erase_concept_arguments(pipe):
    with pytest.raises(ValueError, match="steps must be"):
        erase_concept(pipe, "zebra", steps=0)
    with pytest.raises(TypeError, match="ddim_steps must be an int, got float: 2.5"):
        erase_concept(pipe, "zebra", ddim_steps=2.5)
    as_numpy = erase_concept(pipe, "zebra", **{**FAST, "steps": np.int64(2), "ddim_steps": np.int32(2)})
    assert as_numpy.content_hash() == erase_concept(pipe, "zebra", **FAST).content_hash()
    with pytest.raises(ValueError, match="non-empty"):
        erase_concept(pipe, {"zebra": []})
    with pytest.raises(TypeError, match="concepts must"):
        erase_concept(pipe, 7)
    with pytest.raises(ValueError, match="dtype"):
        erase_concept(pipe, "zebra", dtype="float16")
    fresh = tiny_pipeline(seed=0)
    with erase_concept(fresh, "zebra", **FAST).applied(fresh):
        with pytest.raises(PipelineError, match="base model"):
            erase_concept(fresh, "cat", **FAST)


def test_cli_erase(tmp_path, folder):
    from dafusion_aug.cli import main

    out = tmp_path / "zebra.safetensors"
    code = main(
        ["erase", "--model", str(folder), "--device", "cpu", "--concept", "zebra", "--prompt", "a photo of a zebra",
         "--concept", "cat", "--method", "esd-x-strict", "--steps", "2", "--ddim-steps", "2", "--out", str(out), "--quiet"]
    )
    assert code == 0
    e = Erasure.load(out)
    assert e.concepts == {"zebra": ["a photo of a zebra"], "cat": ["cat"]} and e.method == "esd-x-strict"
    assert main(["erase", "--model", str(folder), "--prompt", "x", "--concept", "y", "--out", str(out), "--quiet"]) == 2


# -- preservation ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_preserve_keeps_what_the_preserved_prompts_draw():
    """On the pocket model, erasing "three" with the nine's prompts preserved keeps nines nines (plain ESD
    took them to 50% on pocket v2) and still erases threes as much as plain ESD does."""
    pytest.importorskip("sklearn")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dafusion_aug import pocket

    pipe = PipelineSpec("pocket").load()
    txt2img = StableDiffusionPipeline(**pipe.components)
    txt2img.scheduler = DDIMScheduler.from_config(txt2img.scheduler.config)
    txt2img.set_progress_bar_config(disable=True)
    concept = {"three": [pocket.prompt(3), "three"]}
    settings = dict(steps=50, ddim_steps=10, learning_rate=2e-3, progress=False)
    rates = {}
    for name, kw in (("plain", {}), ("kept", {"preserve": [pocket.prompt(9), "nine"]})):
        erasure = erase_concept(pipe, concept, **settings, **kw)
        with erasure.applied(pipe):
            rates[name] = pocket.judged_rates(txt2img, {3: pocket.prompt(3), 9: pocket.prompt(9)}, 16, steps=10).rates
    assert rates["kept"][9] >= max(rates["plain"][9], 0.875), rates
    assert rates["kept"][3] <= rates["plain"][3] + 0.25, rates
    assert erasure.metadata["preserve"] == [pocket.prompt(9), "nine"] and erasure.metadata["preserve_weight"] == 1.0


def test_preserve_arguments(pipe):
    with pytest.raises(TypeError, match="preserve must be"):
        erase_concept(pipe, "zebra", preserve=[3], **FAST)
    with pytest.raises(ValueError, match="preserve_weight must be"):
        erase_concept(pipe, "zebra", preserve="horse", preserve_weight=0.0, **FAST)
    with pytest.raises(ValueError, match="being erased"):
        erase_concept(pipe, "zebra", preserve=["zebra"], **FAST)
    for empty in ([], ()):  # issue 33: an empty list is not silently plain ESD
        with pytest.raises(ValueError, match=r"preserve must hold at least one prompt, got (\[\]|\(\)); pass preserve=None"):
            erase_concept(pipe, "zebra", preserve=empty, preserve_weight=4.0, **FAST)
    plain, kept = erase_concept(pipe, "zebra", **FAST), erase_concept(pipe, "zebra", preserve="horse", **FAST)
    assert "preserve" not in plain.metadata  # plain ESD files and checkpoints keep their names
    assert kept.metadata["preserve"] == ["horse"] and not torch.equal(*(e.tensors[n] for e in (plain, kept) for n in [next(iter(plain.tensors))]))
