"""Training checkpoints, one story for every trainer (:func:`~dafusion_aug.fit_tokens`, :func:`~dafusion_aug.erase_concept`).

A checkpoint is a pair of files written in this order, each atomically (temporary file + ``os.replace``):
``<stem>.safetensors`` (CPU tensors and string metadata), then ``<stem>.json`` (a readable document). A
JSON file therefore always names a complete tensor file, and a run killed at any moment leaves only whole
files and temporaries (which :func:`~dafusion_aug._io.remove_temporaries` clears at the next start).
Nothing is ever pickled. Each trainer keeps its own stems and metadata keys (its file format):

- numbered checkpoints (:func:`save_numbered`, :func:`load_numbered`; ``fit_tokens``):
  ``checkpoint-<8-digit step>.safetensors`` with metadata ``format``, ``step`` and ``config_digest``, and
  ``checkpoint-<step>.json`` holding the readable ``config``, the same ``config_digest`` and the name of the
  tensor file; the newest two are kept. Resuming refuses a checkpoint of another config and says which
  fields differ.
- one overwritten checkpoint (``erase_concept``): :func:`write_checkpoint` with a fixed stem.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_bytes, read_safetensors, save_safetensors
from .errors import DafusionError

__all__ = ["write_checkpoint", "numbered_checkpoints", "remove_checkpoints", "save_numbered", "load_numbered"]


def write_checkpoint(
    folder: str | os.PathLike, stem: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
    doc: Mapping[str, Any], *, indent: int = 1,
) -> Path:
    """Write ``<stem>.safetensors`` (``tensors`` on the CPU, with ``metadata``), then ``<stem>.json`` (``doc``).

    Args:
        folder: the checkpoint folder (created if needed).
        stem: the file name without suffix, e.g. ``"checkpoint-00000100"``.
        tensors: name -> tensor; copied to the CPU, contiguous.
        metadata: string metadata stored in the safetensors header.
        doc: JSON-able document (values that are not JSON are written with ``str``).
        indent: JSON indentation.

    Returns:
        The JSON file's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_safetensors(cpu, folder / f"{stem}.safetensors", metadata, what="checkpoint")
    json_path = folder / f"{stem}.json"
    atomic_write_bytes(json_path, json.dumps(dict(doc), indent=indent, default=str).encode("utf-8"), suffix=".json")
    return json_path


def numbered_checkpoints(folder: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """The JSON files ``<prefix>-<8 digits>.json`` in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{8}})\.json$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def remove_checkpoints(json_paths: list[Path]) -> None:
    """Delete these checkpoints: each JSON file and the tensor file beside it."""
    for old in json_paths:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def save_numbered(folder: str | os.PathLike, step: int, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any], *,
                  fmt: str, keep: int = 2) -> Path:
    """Write numbered checkpoint ``step`` and drop all but the newest ``keep``.

    Args:
        folder: the checkpoint folder.
        step: the step reached.
        tensors: the state to resume from.
        info: JSON-able; must hold ``config_digest`` (a digest of everything that decides the run).
        fmt: the format name written into both files.
        keep: how many checkpoints to keep.

    Returns:
        The JSON file's path.
    """
    stem = f"checkpoint-{step:08d}"
    meta = {"format": fmt, "step": str(step), "config_digest": info["config_digest"]}
    doc = dict(info, format=fmt, step=step, tensors=f"{stem}.safetensors")
    json_path = write_checkpoint(folder, stem, tensors, meta, doc)
    remove_checkpoints(numbered_checkpoints(folder)[keep:])
    return json_path


def _config_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]
    return "; ".join(diffs)[:1500] or "the config digest differs"


def load_numbered(folder: str | os.PathLike, config_digest: str, config: Mapping[str, Any], *, fmt: str,
                  error: type[DafusionError]) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """``(info, tensors)`` of the newest numbered checkpoint in ``folder``, or ``None`` when it holds none.

    Raises:
        DafusionError: ``error``, when the newest checkpoint was written for another config (the differing
            fields named) or is unreadable.
    """
    paths = numbered_checkpoints(folder)
    if not paths:
        return None
    json_path = paths[0]
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("format") != fmt:
            raise ValueError(f"format {info.get('format')!r} is not {fmt!r}")
    except (OSError, ValueError) as e:
        raise error(f"checkpoint {str(json_path)!r} is unreadable: {e}; delete it or pass resume=False") from e
    if info.get("config_digest") != config_digest:
        raise error(
            f"checkpoint {str(json_path)!r} was written by a run with other data or hyper-parameters "
            f"({_config_difference(info.get('config', {}), config)}); use another checkpoint_dir, "
            "or resume=False to start over (its checkpoints will then be replaced)"
        )
    tensor_path = json_path.with_name(str(info.get("tensors", "")))
    try:
        tensors, meta = read_safetensors(str(tensor_path), "checkpoint tensors", error=error)
    except DafusionError as e:
        raise error(f"{e}; delete the checkpoint or pass resume=False") from e
    if meta.get("config_digest") != config_digest or meta.get("step") != str(info.get("step")):
        raise error(f"checkpoint {str(tensor_path)!r} does not match {str(json_path)!r}; delete them or pass resume=False")
    return info, tensors
