"""The package as a whole: its public API, the old import paths, and what its source must never contain.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dafusion_aug

PACKAGE = Path(dafusion_aug.__file__).parent


def _package_sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return files


def test_no_remote_code_anywhere():
    offenders = [str(p.relative_to(PACKAGE)) for p in _package_sources() if "trust_remote_code" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_no_pickle_loads():
    unsafe = re.compile(r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bdill\.loads?\(|\bjoblib\.load\(|allow_pickle\s*=\s*True|\bmarshal\.loads?\(")
    torch_load = re.compile(r"\btorch\.load\((?P<args>[^)]*)\)")
    offenders = []
    for path in _package_sources():
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.name}: {m.group(0)}" for m in unsafe.finditer(text)]
        offenders += [f"{path.name}: {m.group(0)}" for m in torch_load.finditer(text) if "weights_only=True" not in m.group("args")]
    assert offenders == []


def test_public_api_imports():
    for name in dafusion_aug.__all__:
        assert getattr(dafusion_aug, name) is not None, name
    assert issubclass(dafusion_aug.FitError, dafusion_aug.DafusionError) and issubclass(dafusion_aug.FitError, ValueError)


@pytest.mark.parametrize(
    "module, names",
    [
        ("dafusion_aug.fewshot", ["run_fewshot", "FewShotResult", "METHODS", "build_erasures", "check_grid", "run_demo",
                                  "small_cnn", "resnet50_linear", "ClassifierSpec"]),
        ("dafusion_aug.erase", ["Erasure", "erase_concept", "parameter_names", "METHODS"]),
        ("dafusion_aug.fit", ["fit_tokens", "FitError", "IMAGENET_TEMPLATES"]),
        ("dafusion_aug.transform", ["DiffusionAugment", "Variant", "DEFAULT_STRENGTHS"]),
        ("dafusion_aug.pipeline", ["PipelineSpec", "load_pipeline", "pipeline_fingerprint", "resolve_dtype", "resolve_device"]),
        ("dafusion_aug.tokens", ["ClassTokens", "token_for_class"]),
    ],
)
def test_import_paths_users_have_keep_working(module, names):
    mod = importlib.import_module(module)
    for name in names:
        assert hasattr(mod, name), f"{module}.{name}"


HEAVY = ("torch", "torchvision", "diffusers", "transformers", "numpy", "PIL")


def _heavy_modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    import json
    import os
    import subprocess
    import sys

    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_cli_help_import_no_heavy_module():
    assert _heavy_modules_after("import dafusion_aug") == []
    help_run = "import contextlib, io\nfrom dafusion_aug.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main(['--help'])\n    except SystemExit:\n        pass"
    assert _heavy_modules_after(help_run) == []
    for command in ("generate", "fit-tokens", "erase", "demo", "info"):
        assert _heavy_modules_after(help_run.replace("'--help'", f"'{command}', '--help'")) == [], command
    assert "torch" in _heavy_modules_after("from dafusion_aug import DiffusionAugment")  # the name still loads what it needs


def test_public_names_are_the_defining_modules_objects():
    for name in dafusion_aug.__all__:
        if name == "__version__":
            continue
        module = importlib.import_module(f"dafusion_aug.{dafusion_aug._WHERE[name]}")
        assert getattr(dafusion_aug, name) is getattr(module, name), name
    assert set(dafusion_aug.__all__) <= set(dir(dafusion_aug))
    with pytest.raises(AttributeError, match="no attribute 'DiffusionAugmnet'"):
        dafusion_aug.DiffusionAugmnet  # noqa: B018


# -- issue 16: the wheel, as a user installs it -----------------------------------------------------------------
def _wheel_tools_missing() -> str | None:
    import importlib.util

    missing = [m for m in ("build", "hatchling") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"building the wheel offline needs {' and '.join(missing)} installed (both are in the [dev] extra): "
                "the test builds without build isolation, so nothing is downloaded")
    return None


@pytest.mark.skipif(_wheel_tools_missing() is not None, reason=_wheel_tools_missing() or "")
def test_the_wheel_installs_and_runs_in_a_fresh_environment(tmp_path):
    """Build the wheel, install it (no dependencies: they come from the site-packages of the environment running
    the test, so torch is not downloaded again) into a fresh virtual environment, and use it from there as a
    user would."""
    import os
    import subprocess
    import sys
    import zipfile

    root = PACKAGE.parent
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(root)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("dafusion_aug-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for inside in ("dafusion_aug/py.typed", "dafusion_aug/pocket/model/model_index.json", "dafusion_aug/pocket/judge.safetensors",
                   "dafusion_aug/pocket/model/unet/diffusion_pytorch_model.safetensors"):
        assert inside in names, inside
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) or "__pycache__" in n for n in names)

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The dependencies come from the environment running this test, wherever that is (a venv, conda, the
    # system Python): ``--system-site-packages`` would expose the *base* interpreter's packages, not an
    # active venv's. Plain path lines, so that its .pth files (an editable install of this checkout) are not run.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=120).stdout.strip()
    outer = [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    assert outer, sys.path
    (Path(purelib) / "_outer_environment.pth").write_text("\n".join(outer) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # nothing but the venv's copy
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")

    demo = subprocess.run([str(venv / "bin" / "dafusion-aug"), "demo", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert demo.returncode == 0, demo.stderr
    assert "--full" in demo.stdout and "(default: dafusion-demo)" in " ".join(demo.stdout.split()).replace("- ", "-")
    probe = (
        "import os, dafusion_aug\n"
        f"assert dafusion_aug.__file__.startswith({str(venv)!r}), dafusion_aug.__file__\n"
        "missing = [n for n in dafusion_aug.__all__ if getattr(dafusion_aug, n, None) is None]\n"
        "assert not missing, missing\n"
        "from dafusion_aug.pocket import model_path\n"
        "assert (model_path() / 'model_index.json').is_file()\n"
        "print('ok', dafusion_aug.__version__)\n"
    )
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip() == f"ok {dafusion_aug.__version__}"


def test_importing_a_submodule_first_keeps_the_public_function():
    """``dafusion_aug.precompute`` is the function even when library code imported the submodule of that name
    before anyone asked for the function (lazy names, PEP 562: the import system sets the package attribute)."""
    code = ("import importlib, inspect, dafusion_aug; m = importlib.import_module('dafusion_aug.precompute'); "
            "assert inspect.isfunction(dafusion_aug.precompute), dafusion_aug.precompute; "
            "assert dafusion_aug.precompute is m.precompute and m.plan_batches")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_no_function_passes_120_lines():
    """The house rule (issue 33: ``run_fewshot`` had 123): a longer function is two functions."""
    import ast

    long = []
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 120:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
