"""PipelineSpec, load_pipeline and fingerprints; the tiny pipeline itself."""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dafusion_aug import PipelineSpec, load_pipeline
from dafusion_aug.errors import PipelineError
from dafusion_aug.pipeline import pipeline_fingerprint, resolve_device
from dafusion_aug.testing import tiny_pipeline


def test_tiny_pipeline_is_fast_offline_and_seeded():
    t0 = time.perf_counter()
    a = tiny_pipeline(seed=0)
    assert time.perf_counter() - t0 < 5.0
    state = torch.random.get_rng_state()
    b, c = tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (p.unet.conv_in.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.unet.config.sample_size * a.vae_scale_factor == 32
    assert any("attn2" in n for n, _ in a.unet.named_modules())
    assert "zebra</w>" in a.tokenizer.get_vocab()
    assert a.tokenizer.tokenize("qwxz") == ["q", "w", "x", "z</w>"]  # character fall-back


def test_local_folder_loads_once_per_process(tiny_folder):
    spec = PipelineSpec(str(tiny_folder), device="cpu")
    pipe = load_pipeline(spec)
    assert load_pipeline(PipelineSpec(str(tiny_folder), device="cpu")) is pipe
    assert spec.load() is pipe
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    ref = tiny_pipeline(seed=0)
    assert torch.equal(pipe.unet.conv_in.weight, ref.unet.conv_in.weight)


def test_spec_pickles_small_and_fingerprint_is_stable_across_processes(tiny_folder):
    spec = PipelineSpec(str(tiny_folder), device="cpu", scheduler="ddim")
    assert len(pickle.dumps(spec)) < 1000
    code = f"from dafusion_aug import PipelineSpec; print(PipelineSpec({str(tiny_folder)!r}, scheduler='ddim').fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == spec.fingerprint()
    assert PipelineSpec(str(tiny_folder), scheduler="euler").fingerprint() != out
    assert PipelineSpec(str(tiny_folder), dtype="bfloat16").fingerprint() == PipelineSpec(str(tiny_folder)).fingerprint()


def test_fingerprint_follows_weight_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_pipeline(seed=0).save_pretrained(a)
    tiny_pipeline(seed=1).save_pretrained(b)
    assert PipelineSpec(str(a)).fingerprint() != PipelineSpec(str(b)).fingerprint()


def test_hub_ids_fingerprint_without_network():
    a = PipelineSpec("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert a.local_path() is None
    assert a.fingerprint() == PipelineSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", revision="main").fingerprint()
    assert a.fingerprint() != PipelineSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", revision="fp16").fingerprint()


def test_loaded_pipeline_fingerprint_ignores_added_tokens():
    from dafusion_aug import ClassTokens

    pipe, other = tiny_pipeline(seed=0), tiny_pipeline(seed=0)
    before = pipeline_fingerprint(other)
    ClassTokens(["cat"], [torch.randn(1, 32)]).apply(pipe)
    assert pipeline_fingerprint(pipe) == before
    assert pipeline_fingerprint(tiny_pipeline(seed=1)) != before


def test_missing_models_fail_clearly(tmp_path):
    with pytest.raises(PipelineError, match="could not load"):
        load_pipeline(PipelineSpec("nobody/nothing", local_files_only=True, device="cpu"))
    with pytest.raises(PipelineError, match="neither a model folder"):
        PipelineSpec(str(tmp_path / "missing" / "x")).fingerprint()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="holds no weights"):
        PipelineSpec(str(empty)).fingerprint()


def test_only_safetensors_are_loaded(tmp_path):
    folder = tmp_path / "bin"
    tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    with pytest.raises(PipelineError, match="safetensors"):
        load_pipeline(PipelineSpec(str(folder), device="cpu"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="x/y", dtype="int8"), "dtype must be"),
        (dict(model="x/y", scheduler="magic"), "scheduler must be"),
        (dict(model="x/y", device="gpu0"), "device must be"),
        (dict(model=""), "model must be"),
        (dict(model="x/y", erasure="/no/such/file.safetensors"), "erasure file not found"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        PipelineSpec(**kwargs)


def test_scheduler_swap(tiny_folder):
    pipe = load_pipeline(PipelineSpec(str(tiny_folder), device="cpu", scheduler="euler"))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


# -- bad model folders and the Hub (issue 8) -------------------------------------------------------------
def test_scheduler_class_is_read_without_loading(tiny_folder, tmp_path):
    assert PipelineSpec(str(tiny_folder)).scheduler_class() == "DDIMScheduler"  # the folder's scheduler_config.json
    assert PipelineSpec(str(tiny_folder), scheduler="dpm++").scheduler_class() == "DPMSolverMultistepScheduler"
    assert PipelineSpec("pocket").scheduler_class() == "DDIMScheduler"
    assert PipelineSpec("nobody/not-in-the-cache").scheduler_class() is None  # the HF cache only, never the network
    (tmp_path / "bare" / "scheduler").mkdir(parents=True)
    (tmp_path / "bare" / "scheduler" / "scheduler_config.json").write_text("[1, 2]")  # not a config
    assert PipelineSpec(str(tmp_path / "bare")).scheduler_class() is None
    assert PipelineSpec(str(tmp_path)).scheduler_class() is None  # no scheduler folder


def test_corrupt_model_folder_is_a_pipeline_error(tiny_folder, tmp_path):
    """A folder of .bin pickles: test_pipeline.py::test_only_safetensors_are_loaded."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="could not load an img2img pipeline from folder"):
        load_pipeline(PipelineSpec(str(folder), device="cpu"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE is set as well)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_only_for_hub_ids(no_network, tiny_folder, tmp_path):
    with pytest.raises(PipelineError, match="could not load an img2img pipeline from Hub id 'nobody/nothing'"):
        load_pipeline(PipelineSpec("nobody/nothing", local_files_only=True, device="cpu", scheduler="pndm"))
    for bad in ("my_model", str(tmp_path / "missing"), "./model", "a/b/c"):
        with pytest.raises(PipelineError, match="neither a model folder nor a Hub id"):
            load_pipeline(PipelineSpec(bad, device="cpu"))
    pipe = load_pipeline(PipelineSpec(str(tiny_folder), device="cpu", scheduler="euler-a"))  # local: no Hub call at all
    assert pipe is not None


# -- issue 15: devices this machine does not have, and an unreachable Hub ---------------------------------
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_cuda_without_a_gpu_is_named_at_load(tiny_folder, no_cuda, tmp_path):
    """device='cuda' on a machine without CUDA raised torch's raw driver error from pipe.to(); the spec is
    still built (it may be sent to GPU workers), and loading says what is wrong."""
    spec = PipelineSpec(str(tiny_folder), device="cuda")
    with pytest.raises(PipelineError, match=r"device='cuda', but no CUDA device is available on this machine \(torch.cuda.is_available\(\) is False\)"):
        load_pipeline(spec)
    from dafusion_aug import DiffusionAugment

    aug = DiffusionAugment(str(tiny_folder), device="cuda", class_names=["cat"], num_inference_steps=2, strength=1.0, p=1.0,
                           num_variants=1, cache=tmp_path / "c")
    with pytest.raises(PipelineError, match="no CUDA device is available"):
        aug(Image.new("RGB", (8, 8)), 0)


def test_cuda_index_beyond_the_devices_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PipelineError, match=r"device='cuda:3', but this machine has 1 CUDA device\(s\) \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:3", require_available=True)
    assert resolve_device("cuda:3") == torch.device("cuda:3")  # building a spec does not check


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset (as for most users) and no network: every connection fails."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_unreachable_hub_is_said_plainly(unreachable_hub):
    """With HF_HUB_OFFLINE unset and no network, the PipelineError said "outgoing traffic has been disabled"
    (the user disabled nothing) and "check out the root cause in the stacktrace above" (the CLI prints none)."""
    with pytest.raises(PipelineError) as info:
        load_pipeline(PipelineSpec("nobody/nothing", device="cpu"))
    message = str(info.value)
    assert "could not load an img2img pipeline from Hub id 'nobody/nothing' (revision main): it is not (fully) in the local " \
           "Hugging Face cache, and the Hub could not be reached (OSError: network is unreachable" in message
    assert "outgoing traffic" not in message and "stacktrace" not in message


def test_offline_and_local_files_only_are_named(unreachable_hub, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(PipelineError, match="it is not in the local Hugging Face cache, and local_files_only=True forbids downloading it"):
        load_pipeline(PipelineSpec("nobody/nothing", device="cpu", local_files_only=True))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE is set, so the Hub was not asked") as info:
        load_pipeline(PipelineSpec("nobody/other", device="cpu"))
    assert "stacktrace" not in str(info.value)


# -- issue 16: device="auto" everywhere, float16 only on CUDA ------------------------------------------------
def test_auto_is_the_default_device_everywhere():
    import inspect

    from dafusion_aug import DiffusionAugment, fit_tokens
    from dafusion_aug.fewshot import run_fewshot
    from dafusion_aug.pipeline import resolve_pipeline

    for fn in (DiffusionAugment.__init__, fit_tokens, run_fewshot, resolve_pipeline, resolve_device):
        assert inspect.signature(fn).parameters["device"].default == "auto", fn.__qualname__
    assert PipelineSpec("pocket").device == "auto" and PipelineSpec("pocket", device=None) == PipelineSpec("pocket")
    assert PipelineSpec("pocket", device="cuda").device == "cuda"  # a GPU spec can still be built on a CPU machine


def test_auto_resolves_to_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_auto_keeps_a_specs_own_device_and_a_loaded_pipeline():
    from dafusion_aug.pipeline import resolve_pipeline

    assert resolve_pipeline(PipelineSpec("pocket", device="cuda:1")).spec.device == "cuda:1"
    assert resolve_pipeline(PipelineSpec("pocket", device="cuda:1"), device="auto").spec.device == "cuda:1"
    assert resolve_pipeline(PipelineSpec("pocket"), device="cpu").spec.device == "cpu"
    pipe = tiny_pipeline(seed=0)
    assert resolve_pipeline(pipe, device="auto").pipe is pipe  # "auto" is no request to move it
    with pytest.raises(ValueError, match="move a loaded pipeline"):
        resolve_pipeline(pipe, device="cpu")


def test_float16_on_the_cpu_is_refused_naming_both_arguments(tiny_folder, no_cuda):
    with pytest.raises(ValueError, match=r"dtype='float16' needs a GPU, but device='cpu'"):
        PipelineSpec(str(tiny_folder), device="cpu", dtype="float16")
    with pytest.raises(ValueError, match=r"dtype='fp16' needs a GPU"):
        PipelineSpec(str(tiny_folder), device="cpu", dtype="fp16")
    spec = PipelineSpec(str(tiny_folder), dtype="float16")  # "auto": decided where the model loads
    with pytest.raises(PipelineError, match=r"dtype='float16' needs a GPU, but device='auto' and this machine has no CUDA device"):
        load_pipeline(spec)
    assert PipelineSpec(str(tiny_folder), device="cpu", dtype="bfloat16").dtype == "bfloat16"  # bfloat16 works on CPUs


QUIET_RUN = """
import numpy as np, torch
from PIL import Image
from dafusion_aug import ClassTokens, DiffusionAugment
from diffusers.utils import logging as d_logging
from transformers.utils import logging as t_logging

from dafusion_aug.pocket import model_path
import json
width = json.loads((model_path() / "text_encoder" / "config.json").read_text())["hidden_size"]
tokens = ClassTokens(["zero", "one"], [torch.randn(2, width), torch.randn(2, width)])  # two vectors: four new rows
aug = DiffusionAugment("pocket", tokens=tokens, p=1.0, num_variants=2, num_inference_steps=4, device="cpu")
image, label = aug(Image.fromarray(np.zeros((32, 32, 3), np.uint8)), 1)
assert image.size == (32, 32) and label == 1
assert d_logging.is_progress_bar_enabled() and t_logging.is_progress_bar_enabled()  # the user's switches restored
print("done")
"""


def test_a_normal_run_prints_no_third_party_noise():
    """Loading, applying tokens and generating printed diffusers' torch_dtype deprecation, its accelerate
    notice, two loading bars and transformers' mean-resizing warning (issue 16); a fresh process shows all."""
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="default")  # every warning shown, as in a user's script
    run = subprocess.run([sys.executable, "-c", QUIET_RUN], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "done"
    assert run.stderr.strip() == "", run.stderr
