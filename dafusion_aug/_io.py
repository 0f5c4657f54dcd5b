"""File I/O shared by every writer: atomic writes, and safetensors files that are never pickles.

Atomic writes: a temporary file in the destination folder, then ``os.replace``. A reader (another worker, a resumed run) sees the old file, the whole new file, or nothing; a crash
leaves at most a temporary file, which no reader opens. Finished files get the permissions a plain
``open()`` would give them (0666 minus the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping

import torch

from .errors import DafusionError, TokenFileError

__all__ = ["atomic_path", "atomic_write_bytes", "remove_temporaries", "looks_like_pickle", "is_safetensors_layout", "save_safetensors", "read_safetensors"]

# mkstemp creates files 0600; a plain open() would give 0666 minus the umask. Read the umask once, at
# import (os.umask can only be read by setting it, which is not thread-safe later on).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


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
        # the permissions open() would give: readable by the other accounts and processes (a shared
        # cache, DataLoader workers under another user) that the umask allows; set after the block,
        # since some writers (safetensors) replace the temporary file rather than write into it
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, prefix: str = ".tmp-", suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, prefix=prefix, suffix=suffix) as tmp, open(tmp, "wb") as f:
        f.write(data)


def remove_temporaries(folder: str | os.PathLike, *, prefix: str = ".tmp-") -> int:
    """Delete the temporary files a killed writer left in ``folder`` (only call where this process is the
    folder's one writer, e.g. a checkpoint folder at the start of a run); returns how many went."""
    n = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    n += 1
    return n


# -- safetensors ----------------------------------------------------------------------------------------
#: safetensors refuses headers larger than this (100 MB); a larger "length" is no safetensors file.
_MAX_HEADER = 100_000_000


def is_safetensors_layout(path: str | os.PathLike) -> bool:
    """Whether the file has the safetensors layout: an 8-byte little-endian header length that fits the
    file, followed by that many bytes of JSON describing an object.

    Args:
        path: the file (read, never unpickled).

    Returns:
        ``True`` for a file laid out as safetensors (its tensors may still be damaged), else ``False``.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        if n < 2 or n > _MAX_HEADER or n > os.fstat(f.fileno()).st_size - 8:
            return False
        header = f.read(n)
    try:
        return isinstance(json.loads(header.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """Whether the file is a pickle or a ``torch.save`` zip rather than safetensors (never opened as one).

    A safetensors file starts with its header's length, whose first byte is anything, 0x80 (a pickle's
    protocol byte) included; so a file is a pickle only when it does *not* have the safetensors layout
    (:func:`is_safetensors_layout`) and starts like a pickle (0x80) or a zip (``PK``).
    """
    if is_safetensors_layout(path):
        return False
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head == b"PK"


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str], *,
                     what: str = "file", error: type[DafusionError] = DafusionError) -> None:
    """Write ``tensors`` with string ``metadata`` to ``path`` as safetensors, atomically.

    Args:
        tensors: name -> tensor (each its own memory: safetensors refuses tensors that share it).
        path: the destination; a temporary file beside it is renamed into place.
        metadata: string metadata for the header.
        what: what the file is, for messages (``"token file"``).
        error: the exception raised when the file cannot be written.

    Raises:
        DafusionError: ``error``, naming the path, when the folder cannot be written or the disk is full
            (nothing is left behind: no file, no temporary).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(dict(tensors), tmp, metadata=dict(metadata))
    except (OSError, SafetensorError) as e:
        raise error(f"cannot write {what} {os.fspath(path)!r}: {_write_failure(e)}") from e


def _write_failure(e: BaseException) -> str:
    """Why a write failed, in words: "the disk is full", "the file size limit was reached", or the OS's reason."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code is None:  # safetensors' Rust errors carry the OS error in their text: "... (os error 28)"
        m = re.search(r"(?:os error |code: )(\d+)", text)
        code = int(m.group(1)) if m else None
    if code == errno.ENOSPC:
        return "the disk is full"
    if code == errno.EFBIG:
        return "the file size limit (ulimit -f) was reached"
    if code == errno.EDQUOT:
        return "the disk quota is exceeded"
    return text


def read_safetensors(
    path: str, what: str, *, error: type[DafusionError] = TokenFileError, pickle_hint: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file on the CPU.

    Args:
        path: the file.
        what: what the file is, for messages (``"token file"``).
        error: the exception raised for a missing, pickled or unreadable file.
        pickle_hint: a sentence appended to the message for a pickle (where to turn instead).

    Returns:
        ``(tensors, metadata)``.

    Raises:
        DafusionError: ``error``, when the file is missing, a folder, a pickle (never unpickled) or not
            readable.
    """
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise error(f"{what} {path!r} is a folder; pass the path of the .safetensors file itself")
    if not os.path.exists(path):
        raise error(f"{what} not found: {path!r}")
    if not os.path.isfile(path):
        raise error(f"{what} {path!r} is not a regular file")
    if looks_like_pickle(path):
        raise error(f"{what} {path!r} is a pickle / torch.save file; dafusion-aug never unpickles" + (f". {pickle_hint}" if pickle_hint else ""))
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{what} {path!r} is not a readable safetensors file: {e}") from e
    return tensors, metadata
