"""fit_tokens: learning, frozen weights, resume equivalence, use with DiffusionAugment, bad input, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from dafusion_aug import ClassTokens, DafusionError, DiffusionAugment, FitError, PipelineSpec, fit_tokens
from dafusion_aug.cli import main
from dafusion_aug.functional import to_batch
from dafusion_aug.hashing import image_digest
from dafusion_aug.pipeline import pipeline_fingerprint
from dafusion_aug.testing import tiny_pipeline

NAMES = ["cat", "dog", "zebra"]
FAST = dict(steps=6, batch_size=3, learning_rate=1e-2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _items(per_class: int = 3, classes: int = 3) -> list[tuple[Image.Image, int]]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(classes):
        for _ in range(per_class):
            a = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
            a[..., k] += 200  # one colour per class
            out.append((Image.fromarray(a), k))
    return out


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def items():
    return _items()


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("text_encoder", "unet", "vae") for k, v in getattr(pipe, name).state_dict().items()}


def _eval_losses(tokens: ClassTokens, items, repeats: int = 30) -> torch.Tensor:
    """Per-sample noise-prediction errors on fixed noise and timesteps, with ``tokens`` applied to a fresh pipeline."""
    pipe = tiny_pipeline(seed=0)
    tokens.apply(pipe)
    g = torch.Generator().manual_seed(123)
    x = to_batch([np.asarray(im) for im, _ in items], 32) * 2 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        prompts = [pipe.maybe_convert_prompt(f"a photo of a {tokens.tokens[y]}", pipe.tokenizer) for _, y in items]
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        out = []
        for _ in range(repeats):
            t = torch.randint(1000, (len(items),), generator=g)
            noise = torch.randn(z.shape, generator=g)
            pred = pipe.unet(pipe.scheduler.add_noise(z, noise, t), t, hidden).sample
            out.append((pred - noise).square().mean((1, 2, 3)))
    return torch.cat(out)


# -- learning ---------------------------------------------------------------------------------------
def test_loss_goes_down(pipe, items):
    # The per-step training loss is dominated by the random timestep, so compare on fixed, paired draws.
    init = fit_tokens(pipe, items, NAMES, steps=1, learning_rate=1e-30, progress=False)
    seen = []
    tokens = fit_tokens(pipe, items, NAMES, steps=60, learning_rate=5e-2, progress=False, _on_step=lambda s, loss: seen.append(s))
    assert seen == list(range(1, 61))
    diff = _eval_losses(init, items) - _eval_losses(tokens, items)
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5, (diff.mean(), diff.std())
    assert all(not torch.equal(a, b) for a, b in zip(init.embeddings, tokens.embeddings))
    assert np.isfinite(tokens.metadata["final_loss"])


def test_result_and_metadata(pipe, items):
    tokens = fit_tokens(pipe, items, NAMES, num_vectors=2, **FAST)
    assert tokens.class_names == NAMES and tokens.tokens == ["<cat>", "<dog>", "<zebra>"]
    assert tokens.num_vectors == 2 and tokens.dim == pipe.text_encoder.config.hidden_size
    meta = tokens.metadata
    assert meta["base_model"] == pipeline_fingerprint(pipe)
    assert meta["steps"] == 6 and meta["batch_size"] == 3 and meta["num_vectors"] == 2
    assert meta["learning_rate"] == 1e-2 and meta["effective_learning_rate"] == 1e-2 and meta["initializer"] == "class_name"
    assert len(meta["templates"]) == 27 and meta["templates"][0] == "a photo of a {}"
    scaled = fit_tokens(pipe, items, NAMES, scale_lr=True, **{**FAST, "steps": 1})
    assert scaled.metadata["effective_learning_rate"] == pytest.approx(3e-2)


def test_deterministic(pipe, items):
    a = fit_tokens(pipe, items, NAMES, **FAST)
    b = fit_tokens(pipe, items, NAMES, **FAST)
    c = fit_tokens(pipe, items, NAMES, **{**FAST, "seed": 1})
    assert all(torch.equal(x, y) for x, y in zip(a.embeddings, b.embeddings))
    assert not all(torch.equal(x, y) for x, y in zip(a.embeddings, c.embeddings))


def test_initializers(pipe, items):
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    the = pipe.tokenizer.encode("the", add_special_tokens=False)
    tokens = fit_tokens(pipe, items, NAMES, initializer="the", steps=1, learning_rate=1e-30, progress=False)
    assert torch.allclose(tokens.embeddings[0][0], weight[the[0]], atol=1e-6)
    tokens = fit_tokens(pipe, items, NAMES, steps=1, learning_rate=1e-30, progress=False)
    cat = pipe.tokenizer.encode("cat", add_special_tokens=False)
    assert torch.allclose(tokens.embeddings[0][0], weight[cat].mean(0), atol=1e-6)


def test_v_prediction_and_odd_image_sizes(items):
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline(seed=0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    odd = [(im.resize((40, 24)) if i % 2 else im.convert("L"), y) for i, (im, y) in enumerate(items)]
    tokens = fit_tokens(pipe, odd, NAMES, **FAST)
    assert tokens.metadata["prediction_type"] == "v_prediction" and np.isfinite(tokens.metadata["final_loss"])
    assert tokens.metadata["resolution"] == 32
    small = fit_tokens(pipe, odd, NAMES, resolution=16, **FAST)
    assert small.metadata["resolution"] == 16


# -- the caller's pipeline ---------------------------------------------------------------------------
def test_only_new_rows_change_and_pipeline_restored(items):
    pipe = tiny_pipeline(seed=0)
    pipe.unet.train()
    before = _state(pipe)
    vocab, module = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings()
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    fit_tokens(pipe, items, NAMES, num_vectors=2, **FAST)
    after = _state(pipe)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert len(pipe.tokenizer) == vocab and "<cat>" not in pipe.tokenizer.get_vocab()
    assert pipe.text_encoder.get_input_embeddings() is module
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    assert pipe.unet.training and not pipe.text_encoder.training
    assert all(p.grad is None for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


def test_pipeline_restored_on_error(items):
    pipe = tiny_pipeline(seed=0)
    module = pipe.text_encoder.get_input_embeddings()

    def boom(step, loss):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fit_tokens(pipe, items, NAMES, _on_step=boom, **FAST)
    assert pipe.text_encoder.get_input_embeddings() is module


def test_spec_does_not_touch_shared_pipeline(tiny_folder, items):
    from dafusion_aug import load_pipeline

    spec = PipelineSpec(str(tiny_folder), device="cpu")
    shared = load_pipeline(spec)
    vocab = len(shared.tokenizer)
    tokens = fit_tokens(spec, items, NAMES, **FAST)
    assert tokens.metadata["base_model"] == spec.fingerprint()
    assert len(shared.tokenizer) == vocab and load_pipeline(spec) is shared
    same = fit_tokens(str(tiny_folder), items, NAMES, device="cpu", **FAST)
    assert all(torch.equal(a, b) for a, b in zip(tokens.embeddings, same.embeddings))


# -- use with DiffusionAugment -----------------------------------------------------------------------
def test_tokens_drive_diffusion_augment(items):
    pipe = tiny_pipeline(seed=0)
    tokens = fit_tokens(pipe, items, NAMES, num_vectors=2, **FAST)
    aug = DiffusionAugment(pipe, tokens=tokens, num_inference_steps=4, num_variants=2, p=1.0)
    applied = aug.pipeline()
    digest = image_digest(np.asarray(items[0][0]))
    variant = aug.variant(digest, 2, 0)
    assert "<zebra>" in variant.prompt
    ids = applied.tokenizer(applied.maybe_convert_prompt(variant.prompt, applied.tokenizer)).input_ids
    learned = applied.tokenizer.convert_tokens_to_ids(["<zebra>", "<zebra>_1"])
    assert all(i in ids for i in learned)
    rows = applied.text_encoder.get_input_embeddings().weight.detach()[learned]
    assert torch.equal(rows, tokens.embeddings[2])
    out, label = aug(items[6][0], 2)
    assert isinstance(out, Image.Image) and out.size == (32, 32) and label == 2
    # Fitting again on a pipeline that already holds our tokens is allowed (they are replaced when applied).
    again = fit_tokens(applied, items, NAMES, num_vectors=2, **FAST)
    assert all(torch.equal(a, b) for a, b in zip(again.embeddings, tokens.embeddings))


def test_saved_file_round_trip(pipe, items, tmp_path):
    tokens = fit_tokens(pipe, items, NAMES, **FAST)
    loaded = ClassTokens.load(tokens.save(tmp_path / "tokens.safetensors"))
    assert loaded.content_hash() == tokens.content_hash()
    assert loaded.metadata["base_model"] == tokens.metadata["base_model"]
    assert loaded.metadata["final_loss"] == tokens.metadata["final_loss"]


# -- checkpoints -------------------------------------------------------------------------------------
def test_resume_is_bitwise_identical(pipe, items, tmp_path):
    args = dict(steps=10, batch_size=3, learning_rate=1e-2, progress=False)
    full = fit_tokens(pipe, items, NAMES, **args)

    def interrupt(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, checkpoint_every=4, _on_step=interrupt, **args)
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-00000004.json", "checkpoint-00000004.safetensors"]
    seen = []
    resumed = fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, checkpoint_every=4, _on_step=lambda s, loss: seen.append(s), **args)
    assert seen == [5, 6, 7, 8, 9, 10]
    assert all(torch.equal(a, b) for a, b in zip(full.embeddings, resumed.embeddings))
    assert resumed.metadata["final_loss"] == full.metadata["final_loss"]
    info = json.loads((ckpt / "checkpoint-00000010.json").read_text())
    assert info["step"] == 10 and info["config"]["class_names"] == NAMES
    # A finished run resumes to the same result without training.
    seen.clear()
    done = fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, _on_step=lambda s, loss: seen.append(s), **args)
    assert seen == [] and all(torch.equal(a, b) for a, b in zip(full.embeddings, done.embeddings))
    # Extending a run continues from its last checkpoint (constant learning rate, stream indexed by step).
    longer = fit_tokens(pipe, items, NAMES, **{**args, "steps": 12})
    extended = fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, **{**args, "steps": 12})
    assert all(torch.equal(a, b) for a, b in zip(longer.embeddings, extended.embeddings))


def test_checkpoint_from_other_run_is_refused(pipe, items, tmp_path):
    ckpt = tmp_path / "ckpt"
    fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, checkpoint_every=2, **FAST)
    with pytest.raises(FitError, match="learning_rate"):
        fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, **{**FAST, "learning_rate": 2e-2})
    with pytest.raises(FitError, match="num_images"):
        fit_tokens(pipe, items[:-1], NAMES, checkpoint_dir=ckpt, **FAST)
    with pytest.raises(FitError, match="past steps"):
        fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, **{**FAST, "steps": 2})
    other = {**FAST, "learning_rate": 2e-2, "steps": 3}
    fresh = fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, resume=False, **other)
    assert fresh.metadata["learning_rate"] == 2e-2
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-00000003.json", "checkpoint-00000003.safetensors"]
    again = fit_tokens(pipe, items, NAMES, checkpoint_dir=ckpt, **other)
    assert all(torch.equal(a, b) for a, b in zip(fresh.embeddings, again.embeddings))
    assert not any(p.suffix == ".pkl" or p.suffix == ".pt" for p in ckpt.iterdir())


# -- data forms ----------------------------------------------------------------------------------------
def _write_folder(root, items, names=NAMES):
    for i, (im, y) in enumerate(items):
        d = root / names[y]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:02d}.png")
    return root


def test_data_forms_agree(pipe, items, tmp_path):
    from torchvision.datasets import ImageFolder

    root = _write_folder(tmp_path / "data", items)
    by_folder = fit_tokens(pipe, root, **FAST)
    by_imagefolder = fit_tokens(pipe, ImageFolder(str(root)), **FAST)
    by_list = fit_tokens(pipe, [(p, y) for p, y in ImageFolder(str(root)).samples], NAMES, **FAST)
    by_names = fit_tokens(pipe, [(im, NAMES[y]) for im, y in items], NAMES, **FAST)
    by_tensor = fit_tokens(pipe, [(torch.from_numpy(np.array(im)).permute(2, 0, 1), y) for im, y in items], NAMES, **FAST)
    ref = fit_tokens(pipe, items, NAMES, **FAST)
    for other in (by_folder, by_imagefolder, by_list, by_names, by_tensor):
        assert other.class_names == NAMES
        assert all(torch.equal(a, b) for a, b in zip(ref.embeddings, other.embeddings))


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_data(pipe, items, tmp_path):
    with pytest.raises(FitError, match="empty"):
        fit_tokens(pipe, [], NAMES, **FAST)
    with pytest.raises(FitError, match="'zebra' \\(label 2\\) has no images"):
        fit_tokens(pipe, items[:6], NAMES, **FAST)
    with pytest.raises(FitError, match=r"label of data\[9\] must be in \[0, 3\), got 5"):
        fit_tokens(pipe, items + [(items[0][0], 5)], NAMES, **FAST)
    with pytest.raises(FitError, match=r"label of data\[9\] 'lion' is not one of the class names \['cat', 'dog', 'zebra'\]"):
        fit_tokens(pipe, items + [(items[0][0], "lion")], NAMES, **FAST)
    with pytest.raises(ValueError, match="class_names is required"):
        fit_tokens(pipe, items, **FAST)
    root = _write_folder(tmp_path / "data", items)
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(FitError, match="broken.png"):
        fit_tokens(pipe, root, **FAST)
    assert isinstance(FitError("x"), DafusionError) and isinstance(FitError("x"), ValueError)


def test_bad_initializer(pipe, items):
    with pytest.raises(FitError, match="initializer 'xyzzyq' is not a word"):
        fit_tokens(pipe, items, NAMES, initializer="xyzzyq", **FAST)
    with pytest.raises(FitError, match="class '   '"):
        fit_tokens(pipe, items, ["cat", "dog", "   "], **FAST)


def test_existing_token_is_refused(items):
    pipe = tiny_pipeline(seed=0)
    pipe.load_textual_inversion(torch.ones(1, 32), token="<dog>")
    with pytest.raises(FitError, match="'<dog>' \\(class 'dog'\\) is already in the tokenizer"):
        fit_tokens(pipe, items, NAMES, **FAST)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_vectors=0), "num_vectors"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(templates=["no placeholder"]), "template"),
        (dict(resolution=30), "resolution"),
        (dict(checkpoint_every=0), "checkpoint_every"),
        (dict(device="cpu"), "device and dtype"),
    ],
)
def test_bad_arguments(pipe, items, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_tokens(pipe, items, NAMES, **{**FAST, **kwargs})


@pytest.mark.parametrize("kwargs, match", [(dict(steps=2.0), "steps must be an int, got float: 2.0"), (dict(seed="0"), "seed must be an int, got str")])
def test_non_integers_are_type_errors(pipe, items, kwargs, match):
    with pytest.raises(TypeError, match=match):
        fit_tokens(pipe, items, NAMES, **{**FAST, **kwargs})


def test_numpy_integers_are_plain_ints_to_fit_tokens(pipe, items):
    as_numpy = fit_tokens(pipe, items, NAMES, **{**FAST, "steps": np.int64(FAST["steps"]), "batch_size": np.int32(FAST["batch_size"]),
                                                 "seed": np.int64(0)})
    plain = fit_tokens(pipe, items, NAMES, **FAST)
    assert as_numpy.content_hash() == plain.content_hash()


def test_no_training_step_before_errors(pipe, items):
    calls = []
    with pytest.raises(FitError):
        fit_tokens(pipe, items, NAMES, initializer="xyzzyq", _on_step=lambda s, loss: calls.append(s), **FAST)
    assert calls == []


# -- CLI ---------------------------------------------------------------------------------------------
def test_cli_fit_tokens(tiny_folder, items, tmp_path, capsys):
    data = _write_folder(tmp_path / "data", items)
    out = tmp_path / "tokens.safetensors"
    args = ["fit-tokens", "--model", str(tiny_folder), "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2"]
    args += ["--lr", "1e-2", "--num-vectors", "2", "--initializer", "the", "--device", "cpu", "--quiet"]
    assert main(args + ["--checkpoint-dir", str(tmp_path / "ckpt"), "--seed", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == ["<cat>", "<dog>", "<zebra>"]
    tokens = ClassTokens.load(out)
    assert tokens.class_names == NAMES and tokens.num_vectors == 2
    assert tokens.metadata["base_model"] == PipelineSpec(str(tiny_folder)).fingerprint()
    assert tokens.metadata["initializer"] == "the" and tokens.metadata["seed"] == 1
    assert main(args + ["--initializer", "xyzzyq"]) == 2
    assert "xyzzyq" in capsys.readouterr().err


# -- class names never reach file paths raw (issue 8) ----------------------------------------------------
def test_fit_checkpoints_never_use_class_names(tmp_path):
    from dafusion_aug import fit_tokens

    names = ["../../evil", "nul\x00byte", "y" * 5000]
    items = [(random_image(i), i % 3) for i in range(3)]
    ckpt = tmp_path / "ckpt"
    fit_tokens(tiny_pipeline(seed=0), items, names, initializer="a", steps=2, batch_size=3, checkpoint_dir=ckpt, checkpoint_every=1, progress=False)
    assert {p.name for p in ckpt.iterdir()} <= {f"checkpoint-{s:08d}.{e}" for s in (1, 2) for e in ("json", "safetensors")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
