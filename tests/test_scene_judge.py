"""The scene judge: its targets follow the renderer's scene, it trains, saves, loads and refuses stale heads."""

import json

import numpy as np
import pytest
import torch

from dafusion_aug.pocket import scene_judge as sj
from dafusion_aug.pocket.scenes import BACKGROUNDS, CLUTTER_SHAPES, scenes


def test_targets_name_what_the_scene_holds():
    data = scenes("B")
    for i in range(40):
        scene = data.scene(i)
        t = sj.scene_targets(scene)
        assert sj.HEADS["glyph"][0][int(t["glyph"])] == scene.glyph_colour
        assert BACKGROUNDS[int(t["background"])] == scene.background
        on = {n for n, v in zip(sj.HEADS["colours"][0], t["colours"]) if v}
        assert on == ({scene.colours[0]} if scene.background == "plain" else set(scene.colours))
        assert {s for s, v in zip(CLUTTER_SHAPES, t["shapes"]) if v} == {c.shape for c in scene.clutter}


def test_a_short_training_run_reads_every_head_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    net = sj.train_scene_judge(count=64, steps=3, batch_size=16, progress=False)
    images, _ = sj.render_training_scenes(8, seed=5)
    read = sj.read_scenes(net, images)
    assert read["glyph"].shape == (8,) and read["colours"].shape == (8, len(sj.HEADS["colours"][0]))
    path = sj.save_scene_judge(net, tmp_path / "sj.safetensors")
    again = sj.load_scene_judge(path)
    with torch.no_grad():
        assert torch.allclose(net(images), again(images), atol=0.05)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_judge_of_other_heads_is_refused(tmp_path, monkeypatch):
    net = sj.SceneJudgeNet(width=8)
    path = sj.save_scene_judge(net, tmp_path / "sj.safetensors")
    monkeypatch.setitem(sj.HEADS, "shapes", (("disc", "square", "bar", "star"), False))
    with pytest.raises(ValueError, match="other heads"):
        sj.load_scene_judge(path)
    with pytest.raises(FileNotFoundError, match="scene judge not found"):
        sj.load_scene_judge(tmp_path / "missing.safetensors")


def test_accuracy_is_one_on_the_truth_and_counts_misses():
    class Oracle(torch.nn.Module):  # logits built from the true targets: the accuracy must be 1
        def __init__(self, scene_list):
            super().__init__()
            self.rows = []
            for s in scene_list:
                t = sj.scene_targets(s)
                row = []
                for name, (names, single) in sj.HEADS.items():
                    v = np.eye(len(names))[int(t[name])] if single else t[name]
                    row += list(v * 20 - 10)
                self.rows.append(row)
            self.training = False

        def forward(self, images):
            return torch.tensor(self.rows[: len(images)], dtype=torch.float32)

    data = scenes("B")
    scene_list = [data.scene(i) for i in range(6)]
    images = torch.zeros(6, 3, 32, 32)
    assert all(v == 1.0 for v in sj.scene_judge_accuracy(Oracle(scene_list), images, scene_list).values())
    shifted = scene_list[1:] + scene_list[:1]
    acc = sj.scene_judge_accuracy(Oracle(shifted), images, scene_list)
    assert acc["glyph"] < 1.0 or acc["background"] < 1.0
    json.dumps(acc)
