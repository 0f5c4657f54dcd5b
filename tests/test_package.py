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
