"""Class LoRA (issue 32): fit_tokens(lora_rank=r) with peft, the diffusers-layout file, fusing and restoring,
plain diffusers' load_lora_weights giving our pixels, the cache key, refusals, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_fit import NAMES, _items, _state, _write_folder

from dafusion_aug import (
    ClassLora,
    ClassTokens,
    DiffusionAugment,
    LoraFileError,
    PipelineError,
    diffuse,
    fit_tokens,
)
from dafusion_aug.cli import main
from dafusion_aug.testing import tiny_pipeline

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(steps=6, batch_size=3, learning_rate=1e-2, progress=False, lora_rank=4, lora_learning_rate=1e-2)


@pytest.fixture(scope="module")
def items():
    return _items()


@pytest.fixture(scope="module")
def fitted(items):
    return fit_tokens(tiny_pipeline(seed=0), items, NAMES, **FAST)


def _modules(pipe) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in pipe.unet.named_modules()]


def test_fit_trains_a_lora_and_leaves_the_callers_pipeline_as_it_was(items):
    pipe = tiny_pipeline(seed=0)
    before, modules = _state(pipe), _modules(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    tokens = fit_tokens(pipe, items, NAMES, **FAST)
    after = _state(pipe)
    assert _modules(pipe) == modules and not hasattr(pipe.unet, "peft_config")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    lora = tokens.lora
    assert isinstance(lora, ClassLora) and lora.rank == 4 and lora.alpha == 4.0
    # every attention projection of the tiny UNet, and the up factors left zero by the init have learned
    assert len(lora.layers) == sum(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n, _ in modules)
    assert all(up.abs().max() > 0 for _, up in lora.layers.values())
    assert tokens.metadata["lora_rank"] == 4 and lora.family == "sd1"
    plain = fit_tokens(pipe, items, NAMES, **{**FAST, "lora_rank": 0})
    assert plain.lora is None and "lora_rank" not in plain.metadata
    assert not all(torch.equal(a, b) for a, b in zip(plain.embeddings, tokens.embeddings))  # trained jointly


def test_resume_with_lora_is_bitwise_identical(items, tmp_path):
    pipe = tiny_pipeline(seed=0)
    args = {**FAST, "steps": 8}
    full = fit_tokens(pipe, items, NAMES, **args)

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, checkpoint_every=4, _on_step=interrupt, **args)
    assert all(not hasattr(m, "base_layer") for m in pipe.unet.modules())  # taken out on the interrupt too
    resumed = fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, checkpoint_every=4, **args)
    assert all(torch.equal(a, b) for a, b in zip(full.embeddings, resumed.embeddings))
    assert full.lora.content_hash() == resumed.lora.content_hash()
    with pytest.raises(Exception, match="lora_rank"):  # a token-only checkpoint is another run
        fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, **{**args, "lora_rank": 2})


def test_file_round_trip_in_diffusers_layout(fitted, tmp_path):
    path = fitted.lora.save(tmp_path / "lora.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert meta["format"] == "dafusion-aug/lora/1" and meta["rank"] == "4"
    back = ClassLora.load(path)
    assert back.content_hash() == fitted.lora.content_hash() and back.base_digests == fitted.lora.base_digests
    tokens = ClassTokens.load(fitted.save(tmp_path / "t.safetensors"), lora=path)
    assert tokens.lora.content_hash() == fitted.lora.content_hash()
    # 10 MB per data set at rank 10 on SD 1.5 (issue 32): the file is the factors in float32 and a header
    assert path.stat().st_size < 4 * fitted.lora.num_parameters + 64 * 1024


def test_apply_restores_bitwise_and_nests(fitted):
    pipe = tiny_pipeline(seed=0)
    w0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with fitted.lora.applied(pipe):
        changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(w0[k], v)]
        with fitted.lora.applied(pipe):
            assert ClassLora.active(pipe) is fitted.lora
        assert ClassLora.active(pipe) is fitted.lora
        other = ClassLora({n: (d, u * 2) for n, (d, u) in fitted.lora.layers.items()})
        with pytest.raises(PipelineError, match="already has a LoRA"):
            other.apply(pipe)
    assert len(changed) == len(fitted.lora.layers) and all(k.endswith(".weight") for k in changed)
    assert ClassLora.active(pipe) is None and all(torch.equal(w0[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_plain_diffusers_load_lora_weights_gives_our_pixels(items, family, tmp_path):
    """The issue's mark: the exported files in plain diffusers (load_textual_inversion + load_lora_weights)
    give the library's pixels within 1 grey level, and the LoRA changes them."""
    tokens = fit_tokens(tiny_pipeline(seed=0, family=family), items, NAMES, **{**FAST, "steps": 4, "learning_rate": 5e-2,
                                                                                     "lora_learning_rate": 5e-2})
    path = tokens.lora.save(tmp_path / "lora.safetensors")
    image = np.asarray(items[4][0])
    prompt = f"a photo of a {tokens.tokens[1]}"
    kw = dict(num_inference_steps=4, guidance_scale=7.5, mixed_strengths=False)

    ours_pipe = tiny_pipeline(seed=0, family=family)
    tokens.apply(ours_pipe)
    without = diffuse(ours_pipe, [image], [prompt], 0.75, [3], **kw)[0]
    with tokens.lora.applied(ours_pipe):
        ours = diffuse(ours_pipe, [image], [prompt], 0.75, [3], **kw)[0]

    plain = tiny_pipeline(seed=0, family=family)
    tokens.apply(plain)  # the token export's own test is test_tokens.py / test_families.py
    plain.load_lora_weights(str(path))
    theirs = diffuse(plain, [image], [prompt], 0.75, [3], **kw)[0]
    assert int(np.abs(ours.astype(int) - theirs).max()) <= 1
    assert int(np.abs(ours.astype(int) - without).max()) > 1


def test_a_lora_for_another_model_is_refused_before_any_change(fitted, tmp_path):
    other = tiny_pipeline(seed=1)  # same architecture, other weights
    w0 = {k: v.clone() for k, v in other.unet.state_dict().items()}
    with pytest.raises(LoraFileError, match="made for another model.*differ"):
        fitted.lora.apply(other)
    assert all(torch.equal(w0[k], v) for k, v in other.unet.state_dict().items()) and ClassLora.active(other) is None
    with pytest.raises(LoraFileError, match="family 'sd1'"):
        fitted.lora.apply(tiny_pipeline(family="sd2"))
    wrong = ClassLora({n: (d[:, :3], u) for n, (d, u) in list(fitted.lora.layers.items())[:1]})
    with pytest.raises(LoraFileError, match="another model.*in the LoRA"):
        wrong.apply(tiny_pipeline(seed=0))
    missing = ClassLora({"down_blocks.9.attn1.to_q": next(iter(fitted.lora.layers.values()))})
    with pytest.raises(LoraFileError, match="no linear layer"):
        missing.apply(tiny_pipeline(seed=0))


def test_bad_files_are_refused_by_name(fitted, tmp_path):
    good = fitted.lora.save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match="cut short"):
        ClassLora.load(tmp_path / "cut.safetensors")
    save_file({"text_encoder.x.lora.down.weight": torch.zeros(2, 4), "text_encoder.x.lora.up.weight": torch.zeros(4, 2)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(LoraFileError, match="not a UNet LoRA"):
        ClassLora.load(tmp_path / "te.safetensors")
    save_file({"unet.a.to_q.lora.down.weight": torch.zeros(2, 4)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraFileError, match="lacks the down or up"):
        ClassLora.load(tmp_path / "half.safetensors")
    torch.save({"a": 1}, tmp_path / "p.safetensors")
    with pytest.raises(LoraFileError, match="pickle"):
        ClassLora.load(tmp_path / "p.safetensors")
    header = json.dumps({"unet.a.to_q.lora.down.weight": {"dtype": "F32", "shape": [4096, 1 << 20], "data_offsets": [0, 4 << 32]}})
    raw = len(header).to_bytes(8, "little") + header.encode()
    with open(tmp_path / "huge.safetensors", "wb") as f:
        f.write(raw)
        f.truncate(len(raw) + (4 << 32))  # sparse: no disk
    with pytest.raises(LoraFileError, match="huge.safetensors.*at most"):
        ClassLora.load(tmp_path / "huge.safetensors")


def test_bad_arguments(items):
    pipe = tiny_pipeline(seed=0)
    for bad, match in [(-1, "lora_rank"), (1.5, "lora_rank"), (2000, "lora_rank")]:
        with pytest.raises((ValueError, TypeError), match=match):
            fit_tokens(pipe, items, NAMES, **{**FAST, "lora_rank": bad})
    with pytest.raises(ValueError, match="lora_learning_rate"):
        fit_tokens(pipe, items, NAMES, **{**FAST, "lora_learning_rate": 0})
    with pytest.raises(TypeError, match="lora must be"):
        DiffusionAugment(pipe, class_names=NAMES, lora=3)


def test_transform_uses_the_lora_and_keys_it(fitted, tiny_pipe, tmp_path):
    path = fitted.lora.save(tmp_path / "lora.safetensors")
    kw = dict(num_inference_steps=2, strength=1.0, num_variants=1, p=1.0, seed=0)
    base = tiny_pipeline(seed=0)
    tokens_only = ClassTokens(fitted.class_names, fitted.embeddings, metadata=fitted.metadata)
    plain = DiffusionAugment(base, tokens=tokens_only, **kw)
    with_lora = DiffusionAugment(base, tokens=tokens_only, lora=str(path), **kw)
    default = DiffusionAugment(base, tokens=fitted, **kw)  # tokens.lora is the default
    assert default.lora is fitted.lora and plain.lora is None
    assert with_lora.fingerprint() == default.fingerprint() != plain.fingerprint()
    image = np.asarray(_items()[0][0])
    var = with_lora.variant("d" * 64, 0, 0)
    a = with_lora.generate([image], [var], [0])[0]
    b = plain.generate([image], [plain.variant("d" * 64, 0, 0)], [0])[0]
    assert ClassLora.active(base) is None  # fused for the call only
    assert int(np.abs(a.astype(int) - b).max()) > 1
    with pytest.raises(ValueError, match="class_erasures"):
        from dafusion_aug import Erasure

        erasure = Erasure({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1)}, concepts="cat")
        DiffusionAugment(base, tokens=fitted, class_erasures={0: erasure}, **kw)


def test_cli_fit_tokens_with_lora_and_generate(tiny_folder, items, tmp_path, capsys):
    data = _write_folder(tmp_path / "data", items)
    out = tmp_path / "t.safetensors"
    assert main(["fit-tokens", "--model", str(tiny_folder), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--lora-rank", "2", "--device", "cpu", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lora"] == str(tmp_path / "t.lora.safetensors") and ClassLora.load(report["lora"]).rank == 2
    cache = tmp_path / "cache"
    assert main(["generate", "--model", str(tiny_folder), "--data", str(data), "--cache", str(cache), "--tokens", str(out),
                 "--lora", report["lora"], "--num-variants", "1", "--inference-steps", "2", "--strength", "1.0",
                 "--device", "cpu", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == len(items)
