"""The examples run: the ImageFolder script with --tiny, and the quickstart notebook on the pocket model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _pocket_missing() -> str | None:
    try:
        from dafusion_aug.pocket import model_path

        model_path()
    except (FileNotFoundError, ImportError) as e:
        return f"the pocket model is not available ({e}); the notebook needs it"
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES.parent), env.get("PYTHONPATH", "")])
    return env


def test_imagefolder_sd15_tiny(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "imagefolder_sd15.py"), "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "class-balanced accuracy" in proc.stdout
    assert (out / "tokens.safetensors").is_file() and (out / "classifier.pt").is_file()
    assert any((out / "cache").rglob("*.webp")), "precompute wrote no variants"
    # a rerun finds the tokens and every variant in place
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 generated" in again.stdout


@pytest.mark.skipif(_pocket_missing() is not None, reason=_pocket_missing() or "")
def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MPLBACKEND", "PYTHONPATH")}
    os.environ.update({k: v for k, v in _env().items() if k in old})
    try:
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "class-balanced accuracy: baseline" in text
    assert (tmp_path / "quickstart-output" / "tokens.safetensors").is_file()


README = EXAMPLES.parent / "README.md"


def readme_python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(heading)) + len("```python\n")
    return text[start : text.index("```", start)]


@pytest.mark.skipif(_pocket_missing() is not None, reason=_pocket_missing() or "")
def test_readme_quickstart_runs_on_a_cpu_with_the_pocket_model(tmp_path):
    """The README's quickstart as a user copies it, with "pocket" for the Stable Diffusion id, on a machine
    without CUDA (device="auto" picks the CPU; the dtype line picks float32)."""
    from PIL import Image

    code = readme_python_block("## Quickstart")
    assert code.count('"stable-diffusion-v1-5/stable-diffusion-v1-5"') == 1 and "device=" not in code.split("#")[0]
    code = code.replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"', '"pocket"')
    for c, shade in (("zero", 40), ("seven", 200)):
        (tmp_path / "my_data" / "train" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (shade, shade, shade)).save(tmp_path / "my_data" / "train" / c / "0.png")
    check = ("\nimages, labels = next(iter(loader))\n"
             "assert images.shape == (2, 3, 32, 32) and sorted(labels.tolist()) == [0, 1]\n"
             "assert aug.spec.device == 'auto' and str(aug.pipeline().device) == 'cpu'\n"
             "print('quickstart ok', len(list(aug.cache.keys())))\n")
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "quickstart ok 20" in proc.stdout  # 2 images x 10 variants cached
