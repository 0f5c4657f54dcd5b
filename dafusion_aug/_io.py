"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

A reader (another worker, a resumed run) sees the old file, the whole new file, or nothing; a crash
leaves at most a temporary file, which no reader opens.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path", "atomic_write_bytes"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, prefix: str = ".tmp-", suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends without error it becomes ``path``.

    On any error (disk full included) the temporary file is removed and the error propagates.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, prefix: str = ".tmp-", suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, prefix=prefix, suffix=suffix) as tmp, open(tmp, "wb") as f:
        f.write(data)
