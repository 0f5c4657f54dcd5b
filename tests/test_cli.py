"""The dafusion-aug command line: thin calls into the library, clear errors, resumable generation."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import random_image

from dafusion_aug import AugmentationCache
from dafusion_aug.cli import main


def make_data(root, classes=("cat", "dog"), n=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            random_image(i + 10 * len(c)).save(root / c / f"{i}.png")
    return root


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "dafusion_aug", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("dafusion-aug ")
    assert main([]) == 2


def test_info(capsys, tiny_folder):
    assert main(["info", "--model", str(tiny_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dafusion_aug"] and len(info["fingerprint"]) == 64


def test_generate_fills_the_cache_and_resumes(tmp_path, tiny_folder, capsys):
    data = make_data(tmp_path / "data")
    args = ["generate", "--model", str(tiny_folder), "--data", str(data), "--cache", str(tmp_path / "cache"),
            "--steps", "4", "--num-variants", "2", "--batch-size", "3", "--quiet", "--device", "cpu"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["generated"] == 8 and first["failed"] == 0
    assert len(list(AugmentationCache(tmp_path / "cache").keys())) == 8
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["generated"] == 0 and again["skipped"] == 8


def test_errors_are_one_line_and_exit_2(tmp_path, tiny_folder, capsys):
    code = main(["generate", "--model", str(tiny_folder), "--data", str(tmp_path / "none"), "--cache", str(tmp_path / "c")])
    assert code == 2
    assert "data folder not found" in capsys.readouterr().err
    code = main(["generate", "--model", str(tiny_folder), "--data", str(make_data(tmp_path / "d")), "--cache", str(tmp_path / "c"),
                 "--strength", "0.01", "--steps", "10"])
    assert code == 2
    assert "strength=0.01" in capsys.readouterr().err


def test_generate_refuses_a_token_file_of_other_classes(tmp_path, tiny_folder, capsys):
    import torch

    from dafusion_aug import ClassTokens

    tokens = ClassTokens(["cat", "zebra"], [torch.randn(1, 32), torch.randn(1, 32)]).save(tmp_path / "tokens.safetensors")
    code = main(["generate", "--model", str(tiny_folder), "--data", str(make_data(tmp_path / "data")), "--cache", str(tmp_path / "c"),
                 "--tokens", str(tokens), "--steps", "4", "--num-variants", "1", "--quiet", "--device", "cpu"])
    assert code == 2
    assert "the token file's classes ['cat', 'zebra'] differ from the dataset's ['cat', 'dog']" in capsys.readouterr().err
    assert list(AugmentationCache(tmp_path / "c").keys()) == []


def test_generate_with_a_region_and_a_clip_filter(tmp_path, tiny_folder, capsys):
    """generate --region --masks --filter clip (issue 18): the masks folder mirrors the data folder."""
    import numpy as np
    from PIL import Image

    from dafusion_aug.data import image_folder
    from dafusion_aug.testing import tiny_clip

    data = make_data(tmp_path / "data", classes=("cat", "zebra"), n=1)
    for c in ("cat", "zebra"):
        (tmp_path / "masks" / c).mkdir(parents=True)
        m = np.zeros((32, 32), np.uint8)
        m[4:20, 6:26] = 255
        Image.fromarray(m).save(tmp_path / "masks" / c / "0.png")
    clip = tiny_clip(tmp_path / "clip")
    args = ["generate", "--model", str(tiny_folder), "--data", str(data), "--cache", str(tmp_path / "cache"), "--steps", "4",
            "--num-variants", "1", "--quiet", "--device", "cpu", "--region", "background", "--masks", str(tmp_path / "masks"),
            "--mask-grow", "0", "--filter", "clip", "--clip-model", clip, "--filter-threshold", "0.2", "--max-tries", "2",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generated"] == 2 and result["accepted"] + result["fallen_back"] == 2
    for f in sorted((tmp_path / "out").rglob("*.png")):
        label = "cat" if "cat" in f.parent.name else "zebra"
        out, real = np.asarray(Image.open(f).convert("RGB")), np.asarray(Image.open(data / label / "0.png").convert("RGB"))
        assert np.array_equal(out[4:20, 6:26], real[4:20, 6:26])  # the masked object is the real one
    (tmp_path / "masks" / "cat" / "0.png").unlink()
    try:
        image_folder(data, masks=tmp_path / "masks")
    except FileNotFoundError as e:
        assert "no mask for image" in str(e) and "0.png" in str(e)
    else:
        raise AssertionError("a missing mask file must be an error")
