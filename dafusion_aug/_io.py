"""File I/O shared by every writer: atomic writes, and safetensors files that are never pickles and whose
headers are checked before any tensor is read.

Atomic writes: a temporary file in the destination folder, then ``os.replace``. A reader (another worker, a resumed run) sees the old file, the whole new file, or nothing; a crash
leaves at most a temporary file, which no reader opens. Finished files get the permissions a plain
``open()`` would give them (0666 minus the umask), not ``mkstemp``'s 0600.

Reads: :func:`read_safetensors_header` parses a safetensors header alone (no tensor data) and
:func:`check_tensor_headers` refuses tensors a kind of file never holds (too many, too large, wrong dtype or
rank); :func:`read_safetensors` parses the header, runs the caller's check (built on the latter), and only
then reads the tensors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import DafusionError, TokenFileError

__all__ = ["atomic_path", "atomic_write_bytes", "remove_temporaries", "looks_like_pickle", "is_safetensors_layout", "save_safetensors",
           "read_safetensors", "TensorHeader", "read_safetensors_header", "check_tensor_headers", "FLOAT_DTYPES", "format_size"]

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
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
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


#: bytes per element of each dtype a safetensors header may name (the format's own names)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: the floating-point dtypes, as a safetensors header names them: what embeddings and weights are stored as
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def format_size(n: int) -> str:
    """A byte count in words: ``512 B``, ``2.0 GiB``."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header declares it; none of its data has been read.

    Attributes:
        name: the tensor's key.
        dtype: the header's dtype name (``"F32"``, ``"BF16"``, ...).
        shape: the declared shape.
        nbytes: the bytes its ``data_offsets`` span in the file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        """``'<cat>' of shape (1, 536870912) F32 (2.0 GiB)``: how messages name it."""
        return f"{self.name!r} of shape {self.shape} {self.dtype} ({format_size(self.nbytes)})"


def _header_entry(name: str, entry: object, data_size: int) -> TensorHeader:
    """One header entry as a :class:`TensorHeader`; raises ``ValueError`` with the reason it is malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise ValueError(f"tensor {name!r} has no dtype in the header, got {json.dumps(entry)[:200]}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} must have a shape of non-negative integers, got {json.dumps(shape)[:200]}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r} must have data_offsets [begin, end] with 0 <= begin <= end, got {json.dumps(offsets)[:200]}")
    t = TensorHeader(name, entry["dtype"], tuple(shape), offsets[1] - offsets[0])
    itemsize = _DTYPE_BYTES.get(t.dtype)
    if itemsize is not None and t.numel * itemsize != t.nbytes:
        raise ValueError(f"tensor {name!r} declares shape {t.shape} {t.dtype} ({format_size(t.numel * itemsize)}) but its "
                         f"data_offsets span {format_size(t.nbytes)}")
    if offsets[1] > data_size:
        raise ValueError(f"it is cut short: tensor {name!r} ends at byte {offsets[1]:,} of the tensor data, but the file "
                         f"holds {data_size:,} bytes of it (a truncated or partly copied file)")
    return t


def read_safetensors_header(path: str, what: str, *, error: type[DafusionError] = TokenFileError
                            ) -> tuple[dict[str, TensorHeader], dict[str, str]]:
    """The tensors a safetensors file declares and its metadata, read from its header alone (no tensor data).

    Checks the layout: an 8-byte little-endian header length of at most 100 MB (safetensors' own limit) that
    fits in the file, a JSON object, string metadata, and per tensor a dtype, a shape, and data offsets that
    match the shape and lie inside the file (so a truncated file is named as such).

    Args:
        path: the file.
        what: what the file is, for messages (``"token file"``).
        error: the exception raised for a malformed or truncated file.

    Returns:
        ``(tensors, metadata)``: name -> :class:`TensorHeader`, and the ``__metadata__`` strings.

    Raises:
        DafusionError: ``error``, naming the file and what is wrong, e.g. "it is cut short: tensor 'x' ends at
            byte ...".
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8:
                raise ValueError(f"it is {size} bytes long, shorter than the 8-byte header length")
            if n > _MAX_HEADER:
                raise ValueError(f"its header length {n:,} is over safetensors' limit of {_MAX_HEADER:,} bytes")
            if n > size - 8:
                raise ValueError(f"it is cut short: its header length is {n:,} bytes, but {size - 8:,} bytes follow it")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise error(f"{what} {path!r} is not a readable safetensors file: {e}") from e
    try:
        if not isinstance(header, dict):
            raise ValueError(f"its header must be a JSON object, got {type(header).__name__}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"its __metadata__ must map strings to strings, got {json.dumps(metadata)[:200]}")
        tensors = {name: _header_entry(name, entry, size - 8 - n) for name, entry in header.items()}
    except ValueError as e:
        raise error(f"{what} {path!r} is not a readable safetensors file: {e}") from e
    return tensors, metadata


def _refused(error: type[DafusionError], what: str, path: str, reason: str) -> DafusionError:
    return error(f"{what} {path!r} {reason}; refused before reading any tensor data")


def check_tensor_headers(
    tensors: Mapping[str, TensorHeader], path: str, what: str, *, error: type[DafusionError],
    dtypes: Collection[str] = FLOAT_DTYPES, ranks: Collection[int] | None = None, max_elements: int | None = None,
    max_tensors: int | None = None, max_bytes: int | None = None, rule: Callable[[TensorHeader], str | None] | None = None,
) -> None:
    """Refuse a file whose header declares tensors that its kind of file never holds, before any data is read.

    The one check of every weights file dafusion-aug reads (token files, erasure files, and the LoRA files
    to come: a LoRA reader calls it with its own ranks, limits and a ``rule`` comparing each tensor with the
    module it names). Without it a header declaring one ``[1, 2**31]`` float32 tensor (a sparse file, no disk)
    costs 8 GiB of memory and dies with a bare ``MemoryError``.

    Args:
        tensors: the header's tensors (:func:`read_safetensors_header`).
        path: the file, for messages.
        what: what the file is, for messages (``"token file"``).
        error: the exception raised.
        dtypes: the header dtype names allowed (default the floating-point ones).
        ranks: the numbers of dimensions allowed; ``None``: any.
        max_elements: the most elements one tensor may have; ``None``: no limit.
        max_tensors: the most tensors the file may hold; ``None``: no limit.
        max_bytes: the most bytes all tensors together may take; ``None``: no limit.
        rule: a further check of one tensor; returns why it is refused, or ``None`` to accept it.

    Raises:
        DafusionError: ``error``, naming the file, the tensor, its shape, dtype and size, and the limit.

    Example:
        >>> tensors, meta = read_safetensors_header(path, "LoRA file")  # doctest: +SKIP
        >>> check_tensor_headers(tensors, path, "LoRA file", error=LoraFileError, ranks=(2, 4))  # doctest: +SKIP
    """
    if max_tensors is not None and len(tensors) > max_tensors:
        raise _refused(error, what, path, f"declares {len(tensors):,} tensors, over the limit of {max_tensors:,}")
    for t in tensors.values():
        if t.dtype not in dtypes:
            kind = "a floating-point tensor" if set(dtypes) <= FLOAT_DTYPES else "a tensor"
            reason = f"each must be {kind} ({', '.join(sorted(dtypes))}), got {t.dtype}"
        elif ranks is not None and len(t.shape) not in ranks:
            reason = f"its number of dimensions must be one of {sorted(ranks)}, got {len(t.shape)}"
        elif max_elements is not None and t.numel > max_elements:
            reason = f"it may have at most {max_elements:,} elements, got {t.numel:,}"
        else:
            reason = rule(t) if rule is not None else None
        if reason:
            raise _refused(error, what, path, f"declares tensor {t.describe()}: {reason}")
    total = sum(t.nbytes for t in tensors.values())
    if max_bytes is not None and total > max_bytes:
        biggest = max(tensors.values(), key=lambda t: t.nbytes)
        raise _refused(error, what, path, f"declares {len(tensors):,} tensors of {format_size(total)} in all (the largest "
                                          f"{biggest.describe()}), over the limit of {format_size(max_bytes)}")


#: ``check(path, what, tensors, metadata)``: refuses a file from its header, before its tensors are read
HeaderCheck = Callable[[str, str, Mapping[str, TensorHeader], Mapping[str, str]], None]


def read_safetensors(
    path: str, what: str, *, error: type[DafusionError] = TokenFileError, pickle_hint: str = "",
    check: HeaderCheck | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file on the CPU, after checking its header.

    Args:
        path: the file.
        what: what the file is, for messages (``"token file"``).
        error: the exception raised for a missing, pickled, truncated or unreadable file.
        pickle_hint: a sentence appended to the message for a pickle (where to turn instead).
        check: called as ``check(path, what, tensors, metadata)`` with the header's
            :class:`TensorHeader` entries before any tensor data is read; raises to refuse the file
            (see :func:`check_tensor_headers`).

    Returns:
        ``(tensors, metadata)``.

    Raises:
        DafusionError: ``error``, when the file is missing, a folder, a pickle (never unpickled), truncated
            (its header's tensors end past the end of the file) or not readable; and whatever ``check`` raises.
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
    headers, header_metadata = read_safetensors_header(path, what, error=error)
    if check is not None:
        check(path, what, headers, header_metadata)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{what} {path!r} is not a readable safetensors file: {e}") from e
    return tensors, metadata
