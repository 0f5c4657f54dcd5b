"""The dafusion-aug command line: thin calls into the library, clear errors, resumable generation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
            "--inference-steps", "4", "--num-variants", "2", "--batch-size", "3", "--quiet", "--device", "cpu"]
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
                 "--strength", "0.01", "--inference-steps", "10"])
    assert code == 2
    assert "strength=0.01" in capsys.readouterr().err


def test_generate_refuses_a_token_file_of_other_classes(tmp_path, tiny_folder, capsys):
    import torch

    from dafusion_aug import ClassTokens

    tokens = ClassTokens(["cat", "zebra"], [torch.randn(1, 32), torch.randn(1, 32)]).save(tmp_path / "tokens.safetensors")
    code = main(["generate", "--model", str(tiny_folder), "--data", str(make_data(tmp_path / "data")), "--cache", str(tmp_path / "c"),
                 "--tokens", str(tokens), "--inference-steps", "4", "--num-variants", "1", "--quiet", "--device", "cpu"])
    assert code == 2
    assert "the token file's classes ['cat', 'zebra'] differ from the dataset's ['cat', 'dog']" in capsys.readouterr().err
    assert list(AugmentationCache(tmp_path / "c").keys()) == []


# -- issue 16: help pages, step names, data folders, the demo's extra -----------------------------------------
def _subparsers():
    import argparse

    from dafusion_aug.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_help_line_shows_its_default():
    import argparse

    for name, parser in _subparsers().items():
        text = "".join(parser.format_help().split())  # argparse wraps lines at hyphens too
        for action in parser._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
                continue
            shown = f"(default: {action.default})" if "%(default)" not in (action.help or "") else str(action.default)
            assert "".join(shown.split()) in text, f"{name} {action.option_strings[0]}: {shown}"
    assert "--inference-steps INFERENCE_STEPS denoising steps at strength 1 (num_inference_steps) (default: 50)" in \
        " ".join(_subparsers()["generate"].format_help().split())


def test_steps_are_named_by_meaning_and_the_old_spelling_warns(capsys):
    from dafusion_aug.cli import build_parser

    parser = build_parser()
    base = ["--model", "pocket", "--data", "d"]
    assert parser.parse_args(["generate", *base, "--cache", "c"]).inference_steps == 50
    assert parser.parse_args(["fit-tokens", *base, "--out", "t"]).train_steps == 1000
    assert parser.parse_args(["erase", "--model", "pocket", "--concept", "x", "--out", "e"]).train_steps == 1000
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["generate", *base, "--cache", "c", "--inference-steps", "9"]).inference_steps == 9
    old = parser.parse_args(["generate", *base, "--cache", "c", "--steps", "7"])
    assert old.inference_steps == 7 and not hasattr(old, "steps")
    assert "warning: --steps is deprecated here and will be removed in 0.2; use --inference-steps 7" in capsys.readouterr().err
    assert parser.parse_args(["fit-tokens", *base, "--out", "t", "--steps", "3"]).train_steps == 3
    assert "use --train-steps 3" in capsys.readouterr().err
    assert parser.parse_args(["erase", "--model", "pocket", "--concept", "x", "--out", "e", "--steps", "5"]).train_steps == 5


def test_a_file_as_data_says_it_is_a_file(tmp_path, tiny_folder, capsys):
    f = tmp_path / "images.zip"
    f.write_bytes(b"not a folder")
    code = main(["generate", "--model", str(tiny_folder), "--data", str(f), "--cache", str(tmp_path / "c")])
    assert code == 2
    assert f"error: data must be a folder with one sub-folder of images per class, but {str(f)!r} is a file" in capsys.readouterr().err


def test_the_parent_of_the_class_folders_warns_naming_them(tmp_path, tiny_folder):
    """Run as a user runs it (a fresh process, Python's own warning display, not pytest's recorder)."""
    import os

    root = tmp_path / "my_data"
    make_data(root / "train")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    args = ["generate", "--model", str(tiny_folder), "--data", str(root), "--cache", str(tmp_path / "c"),
            "--inference-steps", "4", "--num-variants", "1", "--quiet", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "dafusion_aug", *args], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1, run.stderr  # the broken image failed; the others were generated
    err = run.stderr
    assert "warning: data folder" in err and "has one sub-folder, 'train'" in err
    assert f"{str(root / 'train')!r} has the sub-folders ['cat', 'dog']: if those are the classes, pass that folder" in err
    assert "warning: precompute skipped 1 unreadable item(s), first: OSError: cannot read image" in err
    assert all(line.startswith("warning: ") for line in err.splitlines()), err  # one line each, no source echoed


def test_demo_checks_its_extra_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    assert 'error: dafusion-aug demo needs matplotlib, which is not installed: pip install "dafusion-aug[demo]"' in capsys.readouterr().err
    assert not out.exists()  # nothing was done


def test_a_gpu_setting_on_a_cpu_machine_is_one_error_line(tmp_path, tiny_folder, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    base = ["generate", "--model", str(tiny_folder), "--data", str(make_data(tmp_path / "d")), "--cache", str(tmp_path / "c"), "--quiet"]
    assert main([*base, "--device", "cuda"]) == 2
    assert "error: device='cuda', but no CUDA device is available on this machine" in capsys.readouterr().err
    assert main([*base, "--device", "cpu", "--dtype", "float16"]) == 2
    assert "error: dtype='float16' needs a GPU, but device='cpu'; float16 runs on CUDA only" in capsys.readouterr().err
    assert main([*base, "--dtype", "float16"]) == 2  # --device auto: no GPU here
    assert "error: dtype='float16' needs a GPU, but device='auto' and this machine has no CUDA device" in capsys.readouterr().err
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
    args = ["generate", "--model", str(tiny_folder), "--data", str(data), "--cache", str(tmp_path / "cache"), "--inference-steps", "4",
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
