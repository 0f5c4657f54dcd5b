"""The package as a whole: its public API, the old import paths, and what its source must never contain.
"""

from __future__ import annotations

import importlib
import re
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
