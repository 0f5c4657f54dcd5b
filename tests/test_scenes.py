"""The scene world (pocket v3): rendering, captions, redraws, the oracle-scene upper bound, colour augmentation."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from dafusion_aug.fewshot import run_fewshot
from dafusion_aug.fewshot.classifier import compose, random_affine, random_colour, small_cnn
from dafusion_aug.fewshot.oracle import SceneOracle
from dafusion_aug.pocket import CLASS_NAMES, digits
from dafusion_aug.pocket.scenes import (
    BACKGROUNDS,
    GLYPH_COLOURS,
    caption,
    draw_scene,
    render,
    sample_caption,
    scene_words,
    scenes,
    vocabulary,
)


@pytest.fixture(scope="module")
def part_b():
    return scenes("B")


def test_scenes_are_deterministic_rgb_and_the_halves_are_the_grey_worlds(part_b):
    again = scenes("B")
    assert len(part_b) == len(digits("B")) and part_b.targets == digits("B").targets
    for i in (0, 17, 500):
        a, y = part_b[i]
        assert a.mode == "RGB" and a.size == (32, 32) and y == part_b.targets[i]
        assert np.array_equal(np.asarray(a), np.asarray(again[i][0]))
    x, labels = part_b.tensors()
    assert x.shape == (len(part_b), 3, 32, 32) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert labels.tolist() == part_b.targets
    assert len(set(scenes("A").indices) & set(part_b.indices)) == 0
    with pytest.raises(ValueError, match="part must be 'A' or 'B', got 'C'"):
        scenes("C")
    with pytest.raises(IndexError):
        part_b[len(part_b)]


def test_the_scene_is_drawn_without_looking_at_the_digit(part_b):
    families = {c: set() for c in range(10)}
    colours = {c: set() for c in range(10)}
    for i, y in enumerate(part_b.targets):
        s = part_b.scene(i)
        families[y].add(s.background)
        colours[y].add(s.glyph_colour)
        assert s.glyph_colour not in s.colours and all(c.colour not in (s.glyph_colour, s.colours[0]) for c in s.clutter)
    assert all(f == set(BACKGROUNDS) for f in families.values())
    assert all(c == set(GLYPH_COLOURS) for c in colours.values())
    # the same seed draws the same scene whatever digit it is rendered with
    s = draw_scene(np.random.default_rng(5))
    assert s == draw_scene(np.random.default_rng(5))


def test_the_glyph_has_its_colour_and_stands_out_from_its_background_in_grey(part_b):
    luma = np.array([0.299, 0.587, 0.114])
    for i in range(0, 60, 7):
        s = part_b.scene(i)
        arr = part_b.array(i).astype(float)
        ink = part_b.alpha(i) >= 0.95  # nearly opaque: within 5 % of the glyph's colour
        assert ink.sum() >= 3
        assert np.allclose(arr[ink], np.asarray(GLYPH_COLOURS[s.glyph_colour]), atol=0.05 * 255 + 1)
        background = render(np.zeros((8, 8)), dataclasses.replace(s, clutter=())).astype(float)
        assert (background @ luma).max() <= 0.6 * (np.asarray(GLYPH_COLOURS[s.glyph_colour]) @ luma) + 1


def test_redraw_keeps_the_glyph_and_its_place_and_changes_the_scene(part_b):
    i = 3
    a, b, c = part_b.redraw(i, 1), part_b.redraw(i, 1), part_b.redraw(i, 2)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    ink = part_b.alpha(i) >= 0.999
    assert ink.sum() >= 3
    for seed in range(6):
        arr = np.asarray(part_b.redraw(i, seed)).astype(float)
        # every fully opaque glyph pixel holds one colour of the palette, the same at every such pixel
        assert np.ptp(arr[ink], axis=0).max() <= 1
        assert any(np.allclose(arr[ink][0], col, atol=1) for col in GLYPH_COLOURS.values())
    drawn = {np.asarray(part_b.redraw(i, seed)).tobytes() for seed in range(10)}
    assert len(drawn) == 10


def test_captions_name_the_scene_with_words_no_digit_owns(part_b):
    s = part_b.scene(0)
    y = part_b.targets[0]
    words = scene_words(s)
    text = caption(s, y)
    assert text.split()[1] == s.glyph_colour and CLASS_NAMES[y] in text and words["background"] in text
    assert caption(s, None).startswith(("a ", "an ")) and all(name not in caption(s, None).split() for name in CLASS_NAMES)
    allowed = set(vocabulary()) | set(CLASS_NAMES)
    rng = random.Random(0)
    kinds = {"empty": 0, "digit": 0, "no digit": 0}
    for i in range(400):
        j = i % len(part_b)
        text = sample_caption(part_b.scene(j), part_b.targets[j], rng)
        assert set(text.split()) <= allowed, text
        named = [w for w in text.split() if w in CLASS_NAMES]
        assert named in ([], [CLASS_NAMES[part_b.targets[j]]]), text
        kinds["empty" if not text else "digit" if named else "no digit"] += 1
    assert 20 <= kinds["empty"] <= 70 and kinds["digit"] > 200 and kinds["no digit"] > 60


def test_scene_oracle_redraws_with_probability_p_and_refuses_what_it_cannot_redraw(part_b):
    sample = part_b[5]
    torch.manual_seed(0)
    always = SceneOracle(part_b, num_variants=3, p=1.0)
    outs = {np.asarray(always(sample)[0]).tobytes() for _ in range(30)}
    assert len(outs) == 3 and always(sample)[1] == sample[1]
    assert SceneOracle(part_b, p=0.0)(sample) is sample
    with pytest.raises(TypeError, match="oracle-scene.*redraw its scenes.*DigitsDataset"):
        SceneOracle(digits("B"))
    with pytest.raises(ValueError, match="not in its training pool"):
        always((digits("B")[0][0], 0))
    with pytest.raises(ValueError, match="num_variants must be an int >= 1, got 0"):
        SceneOracle(part_b, num_variants=0)


def test_oracle_scene_runs_in_the_protocol_and_is_refused_on_the_grey_world(part_b, tmp_path):
    spec = small_cnn(steps=4, image_size=16, colour=True)
    res = run_fewshot("pocket", part_b, out=tmp_path / "scene", methods=["baseline", "oracle-scene"], shots=[1], seeds=[0],
                      classifier=spec, num_variants=2, p=0.5, device="cpu", progress=False)
    by = {r["method"]: r for r in res.rows}
    assert by["baseline"]["synthetic_share"] == 0.0 and 0.3 < by["oracle-scene"]["synthetic_share"] < 0.7
    assert by["baseline"]["classifier"] == "small-cnn-colour"
    with pytest.raises(TypeError, match="oracle-scene"):
        run_fewshot("pocket", digits("B"), out=tmp_path / "grey", methods=["oracle-scene"], shots=[1], seeds=[0],
                    classifier=spec, device="cpu", progress=False)
    assert not (tmp_path / "grey" / "results.json").exists()


def test_colour_augmentation_shuffles_greys_and_scales():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 0.5
    shuffled = random_colour(grey=0.0, brightness=(1.0, 1.0))(x)
    assert torch.equal(shuffled.sort(dim=1).values, x.sort(dim=1).values)
    assert not torch.equal(shuffled, x)
    grey = random_colour(shuffle=False, grey=1.0, brightness=(1.0, 1.0))(x)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    bright = random_colour(shuffle=False, grey=0.0, brightness=(1.5, 1.5))(x)
    assert torch.allclose(bright, (x * 1.5).clamp(0, 1))
    for bad, match in (({"grey": 1.5}, "grey must be a probability"), ({"brightness": (0.0, 1.0)}, "brightness must be a range")):
        with pytest.raises(ValueError, match=match):
            random_colour(**bad)
    flat = torch.full((4, 3, 16, 16), 0.4)
    assert torch.allclose(random_affine(degrees=30, padding="reflection")(flat), flat, atol=1e-5)
    assert random_affine(degrees=30)(flat).min() < 0.1  # zeros: black borders
    both = compose(random_affine(padding="reflection"), random_colour())(x)
    assert both.shape == x.shape
    with pytest.raises(ValueError, match="padding must be"):
        random_affine(padding="wrap")


def test_reports_label_the_oracle_and_give_each_method_its_share_of_the_reachable_gain():
    from dafusion_aug.fewshot.protocol import FewShotResult
    from dafusion_aug.fewshot.report import format_table, oracle_share, summarize

    acc = {("baseline", 0): 0.40, ("baseline", 1): 0.50, ("da-fusion", 0): 0.46, ("da-fusion", 1): 0.52,
           ("oracle-scene", 0): 0.60, ("oracle-scene", 1): 0.70}
    rows = [dict(method=m, k=1, seed=s, accuracy=a) for (m, s), a in acc.items()]
    assert oracle_share(rows, "da-fusion") == pytest.approx({1: 0.08 / 0.40})
    assert np.isnan(oracle_share([dict(r, accuracy=0.4) for r in rows], "da-fusion")[1])
    assert "| oracle-scene (upper bound: reads the renderer) |" in format_table(summarize(rows))
    text = FewShotResult(rows, 0.95, {}).report()
    assert "share of the reachable gain" in text and "| da-fusion | 20% |" in text
    assert "share of the reachable gain" not in FewShotResult([r for r in rows if r["method"] != "oracle-scene"], 0.95, {}).report()


def test_the_v3_bank_holds_redraws_and_grey_pictures_with_their_captions():
    from dafusion_aug.pocket.bank import scene_bank

    bank = scene_bank(copies=3, grey_copies=1)
    a = scenes("A")
    n = len(a)
    assert len(bank) == 3 * n and bank.images.shape == (3 * n, 3, 32, 32)
    assert bank.labels.tolist() == a.targets * 3 and bank.grey_share() == pytest.approx(1 / 3)
    assert torch.equal(bank.images[0], a.tensors()[0][0])  # the own scene first
    assert bank.scenes[n] == a.redrawn_scene(0, 1) and bank.scenes[n] != a.scene(0)
    assert torch.equal(bank.images[2 * n], digits("A").tensors()[0][0])  # then the grey world, as is
    rng = random.Random(1)
    grey = [bank.caption(2 * n + i, rng) for i in range(200)]
    assert any("white" in c and "plain black background" in c for c in grey)
    assert not any(w in c.split() for c in grey for w in ("striped", "disc", "pink"))
    for bad in ({"copies": 0}, {"copies": 2, "grey_copies": 2}):
        with pytest.raises(ValueError, match="copies"):
            scene_bank(**bad)


def test_glyph_weights_mark_the_latent_cells_the_glyph_touches():
    from dafusion_aug.pocket.bank import scene_bank
    from dafusion_aug.pocket.train import glyph_weights

    bank = scene_bank(copies=2, grey_copies=1)
    a = scenes("A")
    n = len(a)
    assert bank.alphas.shape == (2 * n, 1, 32, 32)
    assert np.array_equal(bank.alphas[5, 0].numpy(), a.alpha(5).astype(np.float32))  # the renderer's opacity
    assert torch.equal(bank.alphas[n + 5], bank.images[n + 5].mean(0, keepdim=True))  # a grey picture's brightness
    w = glyph_weights(bank.alphas, 3.0)
    assert w.shape == (2 * n, 1, 8, 8) and set(w.unique().tolist()) == {1.0, 4.0}
    alpha = a.alpha(5)
    for cy in range(8):
        for cx in range(8):
            touched = alpha[4 * cy : 4 * cy + 4, 4 * cx : 4 * cx + 4].max() > 0.25
            assert (w[5, 0, cy, cx] == 4.0) == touched
    share = float((w[:n] > 1).float().mean())
    assert 0.15 < share < 0.5  # a quarter to a third of a scene's cells: the glyph, not the background
    assert torch.equal(glyph_weights(bank.alphas, 0.0), torch.ones_like(w))
    for bad in (-1.0, float("inf"), True, "3"):
        with pytest.raises(ValueError, match="glyph_weight"):
            glyph_weights(bank.alphas, bad)


def test_quick_training_of_the_scene_world_writes_a_v3_model_with_the_scene_words(tmp_path):
    import json

    from diffusers import StableDiffusionImg2ImgPipeline

    from dafusion_aug.pocket import arch
    from dafusion_aug.pocket.train import main

    assert main(["--out", str(tmp_path), "--quick", "--world", "scenes", "--glyph-weight", "3", "--no-progress"]) == 0
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["pocket_version"] == 3 and report["config"]["world"] == "scenes" and report["bank"]["grey_share"] == 0.5
    assert report["config"]["glyph_weight"] == 3.0
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tmp_path / "model"))
    assert pipe.tokenizer.get_vocab() == arch.build_tokenizer(world="scenes").get_vocab()
    for word in ("striped", "speckled", "disc", "pink"):
        assert len(pipe.tokenizer.tokenize(word)) == 1, word
    assert arch.build_tokenizer().get_vocab() != pipe.tokenizer.get_vocab()  # v2's tokenizer is unchanged
    with pytest.raises(ValueError, match="world must be one of"):
        arch.build_tokenizer(world="photos")


def test_training_leaves_the_callers_thread_count_alone(tmp_path, monkeypatch):
    from dafusion_aug.pocket import train

    before = torch.get_num_threads()
    monkeypatch.setattr(train, "_run", lambda cfg, out, progress: {"threads": torch.get_num_threads()})
    target = 2 if before != 2 else 1
    assert train.run(train.TrainConfig(threads=target), tmp_path) == {"threads": target}
    assert torch.get_num_threads() == before
