"""File I/O shared by every writer (:mod:`dafusion_aug._io`): safetensors files are never taken for pickles."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import with_header_length
from safetensors.torch import save_file

from dafusion_aug._io import is_safetensors_layout, looks_like_pickle, read_safetensors
from dafusion_aug.errors import TokenFileError


def test_every_header_length_low_byte_reads_back(tmp_path):
    """A safetensors file starts with its header length; its first byte takes every value, 0x80 (a pickle's
    first byte) included, and each such file must read back. Before, one length in 256 (one file in 32 that
    the library writes, lengths being multiples of 8) was refused as a pickle."""
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for low in range(256):
        save_file(tensors, str(path), metadata={"k": "v"})
        with_header_length(path, 512 + low)
        assert path.read_bytes()[0] == low
        assert is_safetensors_layout(path) and not looks_like_pickle(path)
        back, meta = read_safetensors(str(path), "test file")
        assert torch.equal(back["a"], tensors["a"]) and meta == {"k": "v"}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_and_torch_save_files_are_refused_unread(tmp_path, protocol):
    path = tmp_path / "p.safetensors"
    path.write_bytes(pickle.dumps({"a": [1.0, 2.0]}, protocol=protocol))
    assert looks_like_pickle(path)
    with pytest.raises(TokenFileError, match="is a pickle / torch.save file; dafusion-aug never unpickles"):
        read_safetensors(str(path), "token file")
    torch.save({"a": torch.zeros(2)}, path)
    assert looks_like_pickle(path)
    with pytest.raises(TokenFileError, match="pickle"):
        read_safetensors(str(path), "token file")


@pytest.mark.parametrize(
    "content",
    [
        b"\x80" + b"\x00" * 7 + b"{}",  # a fitting length, but the header is cut short
        b"\x80\x00\x00\x00\x00\x00\x00\x00" + b"[" + b" " * 127,  # a length that fits, JSON that is no object
        (0x80).to_bytes(8, "little") + b"\x80" * 0x80,  # a length that fits, bytes that are no JSON
        (0x80).to_bytes(8, "little") + b"{" + b"\x80" * 0x7F,  # a brace, then no JSON
    ],
    ids=["short", "json-list", "not-json", "brace-then-junk"],
)
def test_a_pickle_byte_without_the_safetensors_layout_is_still_a_pickle(tmp_path, content):
    """Only the whole layout (a length that fits, then a JSON object) makes a file safetensors."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    assert not is_safetensors_layout(path) and looks_like_pickle(path)


def test_a_folder_or_a_fifo_is_named_as_such(tmp_path):
    import os

    with pytest.raises(TokenFileError, match="is a folder; pass the path of the .safetensors file itself"):
        read_safetensors(str(tmp_path), "token file")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(TokenFileError, match="is not a regular file"):
        read_safetensors(str(fifo), "token file")
    with pytest.raises(TokenFileError, match="token file not found"):
        read_safetensors(str(tmp_path / "missing.safetensors"), "token file")


SAVE_UNDER_ULIMIT = """
import os, resource, signal, sys, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as a shell's `ulimit -f` with the signal ignored: writes fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
from dafusion_aug import ClassTokens, Erasure
from dafusion_aug.errors import DafusionError
for make in (lambda: ClassTokens(["cat"], [torch.zeros(1, 64)]).save(sys.argv[1] + "/t.safetensors"),
             lambda: Erasure({"a.weight": torch.zeros(8, 8)}, concepts="z").save(sys.argv[1] + "/e.safetensors")):
    try:
        make()
    except DafusionError as e:
        print(type(e).__name__, e)
print(sorted(os.listdir(sys.argv[1])))
"""


def test_token_and_erasure_saves_over_the_file_size_limit_name_the_file(tmp_path):
    """Token and erasure saves that cannot be written (here `ulimit -f`, in a child process) raise the
    library's error with the path and the reason, and leave no file; before, safetensors' raw
    SafetensorError. The full-disk case: test_tokens.py::test_full_disk_on_save_names_the_file_and_leaves_nothing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", SAVE_UNDER_ULIMIT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"TokenFileError cannot write token file '{tmp_path}/t.safetensors': the file size limit (ulimit -f) was reached"
    assert lines[1] == f"ErasureFileError cannot write erasure file '{tmp_path}/e.safetensors': the file size limit (ulimit -f) was reached"
    assert lines[2] == "[]"


# -- headers are checked before any tensor is read (issue 33, item 3) ------------------------------------
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}


def write_sparse_safetensors(path, tensors, metadata=None):
    """Write a safetensors file whose header declares ``tensors`` (name -> (dtype, shape)) and whose tensor
    data is a hole: the file has the size the header promises but takes no disk (2**31 float32 values: 8 GiB)."""
    import json
    import math

    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def forbid_tensor_reads(monkeypatch):
    """Make any read of tensor data (safetensors' safe_open, torch.load) fail the test."""
    import safetensors

    def read(*args, **kwargs):
        pytest.fail("tensor data was read")

    monkeypatch.setattr(safetensors, "safe_open", read)
    monkeypatch.setattr(torch, "load", read)


@pytest.mark.parametrize("log2", [29, 31])
def test_a_header_check_runs_before_any_tensor_is_read(tmp_path, monkeypatch, log2):
    """A header declaring one 1 x 2**29 float32 tensor (a sparse 2 GiB file) took 14-78 s and 8 GB to load,
    and 1 x 2**31 died with a bare MemoryError; a check of the header now refuses it unread."""
    from dafusion_aug._io import check_tensor_headers

    path = write_sparse_safetensors(tmp_path / "huge.safetensors", {"x": ("F32", (1, 2**log2))})
    forbid_tensor_reads(monkeypatch)

    def check(path, what, tensors, metadata):
        check_tensor_headers(tensors, path, what, error=TokenFileError, max_elements=2**20)

    size = "2.0 GiB" if log2 == 29 else "8.0 GiB"
    with pytest.raises(TokenFileError, match=rf"test file '.*huge.safetensors' declares tensor 'x' of shape \(1, {2**log2}\) "
                       rf"F32 \({size}\): it may have at most 1,048,576 elements, got {2**log2:,}; refused before reading"):
        read_safetensors(str(path), "test file", check=check)


def test_the_header_is_read_without_the_data(tmp_path):
    from dafusion_aug._io import TensorHeader, read_safetensors_header

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(5, dtype=torch.float16)}, str(path), metadata={"k": "v"})
    tensors, meta = read_safetensors_header(str(path), "test file")
    assert tensors == {"a": TensorHeader("a", "F32", (2, 3), 24), "b": TensorHeader("b", "F16", (5,), 10)}
    assert meta == {"k": "v"} and tensors["a"].numel == 6


def test_a_truncated_file_is_named_cut_short(tmp_path):
    """Before, safetensors' "Error while deserializing header: MetadataIncompleteBuffer"."""
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(TokenFileError, match=r"is not a readable safetensors file: it is cut short: tensor 'b' ends at byte 40 "
                       r"of the tensor data, but the file holds 35 bytes of it"):
        read_safetensors(str(path), "token file")


def test_a_shape_its_offsets_do_not_hold_is_refused(tmp_path):
    """A header whose shape promises 2 GiB over 8 bytes of data is refused by its numbers alone."""
    import json

    header = json.dumps({"x": {"dtype": "F32", "shape": [1, 2**29], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(TokenFileError, match=r"tensor 'x' declares shape \(1, 536870912\) F32 \(2.0 GiB\) but its data_offsets span 8 B"):
        read_safetensors(str(path), "token file")


def test_a_header_nested_too_deep_is_named(tmp_path):
    """A header of 100,000 '[' raised a bare RecursionError from the JSON parser."""
    path = tmp_path / "t.safetensors"
    path.write_bytes((100_000).to_bytes(8, "little") + b"[" * 100_000)
    assert not is_safetensors_layout(path)
    with pytest.raises(TokenFileError, match="is not a readable safetensors file: maximum recursion depth"):
        read_safetensors(str(path), "token file")
