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
