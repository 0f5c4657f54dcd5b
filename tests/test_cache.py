"""AugmentationCache: layout, atomic writes, torn entries, stats, errors."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from dafusion_aug import AugmentationCache
from dafusion_aug.errors import CacheError

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
