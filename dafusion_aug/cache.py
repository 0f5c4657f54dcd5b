"""A content-addressed, sharded, atomic, worker-safe image cache on disk.

Entries live at ``root/ab/cd/<key>.webp`` (lossless) (two levels of shards keep folders small). A write goes to a
temporary file in the same folder and is renamed into place with ``os.replace``, so a reader sees either
nothing or a whole file; no locks are taken, and two workers writing the same key is harmless (last
rename wins; both wrote the same pixels). An entry that cannot be decoded counts as a miss and is removed.

Nothing below the root is followed through a link: a shard folder that is a symbolic link is neither read,
written nor cleaned (it could lead out of the cache), an entry that is a link or not a regular file (a
FIFO, whose ``open`` would block forever) is a miss, and only regular files are ever opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ._io import atomic_write_bytes
from .errors import CacheError

__all__ = ["AugmentationCache", "CacheStats"]

_FORMATS = {
    # name: (extension, PIL format, save kwargs); compared by benchmarks/bench_core.py, see docs/performance.md
    "png": (".png", "PNG", {"compress_level": 1}),
    "webp": (".webp", "WEBP", {"lossless": True, "method": 0, "quality": 0}),
}
_KEY = re.compile(r"^[0-9a-f]{16,128}$")


@dataclasses.dataclass
class CacheStats:
    """Counters of one process's use of a cache (each DataLoader worker counts its own)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    bytes_written: int = 0
    corrupt: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class AugmentationCache:
    """Lossless on-disk store of generated variants, keyed by content hashes.

    Args:
        root: the cache folder (created if needed). Must be writable unless ``read_only``.
        format: ``"webp"`` (lossless, method 0; the default: it encoded 2.2x faster, decoded 1.6x faster and
            was 20% smaller than PNG level 1 in ``benchmarks/bench_core.py``, see docs/performance.md) or
            ``"png"`` (``compress_level=1``, for tools that read nothing else).
        read_only: never write (for a cache filled by ``precompute`` and shared read-only).

    Raises:
        TypeError, ValueError: ``root`` is not a path, or the empty string (which would mean the current
            directory).
        CacheError: the folder cannot be created or written.

    Example:
        >>> cache = AugmentationCache("/tmp/dafusion-cache")  # doctest: +SKIP
        >>> cache.get("0" * 64) is None  # doctest: +SKIP
        True
    """

    def __init__(self, root: str | os.PathLike, format: str = "webp", read_only: bool = False) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a folder path, got {type(root).__name__}: {root!r}")
        if os.fspath(root) == "":  # Path("") is ".": shard folders would land in the current directory
            raise ValueError("root must be a folder path, got ''; pass '.' to use the current directory on purpose")
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
        self.root = Path(root).expanduser()
        self.format = format
        self.read_only = read_only
        self._ext, self._pil_format, self._save_kwargs = _FORMATS[format]
        self._stats = CacheStats()
        self._root_str = str(self.root)
        if not read_only:
            self._check_writable()
        elif not self.root.is_dir():
            raise CacheError(f"cache root {str(self.root)!r} does not exist (read_only=True)")

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise CacheError(f"cache root {str(self.root)!r} is not a writable folder: {e}") from e

    def __repr__(self) -> str:
        return f"AugmentationCache({str(self.root)!r}, format={self.format!r})"

    def __reduce__(self):
        return (type(self), (str(self.root), self.format, self.read_only))

    # -- paths -------------------------------------------------------------------------------------
    def _file(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"key must be a lowercase hex digest, got {key!r}")
        # string joins: this runs on every cache hit, and pathlib costs more than the PNG header parse
        return os.path.join(self._root_str, key[:2], key[2:4], key + self._ext)

    def path(self, key: str) -> Path:
        """Where ``key`` lives (``root/ab/cd/key.ext``)."""
        return Path(self._file(key))

    def _linked_shard(self, key: str) -> str | None:
        """The shard folder of ``key`` that is a symbolic link (never followed), or ``None``."""
        first = os.path.join(self._root_str, key[:2])
        for folder in (first, os.path.join(first, key[2:4])):
            try:
                if stat.S_ISLNK(os.lstat(folder).st_mode):
                    return folder
            except FileNotFoundError:
                return None
        return None

    def __contains__(self, key: str) -> bool:
        path = self._file(key)
        if self._linked_shard(key) is not None:
            return False
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    # -- reading -----------------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The cached RGB uint8 ``(H, W, 3)`` array for ``key``, or ``None`` on a miss.

        A file that cannot be decoded (torn by a crash, truncated, overwritten with junk) is a miss; it is
        removed so the next write replaces it. So is an entry that is not a regular file (a FIFO, a link);
        a shard folder that is a link is a miss and left alone.
        """
        image = self.get_image(key)
        return None if image is None else np.array(image)

    def get_image(self, key: str) -> Image.Image | None:
        """Like :meth:`get`, but the decoded RGB ``PIL.Image`` (no copy into numpy)."""
        path = self._file(key)
        fd = self._open_entry(key, path)
        if fd is None:
            self._stats.misses += 1
            return None
        try:
            with os.fdopen(fd, "rb") as f, Image.open(f) as im:
                im.load()
                image = im.copy() if im.mode == "RGB" else im.convert("RGB")  # a plain Image, not a closed file
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            self._discard(path)
            return None
        self._stats.hits += 1
        return image

    def _open_entry(self, key: str, path: str) -> int | None:
        """A read-only descriptor of the regular file at ``path``, or ``None`` (missing, or not safe to open).

        The shard folders must be real folders and the entry a regular file: opened without following a
        link and without blocking (``O_NONBLOCK`` makes opening a FIFO return at once), then checked.
        """
        if self._linked_shard(key) is not None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError:  # ELOOP: the entry is a link; EACCES, ...: unreadable
            self._discard(path, counted_miss=True)
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self._discard(path, counted_miss=True)
            return None
        return fd

    def _discard(self, path: str, counted_miss: bool = False) -> None:
        """Count a corrupt entry as a miss and remove it (a link is removed, never its target)."""
        if not counted_miss:
            self._stats.misses += 1
        self._stats.corrupt += 1
        with contextlib.suppress(OSError):
            os.unlink(path)

    # -- writing -----------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> bytes:
        """Encode an RGB uint8 ``(H, W, 3)`` array in the cache's lossless format."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an (H, W, 3) uint8 array, got {getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, format=self._pil_format, **self._save_kwargs)
        return buf.getvalue()

    def put(self, key: str, image: np.ndarray | None = None, *, data: bytes | None = None) -> Path:
        """Store ``image`` (or already-encoded ``data``) under ``key``, atomically.

        Raises:
            CacheError: the cache is read-only, the disk is full or not writable (nothing partial is left), or
                the entry's shard folder is a symbolic link (never followed).
        """
        if self.read_only:
            raise CacheError(f"cache {str(self.root)!r} is read-only")
        if data is None:
            if image is None:
                raise ValueError("put needs image or data")
            data = self.encode(image)
        path = self._file(key)
        linked = self._linked_shard(key)
        if linked is not None:
            raise CacheError(f"cannot write cache entry {path!r}: the cache folder {linked!r} is a symbolic link, "
                             "and dafusion-aug never follows links out of the cache root")
        try:
            atomic_write_bytes(path, data, prefix=f".{key[:16]}-", suffix=".tmp")
        except OSError as e:
            reason = "the disk is full" if e.errno == errno.ENOSPC else str(e)
            raise CacheError(f"cannot write cache entry {path!r}: {reason}") from e
        self._stats.writes += 1
        self._stats.bytes_written += len(data)
        return Path(path)

    # -- bookkeeping -------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """This process's counters: hits, misses, writes, bytes_written, corrupt."""
        return self._stats.as_dict()

    def _shards(self) -> Iterator[str]:
        """The real (not linked) shard folders ``root/ab/cd`` on disk."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for first in os.scandir(self._root_str):
                if len(first.name) != 2 or not first.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    for second in os.scandir(first.path):
                        if len(second.name) == 2 and second.is_dir(follow_symlinks=False):
                            yield second.path

    def keys(self) -> Iterator[str]:
        """Iterate over the keys stored on disk (regular files in real shard folders)."""
        for folder in self._shards():
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    if entry.name.endswith(self._ext) and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                        yield entry.name[: -len(self._ext)]

    def clean_temporaries(self) -> int:
        """Remove temporary files left by killed writers; returns how many were removed.

        Only inside real shard folders: a shard folder that is a link is never entered (before, a link out of
        the cache let this delete files elsewhere).
        """
        n = 0
        for folder in self._shards():
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    if not (entry.name.startswith(".") and entry.name.endswith(".tmp")) or entry.is_dir(follow_symlinks=False):
                        continue
                    try:
                        os.unlink(entry.path)  # a link named .x.tmp goes, never its target
                        n += 1
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        warnings.warn(f"could not remove {entry.path}: {e}", stacklevel=2)
        return n
