"""AugmentationCache: layout, atomic writes, torn entries, stats, errors."""

from __future__ import annotations

import builtins
import errno
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, ours, random_image
from PIL import Image

from dafusion_aug import AugmentationCache, precompute
from dafusion_aug.data import ImageList
from dafusion_aug.errors import CacheError
from dafusion_aug.hashing import image_digest

KEY = "ab" * 32


def image(seed=0, shape=(24, 20, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_round_trip_is_lossless_and_sharded(tmp_path, fmt):
    cache = AugmentationCache(tmp_path, format=fmt)
    arr = image()
    assert cache.get(KEY) is None
    path = cache.put(KEY, arr)
    assert path == tmp_path / "ab" / "ab" / f"{KEY}.{fmt}"
    assert np.array_equal(cache.get(KEY), arr)
    assert KEY in cache and list(cache.keys()) == [KEY]
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["writes"] == 1 and stats["bytes_written"] == path.stat().st_size


def test_torn_entry_is_a_miss_and_is_removed(tmp_path):
    cache = AugmentationCache(tmp_path)
    path = cache.put(KEY, image())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cache.get(KEY) is None
    assert not path.exists() and cache.stats()["corrupt"] == 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"junk")
    assert cache.get(KEY) is None


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    cache = AugmentationCache(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CacheError, match="disk is full"):
        cache.put(KEY, image())
    monkeypatch.undo()
    assert list(tmp_path.rglob("*.webp")) == [] and list(tmp_path.rglob("*.tmp")) == []


def test_unwritable_root_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="not a writable folder"):
        AugmentationCache(blocker / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_folder_fails_at_construction(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CacheError, match="not a writable folder"):
            AugmentationCache(ro)
    finally:
        ro.chmod(0o700)


def test_read_only_cache(tmp_path):
    AugmentationCache(tmp_path).put(KEY, image())
    ro = AugmentationCache(tmp_path, read_only=True)
    assert ro.get(KEY) is not None
    with pytest.raises(CacheError, match="read-only"):
        ro.put(KEY, image())
    with pytest.raises(CacheError, match="does not exist"):
        AugmentationCache(tmp_path / "missing", read_only=True)


@pytest.mark.parametrize("key", ["../../etc/passwd", "AB" * 32, "", "zz" * 32, 5])
def test_keys_must_be_hex_digests(tmp_path, key):
    with pytest.raises(ValueError, match="key must be"):
        AugmentationCache(tmp_path).path(key)


def test_bad_format_and_bad_image(tmp_path):
    with pytest.raises(ValueError, match="format must be"):
        AugmentationCache(tmp_path, format="jpeg")
    with pytest.raises(ValueError, match="uint8"):
        AugmentationCache(tmp_path).put(KEY, np.zeros((4, 4, 3), np.float32))


def test_clean_temporaries(tmp_path):
    cache = AugmentationCache(tmp_path)
    cache.put(KEY, image())
    (tmp_path / "ab" / "ab" / ".abab-x.tmp").write_bytes(b"partial")
    assert cache.clean_temporaries() == 1
    assert cache.get(KEY) is not None


def test_pickles_by_path(tmp_path):
    import pickle

    cache = AugmentationCache(tmp_path, format="webp")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.root == cache.root and clone.format == "webp"


def test_written_files_get_the_permissions_open_would_give(tmp_path):
    """Atomic writes go through mkstemp (0600); the finished file must be as readable as open() makes it."""
    import stat

    import torch

    from dafusion_aug import ClassTokens

    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    expected = stat.S_IMODE(plain.stat().st_mode)
    if expected == 0o600:
        pytest.skip("the umask here is 077: open() and mkstemp give the same mode")
    entry = AugmentationCache(tmp_path / "cache").put(KEY, image())
    tokens = ClassTokens(["cat"], [torch.zeros(1, 8)]).save(tmp_path / "tokens.safetensors")
    for path in (entry, tokens):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# -- the cache folder and the disk (issue 8) -------------------------------------------------------------
def test_unwritable_cache_fails_at_construction(make_aug, tmp_path, monkeypatch):
    """A path under a regular file: also test_cache.py::test_unwritable_root_fails_at_construction."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="not a writable folder"):
        make_aug(**FAST, cache=blocker / "cache")

    def denied(*args, **kwargs):  # root ignores chmod: simulate a read-only mount instead
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(CacheError, match="not a writable folder.*Permission denied"):
        make_aug(**FAST, cache=tmp_path / "ro")


def _full_disk(monkeypatch, root: Path, how: str, after: int = 0) -> None:
    """Make writes under ``root`` fail with ENOSPC after ``after`` successful ones: at the rename into place,
    or half-way through writing the temporary file (whether it is opened with ``open`` or ``os.fdopen``)."""
    state = {"left": after}
    lock = threading.Lock()  # precompute writes from a thread pool
    root = str(root)

    def room() -> bool:
        with lock:
            state["left"] -= 1
            return state["left"] >= 0

    if how == "replace":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).startswith(root) and not room():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
        return

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def close(self):
            self.f.close()

        def write(self, data):
            if not room():
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

    real_open, real_fdopen = builtins.open, os.fdopen

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return HalfWriter(f) if "w" in mode and isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(root) else f

    def fake_fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        return HalfWriter(f) if "w" in mode and os.readlink(f"/proc/self/fd/{fd}").startswith(root) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    return sorted(root.rglob("*.webp")), sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))


@pytest.mark.parametrize("how", ["replace", "write"])
def test_full_disk_during_training_warns_once_and_keeps_the_generated_image(make_aug, monkeypatch, tmp_path, how):
    aug = make_aug(**FAST, cache=tmp_path / "c")
    reference = make_aug(**FAST, cache=None)
    _full_disk(monkeypatch, aug.cache.root, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            img = random_image(i)
            out, _ = aug(img, i)
            assert np.array_equal(np.asarray(out), np.asarray(reference(img, i)[0]))  # generated, not the real image
    found = ours(caught, "disk is full.*not cached")
    assert len(found) == 1, ours(caught, ".")
    assert _files(aug.cache.root) == ([], [])  # nothing half-written


@pytest.mark.parametrize("how", ["replace", "write"])
def test_full_disk_stops_precompute_with_only_whole_files(make_aug, monkeypatch, tmp_path, how):
    """CacheError from put itself: test_precompute.py::test_full_disk_stops_with_a_clear_error."""
    aug = make_aug(num_inference_steps=2, strength=1.0, num_variants=2, cache=tmp_path / "c")
    items = ImageList([(random_image(i), i % 3) for i in range(4)])
    _full_disk(monkeypatch, aug.cache.root, how, after=3)
    with pytest.raises(CacheError, match="disk is full"):
        precompute(aug, items, batch_size=4, encode_threads=2, progress=False)
    monkeypatch.undo()
    pngs, tmps = _files(aug.cache.root)
    assert tmps == [] and len(pngs) == 3
    assert all(aug.cache.get(p.stem) is not None for p in pngs)
    again = precompute(aug, items, batch_size=4, progress=False)  # space freed: the rerun completes
    assert again["generated"] == 8 - 3 and again["skipped"] == 3
    assert len(_files(aug.cache.root)[0]) == 8


def test_read_only_cache_in_training_warns_once(make_aug, tmp_path):
    AugmentationCache(tmp_path / "shared")
    aug = make_aug(**FAST, cache=AugmentationCache(tmp_path / "shared", read_only=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2):
            out, _ = aug(random_image(i), i)
            assert isinstance(out, Image.Image)
    assert len(ours(caught, "read-only.*not cached")) == 1


# -- issue 15: empty roots, FIFOs, links out of the cache -------------------------------------------------
def test_empty_root_is_refused(make_aug, tmp_path, monkeypatch):
    """Item 8: cache='' wrote shard folders into the current directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="root must be a folder path, got ''"):
        AugmentationCache("")
    with pytest.raises(ValueError, match="root must be a folder path, got ''"):
        make_aug(cache="")
    with pytest.raises(TypeError, match="root must be a folder path, got int"):
        AugmentationCache(3)
    assert list(tmp_path.iterdir()) == []


def test_a_fifo_at_an_entry_path_is_a_miss_not_a_hang(tmp_path):
    """Item 10: cache.get(key) on a FIFO blocked forever in open(); only regular files are opened now."""
    cache = AugmentationCache(tmp_path)
    path = cache.path(KEY)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(got=cache.get(KEY), contains=KEY in cache), daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # release the blocked reader before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("cache.get blocked on a FIFO")
    assert result == {"got": None, "contains": False}
    assert not path.exists() and cache.stats()["corrupt"] == 1  # removed like a torn entry
    cache.put(KEY, image())
    assert np.array_equal(cache.get(KEY), image())


def test_links_out_of_the_cache_are_never_followed(tmp_path):
    """Item 11: with a shard folder linked outside the cache, clean_temporaries() (which precompute calls)
    deleted a .tmp file outside the cache and put() wrote outside it. A linked shard is now never read,
    written or cleaned, and an entry that is a link is a miss whose target is left alone."""
    outside = tmp_path / "outside"
    (outside / "ab").mkdir(parents=True)
    bystander = outside / "ab" / ".keep-me.tmp"
    bystander.write_bytes(b"not the cache's")
    Image.fromarray(image(1)).save(outside / "ab" / f"{KEY}.webp", lossless=True)
    root = tmp_path / "cache"
    cache = AugmentationCache(root)
    (root / "ab").symlink_to(outside, target_is_directory=True)

    assert cache.clean_temporaries() == 0 and bystander.read_bytes() == b"not the cache's"
    assert cache.get(KEY) is None and KEY not in cache and list(cache.keys()) == []
    with pytest.raises(CacheError, match="is a symbolic link, and dafusion-aug never follows links out of the cache root"):
        cache.put(KEY, image())
    assert sorted(p.name for p in (outside / "ab").iterdir()) == [".keep-me.tmp", f"{KEY}.webp"]
    assert np.array_equal(np.asarray(Image.open(outside / "ab" / f"{KEY}.webp")), image(1))  # untouched

    other = "cd" * 32  # an entry that is itself a link to a file outside: a miss; the link goes, not its target
    target = outside / "target.webp"
    Image.fromarray(image(2)).save(target, lossless=True)
    cache.path(other).parent.mkdir(parents=True)
    cache.path(other).symlink_to(target)
    assert other not in cache and cache.get(other) is None
    assert target.is_file() and not cache.path(other).is_symlink()
    cache.put(other, image(3))
    assert np.array_equal(cache.get(other), image(3)) and np.array_equal(np.asarray(Image.open(target)), image(2))


def test_precompute_stops_at_a_linked_shard_and_leaves_the_outside_alone(make_aug, tmp_path):
    aug = make_aug(**FAST)
    key = aug.cache_key(image_digest(np.asarray(random_image(0))), 0, 0)
    outside = tmp_path / "outside"
    (outside / key[2:4]).mkdir(parents=True)
    (outside / key[2:4] / f".{key[:16]}-stale.tmp").write_bytes(b"x")
    (aug.cache.root / key[:2]).symlink_to(outside, target_is_directory=True)
    with pytest.raises(CacheError, match="symbolic link"):
        precompute(aug, ImageList([(random_image(0), 0)]), progress=False)
    assert [p.name for p in (outside / key[2:4]).iterdir()] == [f".{key[:16]}-stale.tmp"]
