"""Hardening (issue 8) across processes: DataLoader workers sharing a cache, and kill -9 then resume.

Rows of docs/reliability.md. Two precompute processes on one cache:
test_workers.py::test_two_processes_filling_one_cache_leave_only_whole_files; kill -9 during precompute:
test_generate.py::test_kill_9_leaves_no_corrupt_entry_and_the_rerun_completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, random_image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from dafusion_aug import AugmentationCache, AugmentedDataset, DiffusionAugment, PipelineSpec, precompute
from dafusion_aug.data import ImageList
from dafusion_aug.hashing import image_digest

# four workers on a two-core machine is the point of these tests
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


# DataLoader workers run with one intra-op thread; the in-process references must too, to match bitwise:
# the tests that compare with them use conftest.one_thread.


def _spec_aug(folder, cache, **kw):
    args = dict(class_names=CLASS_NAMES, num_inference_steps=2, strength=(0.5, 1.0), guidance_scale=2.0, num_variants=1, p=1.0)
    args.update(kw)
    return DiffusionAugment(PipelineSpec(str(folder), device="cpu"), cache=cache, **args)


def _whole_files_only(root: Path) -> list[str]:
    store = AugmentationCache(root)
    keys = list(store.keys())
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert all(store.get(k) is not None for k in keys)
    return keys


# -- DataLoader workers sharing one cache ------------------------------------------------------------
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_four_workers_two_epochs_one_cache_match_a_single_process(tiny_folder, tmp_path, context, one_thread):
    base = [(random_image(i), i % 3) for i in range(6)]
    items = base + base[:4]  # repeats: two workers may generate and write one key at the same time
    aug = _spec_aug(tiny_folder, tmp_path / "shared")  # p=1, M=1: no decision depends on the RNG
    loader = DataLoader(
        AugmentedDataset(ImageList(items), aug, transform=v2.PILToTensor()),
        batch_size=2,
        num_workers=4,
        multiprocessing_context=context,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    epochs = [torch.cat([images for images, _ in loader]) for _ in range(2)]
    reference = _spec_aug(tiny_folder, tmp_path / "single")
    single = DataLoader(AugmentedDataset(ImageList(items), reference, transform=v2.PILToTensor()), batch_size=2, num_workers=0)
    torch.manual_seed(0)
    expected = torch.cat([images for images, _ in single])
    assert torch.equal(epochs[0], expected) and torch.equal(epochs[1], expected)
    keys = _whole_files_only(aug.cache.root)
    assert sorted(keys) == sorted(_whole_files_only(reference.cache.root)) and len(keys) == 6
    for k in keys:
        assert np.array_equal(aug.cache.get(k), reference.cache.get(k))


class Served:
    """Yields (served image, index) so the test can check each served image against the cache."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        image, _ = self.inner[i]
        return image, i


def test_four_workers_reading_a_precomputed_cache_serve_only_cached_variants(tiny_folder, tmp_path):
    items = [(random_image(i), i % 3) for i in range(8)]
    filler = _spec_aug(tiny_folder, tmp_path / "c", num_variants=3)
    assert precompute(filler, ImageList(items), batch_size=8, progress=False)["generated"] == 24
    reader = _spec_aug(tiny_folder, tmp_path / "c", num_variants=3, p=0.5, on_miss="error")
    ds = Served(AugmentedDataset(ImageList(items), reader, transform=v2.PILToTensor()))
    loader = DataLoader(ds, batch_size=4, num_workers=4, multiprocessing_context="fork", persistent_workers=True)
    allowed = {}
    for i, (img, label) in enumerate(items):
        arr = np.asarray(img)
        allowed[i] = [arr] + [filler.cache.get(filler.cache_key(image_digest(arr), label, v)) for v in range(3)]
    torch.manual_seed(0)
    served = 0
    for _ in range(2):
        for images, index in loader:
            for image, i in zip(images, index.tolist()):
                got = image.permute(1, 2, 0).numpy()
                assert any(np.array_equal(got, a) for a in allowed[i])
                served += 1
    assert served == 16
    assert len(_whole_files_only(tmp_path / "c")) == 24  # readers never write


# -- kill -9, then resume ----------------------------------------------------------------------------
CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from PIL import Image
    torch.set_num_threads(1)
    from dafusion_aug import erase_concept, fit_tokens
    from dafusion_aug.testing import tiny_pipeline
    what, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
    pipe = tiny_pipeline(seed=0)
    if what == "fit":
        rng = np.random.default_rng(0)
        items = [(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), k % 3) for k in range(6)]
        result = fit_tokens(pipe, items, ["cat", "dog", "zebra"], steps=STEPS, batch_size=3, learning_rate=1e-2,
                            progress=False, checkpoint_dir=ckpt, checkpoint_every=2)
    else:
        result = erase_concept(pipe, {"zebra": ["a photo of a zebra", "zebra"]}, steps=STEPS, ddim_steps=3,
                               learning_rate=1e-2, progress=False, seed=3, checkpoint_dir=ckpt, checkpoint_every=2)
    result.save(out)
    """
)
STEPS = 60


def _run(what: str, ckpt: Path | None, out: Path) -> None:
    """The crash script's run, uninterrupted, in this process (one thread, as in the child)."""
    code = CRASH_SCRIPT.replace("STEPS", str(STEPS))
    if ckpt is None:
        code = code.replace("checkpoint_dir=ckpt", "checkpoint_dir=None")
    argv = sys.argv
    try:
        sys.argv = ["crash-script", what, str(ckpt), str(out)]
        exec(compile(code, "<crash-script>", "exec"), {"__name__": "crash_script"})
    finally:
        sys.argv = argv


def _kill_after_first_checkpoint(what: str, ckpt: Path, out: Path) -> int:
    """Start the script in a child, SIGKILL it once a checkpoint exists; return the checkpoint's step."""
    pattern = "checkpoint-*.json" if what == "fit" else "esd-checkpoint.json"
    code = CRASH_SCRIPT.replace("STEPS", str(STEPS))
    proc = subprocess.Popen([sys.executable, "-c", code, what, str(ckpt), str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpt.glob(pattern)) and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed (rc {proc.returncode}): {err[-2000:]}"
    assert not out.exists()
    return max(json.loads(p.read_text())["step"] for p in ckpt.glob(pattern))


@pytest.mark.parametrize("what", ["fit", "erase"])
def test_kill_9_then_resume_equals_an_uninterrupted_run_bitwise(tmp_path, what, one_thread):
    from dafusion_aug import ClassTokens, Erasure

    ckpt = tmp_path / "ckpt"
    step = _kill_after_first_checkpoint(what, ckpt, tmp_path / "killed.safetensors")
    assert 0 < step < STEPS
    # what a kill inside a checkpoint write leaves (rarely hit by the kill above): the resumed run removes it
    (ckpt / ".tmp-killedwrite.safetensors").write_bytes(b"half a checkpoint")
    _run(what, ckpt, tmp_path / "resumed.safetensors")
    assert not list(ckpt.glob(".tmp-*"))
    _run(what, None, tmp_path / "straight.safetensors")
    load = ClassTokens.load if what == "fit" else Erasure.load
    resumed, straight = load(tmp_path / "resumed.safetensors"), load(tmp_path / "straight.safetensors")
    assert resumed.content_hash() == straight.content_hash()
    if what == "fit":
        assert all(torch.equal(a, b) for a, b in zip(resumed.embeddings, straight.embeddings))
        assert resumed.metadata["final_loss"] == straight.metadata["final_loss"]
    else:
        assert all(torch.equal(resumed.tensors[n], t) for n, t in straight.tensors.items())
        assert resumed.metadata["losses"] == straight.metadata["losses"]
    # nothing corrupt: every checkpoint file left reads back
    from safetensors import safe_open

    for p in ckpt.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            assert list(f.keys())
